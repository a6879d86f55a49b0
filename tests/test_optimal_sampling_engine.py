"""Optimal sampling inside the engine: both models' forwards in one step, q* over the full
vocabulary, each model with its own KV; α = 0 / 1 reproduce each model's own sampling."""
from __future__ import annotations

import pytest

from conftest import make_tiny_llama
from lora_testutil import make_adapter
from sarathi import LLM, LoRARequest, SamplingParams
from sarathi.sampling_params import InvalidParam, OptimalSamplingParams

PROMPTS = [[1, 200, 300, 400, 500, 600], [1, 9000, 17, 4242, 31337, 12, 77, 5, 6, 7, 8]]
ARGS = dict(quantization="none", kv_cache_memory="64MiB", max_model_len=256)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, smollm2_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-target"), smollm2_dir, seed=1)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("os-adapter") / "a", seed=4)


@pytest.fixture(scope="module")
def llm(tiny_model_dir, target_dir, adapter):
    return LLM(model=str(tiny_model_dir), optimal_sampling_target=str(target_dir), optimal_sampling_target_name="t",
               enable_lora=True, lora_modules=[f"ad={adapter}"], **ARGS)


def params(seed, alpha=None, target="t", n=1, max_tokens=12, **kw):
    osp = None if alpha is None else OptimalSamplingParams(target, alpha)
    return SamplingParams(n=n, seed=seed, max_tokens=max_tokens, ignore_eos=True, optimal_sampling=osp, **kw)


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_alpha_0_reproduces_pi_theta(llm):
    plain = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(7, n=2))
    mixed = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(7, alpha=0.0, n=2))
    assert tokens(plain) == tokens(mixed)
    assert all(c.optimal_sampling.alpha_history == [0.0] * 12 for o in mixed for c in o.outputs)


def test_alpha_1_reproduces_pi_t(llm, target_dir):
    other = LLM(model=str(target_dir), **ARGS)
    want = other.generate(prompt_token_ids=PROMPTS, sampling_params=params(11, n=2))
    got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(11, alpha=1.0, n=2))
    assert tokens(got) == tokens(want)
    assert tokens(got) != tokens(llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(11, n=2)))


def test_adapter_as_target(llm):
    """pi_t = the base plus a LoRA adapter: alpha = 1 samples exactly as the adapter does."""
    want = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(3), lora_request=LoRARequest("ad"))
    got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(3, alpha=1.0, target="ad"))
    assert tokens(got) == tokens(want)


def test_auto_alpha_balances_the_two_kls(llm):
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(5, alpha="auto", logprobs=2))
    for o in outs:
        c = o.outputs[0]
        info = c.optimal_sampling
        assert info.target_model == "t"
        assert len(info.alpha_history) == len(c.token_ids) == 12
        assert all(0.0 <= a <= 1.0 for a in info.alpha_history)
        assert 0.0 < sum(info.alpha_history) / 12 < 1.0
        for d in info.diagnostics:
            assert abs(d["kl_gap"]) < 1e-4 and 0 < d["ess_theta"] <= 1 and 0 < d["ess_t"] <= 1
        # logprobs are those of q*, the distribution actually sampled
        assert all(lp[t].logprob <= 0 for t, lp in zip(c.token_ids, c.logprobs))
    # same seed, same text
    again = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params(5, alpha="auto", logprobs=2))
    assert tokens(outs) == tokens(again)


def test_mixed_batch_leaves_other_requests_alone(llm):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=PROMPTS, sampling_params=greedy)
    both = llm.generate(prompt_token_ids=PROMPTS * 2, sampling_params=[greedy, greedy, params(9, alpha="auto"),
                                                                        params(9, alpha=0.5)])
    assert tokens(both[:2]) == tokens(alone)
    assert tokens(both[2:3]) == tokens(llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=params(9, "auto")))


def test_bad_requests(llm, tiny_model_dir):
    with pytest.raises(InvalidParam, match="unknown optimal_sampling target 'nope'"):
        llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=params(1, alpha="auto", target="nope"))
    with pytest.raises(InvalidParam, match="temperature"):
        params(1, alpha="auto", temperature=0.5)
    with pytest.raises(InvalidParam, match="alpha"):
        OptimalSamplingParams("t", alpha=1.5)
    with pytest.raises(InvalidParam, match="unknown keys"):
        OptimalSamplingParams.from_value({"target_model": "t", "beta": 1})
    with pytest.raises(ValueError, match="in use"):
        llm.engine.add_request("busy", None, params(1, alpha="auto", target="ad"), prompt_token_ids=PROMPTS[0])
        llm.engine.plugins.lora.remove("ad", llm.engine.requests_using("ad"))
    llm.engine.abort_request("busy")
    llm.engine.step()
