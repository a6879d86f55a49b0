"""The serving features on families beyond Llama: LoRA (PEFT adapters, Phi-3's on its fused
layers), optimal sampling with an adapter as target, the OpenAI server through a real
HTTP client, and Ray replicas. Prefix caching is on in every test_model_families run
(the second, alone pass reuses the first pass's blocks)."""
from __future__ import annotations

import pytest
import torch

from sarathi import LLM, LoRARequest, SamplingParams
from sarathi.sampling_params import OptimalSamplingParams
from test_model_families import FAMILIES, MAX_NEW, PROMPTS, assert_matches, family, run  # noqa: F401

ARGS = dict(chunk_size=16, max_model_len=256, max_num_seqs=4, kv_cache_memory="32MiB")


def make_adapter(name, model_dir, out, targets, seed=3):
    """A PEFT LoRA adapter with random A and B on the family's own HF model class."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[name][1]).from_pretrained(str(model_dir)).float()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    peft_model.save_pretrained(str(out))
    return peft_model.eval()


@pytest.mark.parametrize("name, targets", [
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),  # adapters on Phi-3's fused layers
    ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
])
def test_lora_equals_peft(name, targets, family, tmp_path):
    from conftest import hf_greedy

    d, refs = family(name)
    peft_model = make_adapter(name, d, tmp_path / "adapter", targets)
    want = [hf_greedy(peft_model, p, MAX_NEW) for p in PROMPTS]
    llm = LLM(model=str(d), enable_lora=True, lora_modules=[f"a={tmp_path / 'adapter'}"], max_lora_rank=8, **ARGS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, lora_request=LoRARequest("a"))
    got = [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
           for o in outs]
    assert_matches(got, want)
    assert [t for t, _ in got] != [t for t, _ in refs]  # the adapter matters
    assert_matches(run(llm, PROMPTS), refs)  # and requests without it are the base model's


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_optimal_sampling_with_an_adapter_target(name, family, tmp_path):
    """alpha = 1 samples exactly as the adapter does, alpha = 0 as the base. Pages of 32 tokens
    fall behind the window (every Mistral layer, Gemma 3's local layers): the adapter's KV lets
    them go with the served model's."""
    d, _ = family(name)
    make_adapter(name, d, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    llm = LLM(model=str(d), enable_lora=True, lora_modules=[f"ad={tmp_path / 'adapter'}"], max_lora_rank=8,
              page_size=4096, **ARGS)
    assert llm.engine.kv.window == 16

    def sample(alpha=None, lora=None):
        osp = None if alpha is None else OptimalSamplingParams("ad", alpha)
        params = SamplingParams(seed=5, max_tokens=8, ignore_eos=True, optimal_sampling=osp)
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, lora_request=lora)
        return [o.outputs[0].token_ids for o in outs]

    # The plain run first: optimal-sampling requests compute their own KV, and their rows run
    # beside the adapter's, so blocks they leave cached may differ from a plain run's in the
    # last bits (enough to move a seeded sample later on).
    base = sample()
    assert sample(alpha=0.0) == base
    assert sample(alpha=1.0) == sample(lora=LoRARequest("ad")) != base
    for target in llm.engine.plugins.optimal_sampling._adapter_targets.values():
        target.kv.cache.check_invariants()


@pytest.mark.slow
def test_openai_server_serves_a_family(family, tmp_path):
    """Qwen3 through the HTTP server and the openai client: chat works, completions are the engine's."""
    import openai

    from server_harness import engine_flags, running_server

    d, refs = family("qwen3")
    flags = ["--model", str(d), *engine_flags(dict(kv_cache_memory="32MiB", max_model_len=256))]
    with running_server(flags, tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        chat = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8,
                                              messages=[{"role": "user", "content": "Hello"}], temperature=0)
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 8
        done = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPTS[0], max_tokens=MAX_NEW,
                                         temperature=0, logprobs=1)
        assert done.choices[0].logprobs.tokens is not None
        lps = done.choices[0].logprobs.token_logprobs
        assert max(abs(a - b) for a, b in zip(lps, refs[0][1])) < 1e-4


def test_ray_replicas_serve_a_family(family):
    """Mistral (sliding window) on two Ray replicas gives the single engine's greedy tokens."""
    import asyncio
    import shutil
    import tempfile

    ray = pytest.importorskip("ray")
    from sarathi.config import EngineConfig
    from sarathi.engine.ray_client import RayDataParallelClient

    d, refs = family("mistral")
    temp = tempfile.mkdtemp(prefix="sf-", dir="/tmp")  # Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=100 << 20,
             namespace="sarathi-families", _temp_dir=temp, log_to_driver=False)
    try:
        client = RayDataParallelClient(EngineConfig(model=str(d), data_parallel_size=2, num_threads=1,
                                                    distributed_executor_backend="ray", **ARGS))
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

        async def one(prompt, rid):
            final = None
            async for out in client.generate(None, params, rid, prompt_token_ids=prompt):
                final = out
            return final.outputs[0].token_ids

        async def both():
            try:
                return await asyncio.gather(*(one(p, f"r{i}") for i, p in enumerate(PROMPTS)))
            finally:
                await client.shutdown()

        got = asyncio.run(asyncio.wait_for(both(), 300))
        assert got == [tokens for tokens, _ in refs]
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
