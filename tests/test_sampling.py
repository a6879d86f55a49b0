"""Sampling behaviour users rely on: seeds, stop strings, n > 1, penalties, bad input."""
from __future__ import annotations

import pytest
import torch

from sarathi import LLM, SamplingParams
from sarathi.sampling_params import InvalidParam


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir), kv_cache_backend="contiguous", max_model_len=256, max_num_seqs=8,
               kv_cache_memory="64MiB", chunk_size=32)


def test_seed_reproducible_across_batch_composition(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Tell me a story"], p)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(["Hello there", "Tell me a story", "Another prompt here"], [others, p, others])
    assert batch[1].outputs[0].token_ids == alone
    different = llm.generate(["Tell me a story"], p.clone(seed=4321))[0].outputs[0].token_ids
    assert different != alone


def test_n_gives_distinct_seeded_samples(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate(["Once upon"], p)[0]
    b = llm.generate(["Once upon"], p)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_stop_string_never_leaks(llm):
    free = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop))[0]
    first = text.find(stop)
    assert out.outputs[0].text == text[:first]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    inc = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0]
    assert inc.outputs[0].text == text[:first + len(stop)]


def test_streamed_text_never_shows_partial_stop(llm):
    eng = llm.engine
    free = llm.generate(["abc"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
    stop = free[5:9]
    eng.add_request("stream", "abc", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop))
    seen = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen.append(out.outputs[0].text)
    for t in seen:
        assert stop not in t
        assert t == free[:len(t)]
    assert seen[-1] == free[:free.find(stop)]


def test_stop_token_ids_and_lengths(llm):
    free = llm.generate(["xyz"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[4]
    out = llm.generate(["xyz"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                               stop_token_ids=[stop_id]))[0].outputs[0]
    first = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    # min_tokens keeps the stop token from ending the output early.
    out = llm.generate(["xyz"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, min_tokens=first + 2,
                                               stop_token_ids=[stop_id]))[0].outputs[0]
    assert len(out.token_ids) >= first + 2


def test_logit_bias_and_penalties(llm):
    free = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    out = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                              logit_bias={42: 100.0}))[0].outputs[0]
    assert out.token_ids == [42] * 5 and free.token_ids != [42] * 5
    rep = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={42: 100.0},
                                              frequency_penalty=2.0, presence_penalty=2.0,
                                              repetition_penalty=1.0))[0].outputs[0]
    assert rep.token_ids[0] == 42  # penalties act on repeats only
    top = llm.generate(["hi"], SamplingParams(temperature=5.0, top_k=1, max_tokens=5, ignore_eos=True,
                                              seed=3))[0].outputs[0]
    assert top.token_ids == free.token_ids  # top_k=1 is greedy whatever the temperature


def test_top_logprobs_are_sorted_and_include_choice(llm):
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2,
                                                 ignore_eos=True))[0]
    for tok, d in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert tok in d and len(d) == 3 and d[tok].rank == 1
        assert d[tok].decoded_token is not None
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tok, d in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert tok in d and all(v.logprob <= 0 for v in d.values())


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"), ({"max_tokens": -1}, "max_tokens"), ({"stop": 5}, "stop"), ({"top_k": 0}, "top_k"),
    ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    # hardening: NaN passes a plain `x < 0` check; infinities and huge integers must be refused too
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 1e300}, "temperature"), ({"top_p": float("nan")}, "top_p"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"min_p": float("nan")}, "min_p"),
    ({"presence_penalty": float("nan")}, "presence_penalty"), ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"),
    ({"n": 1.5}, "n"), ({"logprobs": -1}, "logprobs"),
    ({"logit_bias": {"1": float("nan")}}, "logit_bias"), ({"stop_token_ids": [-3]}, "stop_token_ids"),
])
def test_invalid_sampling_values(kwargs, field):
    with pytest.raises(InvalidParam) as err:
        SamplingParams(**kwargs)
    if field is not None:
        assert err.value.param == field and field in str(err.value)


def test_engine_limits_are_request_errors(llm):
    """Limits that need the engine (vocabulary, --max-n, --max-logprobs) reject at add_request."""
    eng = llm.engine
    vocab = eng.runner.vocab_size
    for params, field in ((SamplingParams(top_k=2**63), "top_k"), (SamplingParams(top_k=vocab + 1), "top_k"),
                          (SamplingParams(n=eng.config.serving_config.max_n + 1), "n"),
                          (SamplingParams(logprobs=eng.config.serving_config.max_logprobs + 1), "logprobs"),
                          (SamplingParams(prompt_logprobs=10**6), "prompt_logprobs"),
                          (SamplingParams(stop_token_ids=[vocab]), "stop_token_ids"),
                          (SamplingParams(logit_bias={vocab + 5: 1.0}), "logit_bias")):
        with pytest.raises(InvalidParam) as err:
            eng.add_request("bad", "Hello", params)
        assert err.value.param == field
    assert not eng.has_unfinished_requests()
    # top_k equal to the vocabulary is the same as no top-k, and a seed near 2**64 works for n > 1
    out = llm.generate(["Hello"], SamplingParams(top_k=vocab, seed=2**64 - 1, n=2, max_tokens=3))[0]
    assert len(out.outputs) == 2


def test_max_tokens_zero_scores_the_prompt(llm):
    """max_tokens=0 with prompt_logprobs: the prompt is scored, nothing is generated (OpenAI echo scoring)."""
    out = llm.generate(["Hello there, how are you"], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    c = out.outputs[0]
    assert c.token_ids == [] and c.finish_reason == "length" and out.finished
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) and out.prompt_logprobs[1] is not None
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_bad_requests_leave_others_unharmed(llm):
    eng = llm.engine
    eng.add_request("good", "Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("empty", "", SamplingParams())
    with pytest.raises(ValueError, match="maximum context length"):
        eng.add_request("long", None, SamplingParams(), prompt_token_ids=[5] * 300)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("good", "Hello", SamplingParams())
    eng.add_request("abort-me", "Hello", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    eng.step()
    eng.abort_request("abort-me")
    free_after_abort = eng.kv.num_free_slots
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
    assert done["good"].outputs[0].finish_reason == "length" and len(done["good"].outputs[0].token_ids) == 8
    assert done["abort-me"].outputs[0].finish_reason == "abort"
    assert free_after_abort == eng.kv.num_slots - 1  # only "good" still held a slot
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_unknown_model_and_args():
    with pytest.raises(ValueError, match="unknown model"):
        LLM(model="/no/such/model")
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(model="x", not_a_flag=1)


def test_incremental_detokenizer_multibyte(smollm2_dir):
    from transformers import AutoTokenizer

    from sarathi.transformers_utils.detokenizer import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = "naïve café — 日本語のテキスト 🙂👍🏽 ok"
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer.after_prompt(tok, prompt, skip_special_tokens=True)
    pieces = []
    for i in range(1, len(ids) + 1):
        piece = detok.step(prompt + ids[:i])
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == text


def test_draw_follows_the_probabilities():
    """The sampler's inverse-CDF draw: chi-square over 30,000 draws of an unnormalised row with zeros
    (never drawn); each row uses its own generator only; NaN rows still give an index."""
    import torch

    from sarathi.model_executor.sampler import draw

    p = torch.tensor([0.5, 0.0, 3.0, 1.5, 0.0, 1.0])
    n = 30000
    g = torch.Generator().manual_seed(5)
    counts = torch.bincount(torch.tensor(draw(p.expand(n, 6), [g] * n)), minlength=6).double()
    q = p.double() / p.sum()
    assert counts[1] == counts[4] == 0
    mask = q > 0
    chi2 = float((((counts - n * q) ** 2) / (n * q).clamp_min(1e-12))[mask].sum())
    assert chi2 < 18.5, chi2  # df 3: p < 0.001 above 16.3
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    other = torch.rand(2, 6)
    alone = draw(p[None], [a])[0]
    assert draw(torch.stack([other[0], p, other[1]]), [torch.Generator(), b, torch.Generator()])[1] == alone
    assert draw(torch.full((1, 4), float("nan")), [g])[0] in range(4)


def test_logsumexp_rows_keeps_torchs_bits_where_exp_underflows():
    """The sampler's logsumexp clamps x - max at -87 (no underflowing exp, which is slow on x86):
    the same bits as torch.logsumexp on wide logits (a random-weight model's), masked rows and
    ordinary ones; rows without a finite max give torch's answer."""
    from sarathi.model_executor.sampler import logsumexp_rows

    g = torch.Generator().manual_seed(0)
    for std in (0.5, 3.0, 45.0, 400.0):
        x = torch.randn(33, 49152, generator=g) * std
        x[3, ::2] = float("-inf")               # a grammar's mask
        x[5, 7] = x[5].max() + 1e-3             # a near tie at the top
        assert torch.equal(logsumexp_rows(x), torch.logsumexp(x, dim=-1)), std
    odd = torch.zeros(4, 16)
    odd[0] = float("-inf")
    odd[1, 3] = float("inf")
    odd[2, 5] = float("nan")
    want, got = torch.logsumexp(odd, dim=-1), logsumexp_rows(odd)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
