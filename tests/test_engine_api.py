"""Entry points: config flags and aliases, YAML presets, the CLI, AsyncLLMEngine, metrics."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sarathi.config import EngineConfig, add_engine_args, parse_bytes
from sarathi.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def _parse(argv):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return EngineConfig.from_cli_args(p.parse_args(argv))


def test_flags_and_aliases():
    c = _parse(["--model_name", "m", "--patch_tokenizer_path", "/p", "--model_attention_backend", "fa_paged",
                "--model_block_size", "65536", "--kv-cache-memory", "1GiB", "--chunk-size", "256",
                "--no-async-kv-mapping"])
    m, kv = c.model_config, c.cache_config
    assert (m.model, m.patch_tokenizer, kv.kv_cache_backend, kv.page_size) == ("m", "/p", "paged", 65536)
    assert kv.kv_cache_memory == 1 << 30 and c.scheduler_config.chunk_size == 256 and kv.async_kv_mapping is False
    assert _parse(["--model_attention_backend", "fa_vattn"]).cache_config.kv_cache_backend == "vattention"
    assert parse_bytes("512MiB") == 512 << 20
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="scheduler"):
        EngineConfig(scheduler="fifo")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _parse(["--model_tensor_parallel_degree", "2"])
    with pytest.raises(TypeError, match="unknown engine argument"):
        EngineConfig(chunk=3)


def test_config_parts_round_trip():
    """Every flat setting lands in exactly one part; replace() changes only what it names."""
    c = EngineConfig(model="m", max_loras=2, enable_lora=True, max_n=3, num_threads=1)
    assert (c.lora_config.max_loras, c.serving_config.max_n, c.parallel_config.num_threads) == (2, 3, 1)
    d = c.replace(max_n=5)
    assert d.serving_config.max_n == 5 and d.model_config == c.model_config and d != c
    assert EngineConfig(**c.settings()) == c
    names = [f for part in c.parts() for f in part.__dataclass_fields__]
    assert len(names) == len(set(names)) == len(c.settings())


def test_yaml_preset_and_command_line_wins(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: foo\nchunk-size: 128\nmax_num_seqs: 3\nmodel_attention_backend: fa_paged\n")
    c = _parse(["--config", str(preset), "--chunk-size", "64"])
    assert c.settings()["model"] == "foo" and c.cache_config.kv_cache_backend == "paged"
    assert (c.scheduler_config.chunk_size, c.scheduler_config.max_num_seqs) == (64, 3)
    for name in os.listdir(ROOT / "configs"):
        _parse(["--config", str(ROOT / "configs" / name)])  # every shipped preset parses
    bad = tmp_path / "bad.yaml"
    bad.write_text("not_a_flag: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        _parse(["--config", str(bad)])


def test_cli_generate(tiny_model_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "sarathi", "generate", "--model", str(tiny_model_dir), "--prompt", "Hello",
           "--prompt", "World", "--max-tokens", "5", "--ignore-eos", "--json", "--kv-cache-memory", "64MiB",
           "--max-model-len", "256"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [r["prompt"] for r in lines] == ["Hello", "World"]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in lines)
    bad = subprocess.run(cmd[:4] + ["--model", "/no/such/model", "--prompt", "x"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "unknown model" in bad.stderr


def test_chat_applies_template(tiny_model_dir):
    from sarathi import LLM

    llm = LLM(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory="64MiB")
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3, temperature=0))[0]
    prompt = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_async_engine_streams_and_aborts(tiny_model_dir):
    from sarathi.engine.async_llm_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory="64MiB",
                                         max_num_seqs=8))

    async def consume(rid, n):
        seen = []
        async for out in engine.generate("Hello world", SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                         rid):
            seen.append(out)
        return seen

    async def abandon(rid):
        async for out in engine.generate("Hello", SamplingParams(max_tokens=200, ignore_eos=True), rid):
            if len(out.outputs[0].token_ids) >= 3:
                break  # the consumer goes away: the request must be aborted

    async def main():
        results = await asyncio.gather(*(consume(f"r{i}", 6 + i) for i in range(4)), abandon("gone"))
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate("", SamplingParams(), "bad"):
                pass
        for _ in range(50):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)
        return results

    results = asyncio.run(main())
    for i, seen in enumerate(results[:4]):
        texts = [o.outputs[0].text for o in seen]
        assert seen[-1].finished and len(seen[-1].outputs[0].token_ids) == 6 + i
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
        m = seen[-1].metrics
        assert m.ttft > 0 and m.e2e_latency >= m.ttft and m.queue_time >= 0
        assert len(m.inter_token_latencies) == 5 + i
    eng = engine.engine
    assert not eng.has_unfinished_requests()
    assert eng.kv.num_free_slots == eng.kv.num_slots and eng.kv.num_free_blocks == eng.kv.num_blocks
    stats = engine.get_stats()
    assert stats["num_running"] == 0 and stats["generation_tokens_total"] >= sum(range(6, 10))


def test_async_engine_admits_what_arrives_while_steps_run(tiny_model_dir):
    """Requests, aborts and admin calls that arrive at any moment of the engine thread's loop (in
    one event-loop turn, while it sleeps, while a step computes, just as it takes the queued
    work) are all applied: every stream ends."""
    from sarathi.engine.async_llm_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory="64MiB",
                                         max_num_seqs=8))

    async def one(i, delay):
        await asyncio.sleep(delay)
        n = 0
        async for out in engine.generate(f"Hello {i}", SamplingParams(temperature=0, max_tokens=3 + i % 4,
                                                                      ignore_eos=True), f"s{i}"):
            n = len(out.outputs[0].token_ids)
            if i % 5 == 4 and n >= 2:
                return -1   # abandoned: aborted mid-stream
        return n

    async def main():
        got = []
        for r in range(8):   # pairs and triples arriving together at an idle engine
            got += await asyncio.wait_for(asyncio.gather(*(one(3 * r + j, 0) for j in range(2 + r % 2))), 30)
        # a stream of arrivals spread over many steps, with admin calls in between
        spread = asyncio.gather(*(one(i, 0.004 * (i - 20)) for i in range(20, 60)))
        counts = []
        for _ in range(10):
            counts.append(await asyncio.wait_for(engine.reset_prefix_cache(), 30))
            await asyncio.sleep(0.003)
        got += await asyncio.wait_for(spread, 60)
        for _ in range(100):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        await engine.shutdown()
        return got, counts

    got, counts = asyncio.run(main())
    ids = [3 * r + j for r in range(8) for j in range(2 + r % 2)] + list(range(20, 60))
    assert got == [-1 if i % 5 == 4 else 3 + i % 4 for i in ids]
    assert len(counts) == 10 and all(c >= 0 for c in counts)
    assert not engine.engine.has_unfinished_requests()


def test_step_stats_record_batch_composition(tiny_model_dir):
    from sarathi import LLM

    llm = LLM(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory="64MiB", chunk_size=16)
    llm.generate(["a b c d e f g h i j k l m n o p q r s t u v w x y z"] * 2,
                 SamplingParams(max_tokens=4, ignore_eos=True))
    stats = list(llm.engine.step_stats)
    assert all(s.num_prefill_tokens + s.num_decode_tokens <= 16 or s.num_prefill_tokens == 0 for s in stats)
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats) or len(stats) > 2
    assert all(s.step_time > 0 for s in stats)


def test_kv_cache_dtype_float16(tiny_model_dir):
    """--kv-cache-dtype float16: half the bytes per token, twice the tokens in the same budget,
    float16 caches under float32 activations; refused where no kernel reads it."""
    from sarathi import LLM

    assert _parse(["--kv-cache-dtype", "float16"]).cache_config.kv_cache_dtype == "float16"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = {}
    for dt in ("auto", "float16"):
        llm = LLM(model=str(tiny_model_dir), kv_cache_memory="4MiB", max_model_len=256, kv_cache_dtype=dt)
        kv, runner = llm.engine.kv, llm.engine.runner
        runs[dt] = (runner.kv_bytes_per_token, kv.num_blocks * kv.block_size, runner.kv_backend.k[0].dtype,
                    llm.generate(["hello there", "one two three"], params))
        llm.engine.close()
    (full_bytes, full_tokens, full_dt, full_out), (half_bytes, half_tokens, half_dt, half_out) = runs.values()
    assert (full_dt, half_dt) == (torch.float32, torch.float16)
    assert half_bytes * 2 == full_bytes and half_tokens == 2 * full_tokens
    assert all(len(o.outputs[0].token_ids) == 12 for o in half_out)
    with pytest.raises(ValueError, match="vattention backend on CPU"):
        LLM(model=str(tiny_model_dir), kv_cache_memory="4MiB", max_model_len=256, kv_cache_dtype="float16",
            kv_cache_backend="paged")
