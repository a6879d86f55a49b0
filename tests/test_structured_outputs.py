"""Structured outputs in the engine: every constrained output is checked by an independent
checker (Python's re, jsonschema, a small arithmetic parser), greedy constrained output equals
greedy unconstrained output where that already satisfied the constraint, unconstrained rows of a
mixed batch are untouched, bad constraints fail only their own request, a patched (AdaptiVocab)
vocabulary is constrained through its n-tokens. Plus the torch-free parts: params, the scheduler's
hold, the tool-call readers."""
from __future__ import annotations

import json
import pickle
import re
import time
from concurrent.futures import Future

import jsonschema
import pytest

from sarathi.sampling_params import InvalidParam, SamplingParams, StructuredOutputsParams as SO

ENGINE_ARGS = dict(kv_cache_memory="256MiB", max_model_len=1024)
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
EMAIL = r"[a-z0-9._]{1,20}@[a-z0-9]{1,15}\.(com|org|net)"
ARITHMETIC = 'root ::= expr\nexpr ::= term (("+" | "-" | "*") term){0,3}\nterm ::= [0-9]{1,3} | "(" expr ")"'
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}, "required": ["name", "age", "tags"]}


def arithmetic(text: str) -> int:
    """Parse (and evaluate) the ARITHMETIC language with our own recursive descent; raises if not in it."""
    pos = 0

    def term() -> int:
        nonlocal pos
        if text[pos:pos + 1] == "(":
            pos += 1
            v = expr()
            assert text[pos:pos + 1] == ")", text
            pos += 1
            return v
        m = re.match(r"[0-9]{1,3}", text[pos:])
        assert m, text
        pos += m.end()
        return int(m.group())

    def expr() -> int:
        nonlocal pos
        v = term()
        for _ in range(3):
            if text[pos:pos + 1] not in ("+", "-", "*") or pos >= len(text):
                break
            op = text[pos]
            pos += 1
            w = term()
            v = v + w if op == "+" else v - w if op == "-" else v * w
        return v

    value = expr()
    assert pos == len(text), f"trailing text in {text!r}"
    return value


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    from sarathi import LLM

    return LLM(**ENGINE_ARGS)


def chat(llm, question: str) -> str:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)


# ---------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_every_constrained_output_is_valid(llm):
    cases = [("What is the date of the moon landing?", SO(regex=DATE), lambda t: re.fullmatch(DATE, t)),
             ("Invent an email address.", SO(regex=EMAIL), lambda t: re.fullmatch(EMAIL, t)),
             ("Is water wet? Answer yes or no.", SO(choice=["yes", "no", "maybe so"]),
              lambda t: t in ("yes", "no", "maybe so")),
             ("Write a short arithmetic expression.", SO(grammar=ARITHMETIC), arithmetic),
             ("Describe a person as JSON.", SO(json=PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON) or True),
             ('Reply with a JSON object with the keys "a" and "b".', SO(json_object=True),
              lambda t: isinstance(json.loads(t), dict))]
    prompts, params, checks = [], [], []
    for seed in (None, 1, 2):   # greedy, then two seeded samples
        for question, spec, check in cases:
            prompts.append(chat(llm, question))
            params.append(SamplingParams(temperature=0 if seed is None else 0.8, seed=seed, max_tokens=120,
                                         structured_outputs=spec))
            checks.append(check)
    outs = llm.generate(prompts, params)
    for out, check in zip(outs, checks):
        c = out.outputs[0]
        assert out.error is None and c.finish_reason == "stop", (c.text, c.finish_reason, out.error)
        assert check(c.text), c.text


@pytest.mark.slow
def test_greedy_constrained_equals_unconstrained_where_it_already_satisfies(llm):
    """A character-class regex that the unconstrained greedy text satisfies: at every step the
    greedy token is allowed, so the constrained greedy run takes the same tokens."""
    prompts = [chat(llm, "Tell me about the ocean."), chat(llm, "What is a cat?")]
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    params = []
    for out in free:
        chars = sorted(set(out.outputs[0].text))
        params.append(SamplingParams(temperature=0, max_tokens=24, structured_outputs=SO(
            regex="[" + "".join("\\" + c if c in "\\]^-[" else c for c in chars).replace("\n", "\\n") + "]*")))
    constrained = llm.generate(prompts, params)
    for a, b in zip(free, constrained):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, (a.outputs[0].text, b.outputs[0].text)
        assert len(set(b.outputs[0].text)) < 60   # the class really restricts the vocabulary


@pytest.mark.slow
def test_mixed_batch_leaves_unconstrained_rows_alone(llm):
    plain = [(chat(llm, "Name three colors."), SamplingParams(temperature=0, max_tokens=16)),
             (chat(llm, "Say something nice."), SamplingParams(temperature=0.9, seed=7, max_tokens=16))]
    alone = llm.generate([p for p, _ in plain], [s for _, s in plain])
    mixed = [plain[0], (chat(llm, "A person as JSON."), SamplingParams(temperature=0, max_tokens=40,
                                                                      structured_outputs=SO(json=PERSON))),
             plain[1], (chat(llm, "A date?"), SamplingParams(temperature=0.7, seed=3, max_tokens=16,
                                                             structured_outputs=SO(regex=DATE)))]
    outs = llm.generate([p for p, _ in mixed], [s for _, s in mixed])
    assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert re.fullmatch(DATE, outs[3].outputs[0].text)


@pytest.mark.slow
def test_samples_logprobs_and_length(llm):
    """n = 4 samples, each valid; logprobs are of the masked distribution (finite, top-N only of
    allowed tokens); max_tokens mid-structure ends with "length"."""
    out = llm.generate(chat(llm, "A person as JSON."), SamplingParams(
        n=4, temperature=1.0, seed=5, max_tokens=120, logprobs=3, structured_outputs=SO(json=PERSON)))[0]
    assert len(out.outputs) == 4
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), PERSON)
        for step, tid in zip(c.logprobs, c.token_ids):
            assert tid in step and all(lp.logprob > float("-inf") for lp in step.values())
    short = llm.generate(chat(llm, "A person as JSON."), SamplingParams(
        temperature=0, max_tokens=5, structured_outputs=SO(json=PERSON)))[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 5


@pytest.mark.slow
def test_bad_constraints_fail_only_their_own_request(llm):
    prompts = [chat(llm, "Hi")] * 3
    params = [SamplingParams(temperature=0, max_tokens=4, structured_outputs=SO(regex="(unclosed")),
              SamplingParams(temperature=0, max_tokens=4),
              SamplingParams(temperature=0, max_tokens=4, structured_outputs=SO(grammar="root ::= undefined_rule"))]
    outs = llm.generate(prompts, params)
    assert outs[0].error and outs[0].error_param == "structured_outputs" and "regular expression" in outs[0].error
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 4
    assert outs[2].error and "grammar" in outs[2].error
    with pytest.raises(InvalidParam):   # too big: refused at admission
        llm.engine.add_request("big", "x", SamplingParams(structured_outputs=SO(regex="a" * 70000)))
    stats = llm.engine.get_stats()["structured_outputs"]
    assert stats["compile_failures_total"] >= 2 and stats["compile_cache_hits_total"] >= 1


@pytest.mark.slow
def test_compile_timeout_and_cache(smollm2_dir):
    """A pathological schema is stopped by the timeout (its compile finishes on its own thread);
    a second request with a compiled schema pays nothing."""
    from sarathi.structured_outputs import StructuredOutputManager
    from sarathi.transformers_utils.tokenizer import get_tokenizer

    manager = StructuredOutputManager("auto", get_tokenizer(smollm2_dir), 49152, [2], compile_timeout=0.15)
    manager.backend()
    slow = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,50}@[a-z]{1,50}\\.com"}
                                             for i in range(3)}}
    params = SamplingParams(structured_outputs=SO(json=slow))
    hold = manager.bind(params).holds[0]
    with pytest.raises(InvalidParam, match="longer than 0.15s"):
        hold.result(5)
    assert manager.bind(params).holds[0].exception() is not None   # remembered as failed
    t0 = time.perf_counter()
    first = manager.bind(SamplingParams(structured_outputs=SO(json=PERSON))).holds[0].result(5)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = manager.bind(SamplingParams(structured_outputs=SO(json=json.dumps(PERSON)))).holds[0].result(5)
    assert again is first and time.perf_counter() - t0 < cold


@pytest.mark.slow
def test_patched_vocabulary_constrains_through_ngram_tokens(tmp_path):
    """A PatchTokenizer built from JSON text has n-tokens such as '": "'; a random tiny model pushed
    towards them (logit_bias) still writes valid JSON, and uses them."""
    from adaptivocab import PatchTokenizer
    from adaptivocab.patch_model import patch_model
    from adaptivocab_testutil import smollm2_dir, tiny_llama_dir
    from sarathi import LLM

    corpus = tmp_path / "records.jsonl"
    corpus.write_text("\n".join(json.dumps({"name": f"user{i}", "age": i % 90, "tags": ["a", "b"][: i % 3]})
                                for i in range(400)))
    tok = PatchTokenizer.build(str(smollm2_dir()), [corpus], num_new_tokens=40, max_ngram=4, show_progress=False)
    patched = patch_model(tiny_llama_dir(tmp_path / "base"), tok, tmp_path / "patched", init="exp")
    llm = LLM(model=str(patched), kv_cache_memory="64MiB", max_model_len=512)
    engine_tok = llm.get_tokenizer()
    bias = {t: 8.0 for t in engine_tok.ngrams}
    outs = llm.generate(["{"] * 4, [SamplingParams(temperature=0.7, seed=s, max_tokens=120, logit_bias=bias,
                                                   structured_outputs=SO(json=PERSON, disable_any_whitespace=True))
                                    for s in range(4)])
    used = 0
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
        assert engine_tok.decode(c.token_ids, skip_special_tokens=True) == c.text
        used += sum(engine_tok.is_ngram(t) for t in c.token_ids)
    assert used > 0


# ---------------------------------------------------------------------------- torch-free parts

def test_params_shape_checks():
    assert SO(json={"type": "object"}).json == '{"type":"object"}'
    assert SO(json='{"b": 1, "a": 2}').json == '{"b":1,"a":2}'   # key order kept: it is the generation order
    assert SO(choice=["x", "y"]) == SO(choice=("x", "y"))
    for bad in (dict(), dict(regex="a", choice=["a"]), dict(json="{nope"), dict(json=[1]), dict(regex=""),
                dict(choice=[]), dict(choice="ab"), dict(choice=["a", ""]), dict(grammar=5), dict(regex="\ud800")):
        with pytest.raises(InvalidParam):
            SO(**bad)
    with pytest.raises(InvalidParam, match="unsupported keys"):
        SO.from_value({"json": {}, "structural_tag": {}})
    with pytest.raises(InvalidParam, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs={"regex": "a"})
    with pytest.raises(InvalidParam, match="optimal_sampling"):
        SamplingParams(optimal_sampling={"target_model": "t"}, structured_outputs={"regex": "a"})
    assert SamplingParams(structured_outputs={"choice": ["a"]}).structured_outputs.kind == "choice"
    # plain dataclasses: they cross the Ray actor boundary as they are
    p = SamplingParams(structured_outputs=SO(json=PERSON, disable_any_whitespace=True, param="guided_json"))
    q = pickle.loads(pickle.dumps(p))
    assert q.structured_outputs == p.structured_outputs and q.structured_outputs.param == "guided_json"


def test_scheduler_holds_a_sequence_without_blocking_the_queue():
    from sarathi.core.kv_manager import KVManager
    from sarathi.core.scheduler import SarathiScheduler, StepResult
    from sarathi.core.sequence import Sequence

    sched = SarathiScheduler(KVManager(64, 16, 8), max_num_seqs=8, max_model_len=256, chunk_size=64)
    pending, failing = Future(), Future()
    held = Sequence(0, "held", 0, [1, 2, 3], 0.0, 4)
    free = Sequence(1, "free", 0, [4, 5, 6], 0.0, 4)
    bad = Sequence(2, "bad", 0, [7, 8], 0.0, 4)
    sched.add(held, [pending])
    sched.add(free)
    sched.add(bad, [failing])
    out = sched.schedule()
    assert [s.seq for s in out.prefills] == [free] and held in sched.waiting
    assert sched.has_runnable()
    failing.set_exception(InvalidParam("structured_outputs", "no"))
    sched.update_from_output(out, StepResult({1: 9}))
    sched.finish([free])
    out = sched.schedule()
    assert [s for s, _ in out.rejected] == [bad] and bad.is_finished and held in sched.waiting
    assert not out.scheduled and not sched.has_runnable()   # only a held sequence is left: a loop may sleep
    sched.update_from_output(out, StepResult())
    pending.set_result("grammar")
    out = sched.schedule()
    assert [s.seq for s in out.prefills] == [held]


def test_vocabulary_bytes_of_a_patched_tokenizer():
    from adaptivocab_testutil import small_patch_tokenizer
    from sarathi.structured_outputs.backend import vocabulary_bytes

    tok = small_patch_tokenizer()
    decoded = [tok.base.convert_tokens_to_string([t]).encode() for t in tok.base.convert_ids_to_tokens(range(49152))]
    vocab = vocabulary_bytes(tok, 49152, decoded)
    token, parts = next(iter(tok.ngrams.items()))
    assert vocab[token] == b"".join(decoded[p] for p in parts) == tok.decode([token]).encode()
    assert all(vocab[i] == b"" for i in tok.all_special_ids)


def test_native_bitmask_apply_matches_xgrammar():
    """The sampler's native pass and the torch path mask exactly what xgrammar's own apply masks."""
    import torch
    import xgrammar as xgr

    from sarathi.model_executor.sampler import apply_token_bitmask

    g = torch.Generator().manual_seed(0)
    vocab = 49152 + 7   # a vocabulary that does not end on a whole word
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, (vocab + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1      # all allowed
    bitmask[2] = 0       # none
    rows = [0, 1, 2, 4]
    logits = torch.randn(6, vocab, generator=g)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab, indices=rows)
    native = logits.clone()
    apply_token_bitmask(native, bitmask, rows)
    torch_path = logits.clone().t().contiguous().t()   # not contiguous: the torch path
    apply_token_bitmask(torch_path, bitmask, rows)
    assert torch.equal(native, want) and torch.equal(torch_path, want)
    assert torch.equal(native[3], logits[3]) and torch.isinf(native[2]).all()
    with pytest.raises(ValueError):
        apply_token_bitmask(native, bitmask, [6])


def stream_of(reader, text: str):
    """Read text as a stream would, one character at a time: (content, [(name, arguments)]) joined
    from the deltas."""
    content, calls = "", []
    for k in range(1, len(text) + 1):
        c, got = reader.read(text[:k], final=k == len(text))
        assert c.startswith(content)
        content = c
        for i, call in enumerate(got):
            if i == len(calls):
                calls.append([call.name, ""])
            assert call.arguments.startswith(calls[i][1])
            calls[i][1] = call.arguments
    return content, [tuple(c) for c in calls]


def test_tool_call_readers_stream_what_they_return():
    from sarathi.entrypoints.openai.tool_calls import (HermesParser, Llama3JsonParser, NamedCall, RequiredCalls,
                                                       complete_calls)

    cases = [
        (RequiredCalls(), '[{"name": "f", "parameters": {"a": [1, "}"]}}, {"name": "g", "parameters": {}}]',
         "", [("f", '{"a": [1, "}"]}'), ("g", "{}")]),
        (NamedCall("f"), '{"x": "y\\"z"}', "", [("f", '{"x": "y\\"z"}')]),
        (HermesParser(), 'Let me check.<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call>',
         "Let me check.", [("get", '{"city": "Paris"}')]),
        (HermesParser(), "No tools needed <tool", "No tools needed <tool", []),
        (Llama3JsonParser(), '<|python_tag|>{"name": "a", "parameters": {"n": 1}}; {"name": "b", "parameters": {}}',
         "", [("a", '{"n": 1}'), ("b", "{}")]),
        (Llama3JsonParser(), "Just text.", "Just text.", []),
    ]
    for reader, text, content, calls in cases:
        final_content, final_calls = reader.read(text, final=True)
        assert final_content == content and [(c.name, c.arguments) for c in final_calls] == calls, text
        assert stream_of(reader, text) == (content, calls), text
        if calls:
            assert complete_calls(final_calls) is not None
    assert complete_calls(RequiredCalls().read('[{"name": "f", "parameters": {"a": ', final=True)[1]) is None
