"""One isolation boundary: a fault injected into each stage of work derived from one request
(tokenising, adapter lookup, salt hashing, prompt logprobs, sampling, detokenising) fails that request only; a request running beside it gets the tokens it gets
alone, and the engine keeps serving."""
from __future__ import annotations

import pytest

import sarathi.model_executor.model_runner as model_runner
from sarathi import LLM, SamplingParams
from sarathi.transformers_utils.detokenizer import IncrementalDetokenizer

ENGINE_ARGS = dict(kv_cache_memory="32MiB", max_num_seqs=8, max_model_len=256, seed=0)
POISON = "POISON"
GOOD = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir), **ENGINE_ARGS)


def run(llm, reqs):
    """Add (id, prompt, params) and step until all finish; {id: output or the add's exception}."""
    eng = llm.engine
    done = {}
    for rid, prompt, params in reqs:
        try:
            eng.add_request(rid, prompt, params)
        except Exception as e:  # noqa: BLE001 - a request refused at admission
            done[rid] = e
    for _ in range(300):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if not eng.has_unfinished_requests():
            break
    eng.step()   # memory of the last requests goes back
    return done


def poisoned(params: SamplingParams) -> bool:
    return params.cache_salt == POISON


STAGES = {}


def stage(name):
    def register(fn):
        STAGES[name] = fn
        return fn
    return register


@stage("tokenise")
def _tokenise(monkeypatch, llm):
    tok = llm.engine.tokenizer
    real = tok.encode

    def encode(text, *a, **k):
        if POISON in text:
            raise RuntimeError("injected tokeniser fault")
        return real(text, *a, **k)
    monkeypatch.setattr(tok, "encode", encode)
    return POISON + " text", GOOD


@stage("salt hashing")
def _hashing(monkeypatch, llm):
    kv = llm.engine.kv
    real = kv.root

    def root(salt):
        if POISON in salt:
            raise RuntimeError("injected hashing fault")
        return real(salt)
    monkeypatch.setattr(kv, "root", root)
    return "Hello", GOOD.clone(cache_salt=POISON)


@stage("sampling")
def _sampling(monkeypatch, llm):
    real = model_runner.sample

    def faulty(logits, rows, generator):
        if any(poisoned(r.params) for r in rows):
            raise RuntimeError("injected sampler fault")
        return real(logits, rows, generator)
    monkeypatch.setattr(model_runner, "sample", faulty)
    return "Hello", GOOD.clone(cache_salt=POISON)


@stage("prompt logprobs")
def _prompt_logprobs(monkeypatch, llm):
    real = model_runner.prompt_logprobs

    def faulty(logits, ids, n):
        if n == 3:
            raise RuntimeError("injected prompt-logprobs fault")
        return real(logits, ids, n)
    monkeypatch.setattr(model_runner, "prompt_logprobs", faulty)
    return "Hello there", GOOD.clone(prompt_logprobs=3)


@stage("detokenise")
def _detokenise(monkeypatch, llm):
    real = IncrementalDetokenizer.step

    def step(self, ids):
        if len(ids) > 2 and ids[-2] == ids[-1] == 0:   # never happens in the good request's text
            raise RuntimeError("injected detokeniser fault")
        return real(self, ids)
    monkeypatch.setattr(IncrementalDetokenizer, "step", step)
    return "Hello", GOOD.clone(logit_bias={0: 100.0})


@pytest.mark.parametrize("name", list(STAGES))
def test_fault_in_one_stage_fails_only_that_request(llm, monkeypatch, name):
    want = run(llm, [("ref", "Hello", GOOD)])["ref"].outputs[0].token_ids
    prompt, params = STAGES[name](monkeypatch, llm)
    done = run(llm, [("good", "Hello", GOOD), ("bad", prompt, params)])
    bad = done["bad"]
    assert isinstance(bad, Exception) or (bad.error and "injected" in bad.error), bad
    assert done["good"].error is None and done["good"].outputs[0].token_ids == want
    eng = llm.engine
    assert eng.kv.num_free_blocks == eng.kv.num_blocks and not eng.scheduler.has_pending_memory_ops()
    monkeypatch.undo()
    # the engine still serves, with the same result as before
    assert run(llm, [("after", "Hello", GOOD)])["after"].outputs[0].token_ids == want


def test_adapter_lookup_fault_is_a_request_error(llm):
    from sarathi.lora.request import LoRARequest

    done = run(llm, [("good", "Hello", GOOD), ("bad", "Hello", GOOD)])
    with pytest.raises(ValueError, match="--enable-lora"):
        llm.engine.add_request("x", "Hello", GOOD, lora_request=LoRARequest("nope"))
    assert done["good"].error is None and not llm.engine.has_unfinished_requests()
