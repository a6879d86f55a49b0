"""Greedy output equals HF transformers token for token, whatever the batch, chunk size or KV backend."""
from __future__ import annotations

import pytest

from conftest import hf_greedy
from sarathi import LLM, SamplingParams

BACKENDS = ["contiguous", "vattention", "paged"]


def _backend_available(name: str) -> bool:
    if name == "contiguous":
        return True
    try:
        from sarathi.model_executor.kv_cache import kv_backend_class
        kv_backend_class(name)
        return True
    except ImportError:
        return False


def _prompts(tokenizer):
    texts = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3,
             "def add(a, b):\n    return a + b\n\n" * 5, "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17",
             "x", "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8]
    return [tokenizer.encode(t) for t in texts]


@pytest.fixture(scope="module")
def references(tiny_model_dir, hf_tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompts = _prompts(tok)
    return prompts, [hf_greedy(hf_tiny, p, 24) for p in prompts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler,chunk", [("sarathi", 8), ("sarathi", 16), ("sarathi", 512), ("vllm", 512),
                                             ("orca", 512)])
def test_greedy_parity_tiny(tiny_model_dir, references, backend, scheduler, chunk):
    if not _backend_available(backend):
        pytest.skip(f"KV backend {backend!r} is not built")
    prompts, refs = references
    llm = LLM(model=str(tiny_model_dir), kv_cache_backend=backend, scheduler=scheduler, chunk_size=chunk,
              max_model_len=512, max_num_seqs=4, kv_cache_memory="64MiB")
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1))
    for out, (ref_ids, ref_lps) in zip(outs, refs):
        got = out.outputs[0]
        assert got.token_ids == ref_ids
        for lp_dict, tok, ref_lp in zip(got.logprobs, got.token_ids, ref_lps):
            assert abs(lp_dict[tok].logprob - ref_lp) < 1e-4
            assert lp_dict[tok].rank == 1


@pytest.fixture(scope="module")
def long_references(references, hf_tiny):
    prompts, _ = references
    return prompts, [hf_greedy(hf_tiny, p, 80)[0] for p in prompts]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_parity_under_preemption(tiny_model_dir, long_references, backend):
    """KV memory for ~2 sequences and 4 slots, 80 new tokens each: preemption (recompute)
    must not change outputs."""
    if not _backend_available(backend):
        pytest.skip(f"KV backend {backend!r} is not built")
    prompts, refs = long_references
    per_token = 2 * 2 * 2 * 16 * 4  # K+V, 2 layers, 2 KV heads, head_dim 16, fp32
    budget = per_token * 512 if backend == "contiguous" else per_token * 400
    llm = LLM(model=str(tiny_model_dir), kv_cache_backend=backend, chunk_size=16, max_model_len=512,
              max_num_seqs=4, kv_cache_memory=budget, block_size=16, page_size=4096)
    outs = llm.generate(prompt_token_ids=prompts * 2,
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True))
    for out, ref_ids in zip(outs, refs * 2):
        assert out.outputs[0].token_ids == ref_ids
    if backend != "contiguous":
        assert llm.engine.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.slow
def test_greedy_parity_smollm2(smollm2_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    hf = LlamaForCausalLM.from_pretrained(str(smollm2_dir)).float().eval()
    texts = ["The capital of France is", "def fibonacci(n):",
             tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                     add_generation_prompt=True)]
    prompts = [tok.encode(t) for t in texts]
    llm = LLM(model="smollm2-135m-instruct", quantization="none", max_model_len=512, kv_cache_memory="512MiB",
              chunk_size=16)
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0))
    for p, out in zip(prompts, outs):
        ref, ref_lps = hf_greedy(hf, p, 32)
        assert out.outputs[0].token_ids == ref
        assert max(abs(d[t].logprob - r) for d, t, r in zip(out.outputs[0].logprobs, ref, ref_lps)) < 1e-4
    del torch
