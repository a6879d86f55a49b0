"""Data-parallel replicas on Ray (issue 14), on a local Ray instance started here on 127.0.0.1:
two replicas of the tiny model, one CPU and one thread each, behind RayDataParallelClient.

One Ray instance serves the whole module (startup is seconds); the failure test runs last
because it kills a replica. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")   # on 127.0.0.1 only: conftest.py sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

from sarathi import LLM, SamplingParams  # noqa: E402
from sarathi.config import EngineConfig  # noqa: E402
from sarathi.engine.engine_client import ReplicaFailed  # noqa: E402
from sarathi.engine.router import Router, prefix_block_hashes  # noqa: E402

ENGINE_ARGS = dict(max_num_seqs=16, chunk_size=64, kv_cache_memory="64MiB", max_model_len=512)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Colours: red, green,",
           "1, 2, 3, 4,", "SELECT * FROM", "The quick brown fox", "import numpy as np"]
STEP_TIMEOUT = 120.0


def run(coro, timeout: float = STEP_TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def ray_local():
    # 4 logical CPUs: two clients of two 1-CPU replicas may coexist (the affinity test makes its own)
    temp = tempfile.mkdtemp(prefix="sr-", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=100 << 20,
             namespace="sarathi-test", _temp_dir=temp, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def make_client(model_dir: Path, **kw):
    from sarathi.engine.ray_client import RayDataParallelClient

    config = EngineConfig(model=str(model_dir), data_parallel_size=2, distributed_executor_backend="ray",
                          num_threads=1, **ENGINE_ARGS, **kw)
    return RayDataParallelClient(config)


@pytest.fixture(scope="module")
def client(ray_local, tiny_model_dir):
    c = make_client(tiny_model_dir)
    yield c
    run(c.shutdown())


async def collect(client, prompt, params, rid):
    final = None
    async for out in client.generate(prompt, params, rid):
        final = out
    return final


async def many(client, prompts, params, tag):
    return await asyncio.gather(*(collect(client, p, params, f"{tag}-{i}") for i, p in enumerate(prompts)))


def routed(client):
    return [r.routed_total for r in client.router.replicas]


def test_greedy_equals_one_engine_and_requests_spread(client, tiny_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    before = routed(client)
    outs = run(many(client, PROMPTS, params, "greedy"))
    spread = [a - b for a, b in zip(routed(client), before)]
    assert sum(spread) == len(PROMPTS) and min(spread) >= 2, spread
    single = LLM(model=str(tiny_model_dir), **ENGINE_ARGS).generate(PROMPTS, params)
    for got, want in zip(outs, single):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_same_seed_same_text_on_either_replica(client):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, n=2, ignore_eos=True)
    before = routed(client)
    outs = run(many(client, ["Tell me a story"] * 6, params, "seeded"))
    spread = [a - b for a, b in zip(routed(client), before)]
    assert min(spread) >= 1, spread   # both replicas answered some of them
    texts = {tuple(c.text for c in o.outputs) for o in outs}
    assert len(texts) == 1, texts
    assert len(outs[0].outputs) == 2


def test_structured_outputs_hold_on_either_replica(client, tiny_model_dir):
    import re

    from sarathi.sampling_params import StructuredOutputsParams as SO

    date = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    params = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=SO(regex=date))
    before = routed(client)
    outs = run(many(client, PROMPTS[:4], params, "constrained"))
    assert min(a - b for a, b in zip(routed(client), before)) >= 1   # both replicas constrained some
    single = LLM(model=str(tiny_model_dir), **ENGINE_ARGS).generate(PROMPTS[:4], params)
    for got, want in zip(outs, single):
        assert re.fullmatch(date, got.outputs[0].text), got.outputs[0].text
        assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_bad_input_is_refused_before_any_replica(client):
    with pytest.raises(ValueError):
        run(collect(client, "", SamplingParams(max_tokens=4), "empty"))
    with pytest.raises(ValueError):
        run(collect(client, None, SamplingParams(max_tokens=4), "no-prompt"))
    with pytest.raises(ValueError):
        run(collect(client, "hi", SamplingParams(max_tokens=4, logprobs=10_000), "too-many-logprobs"))
    assert client.errored is None and all(r.outstanding == 0 for r in client.router.replicas)


def _replica_stats(client, index):
    return ray.get(client.replicas[index].get_stats.remote(), timeout=30)


def test_abort_on_disconnect_reaches_the_replica(client):
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def start_then_leave():
        gen = client.generate("Count with me: one, two,", params, "leaver")
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                break
        index = client.replica_of["leaver"]
        await gen.aclose()    # what the server does when the HTTP client disconnects
        return index

    aborted = [_replica_stats(client, i)["aborted_total"] for i in range(2)]
    index = run(start_then_leave())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = _replica_stats(client, index)
        if stats["aborted_total"] == aborted[index] + 1 and stats["num_running"] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the abort did not reach replica {index}: {stats}")
    other = 1 - index
    assert _replica_stats(client, other)["aborted_total"] == aborted[other]
    assert "leaver" not in client.replica_of and client.router.replicas[index].outstanding == 0


def test_prefix_affinity_sends_a_shared_prefix_to_one_replica(ray_local, tiny_model_dir):
    c = make_client(tiny_model_dir, routing="prefix-affinity", block_size=16)
    try:
        shared = "You are a careful assistant. Answer briefly and precisely. " * 4   # > 2 blocks of 16 tokens
        params = SamplingParams(temperature=0.0, max_tokens=4)
        for wave in range(2):    # 4 in flight at a time: within the imbalance bound (8)
            run(many(c, [shared + f"Question {wave}-{i}?" for i in range(4)], params, f"shared{wave}"))
        counts = routed(c)
        assert sorted(counts) == [0, 8], counts
        assert c.router.affinity_hits == 7
        # unrelated prompts still spread by load
        run(many(c, [f"{i} unrelated prompt number {i}" for i in range(6)], params, "other"))
        assert min(a - b for a, b in zip(routed(c), counts)) >= 2, routed(c)
    finally:
        run(c.shutdown())


def test_prefix_affinity_falls_back_beyond_the_imbalance_bound():
    router = Router(2, prefix_affinity=True, max_imbalance=2)
    hashes = prefix_block_hashes(list(range(64)), 16)
    assert len(hashes) == 4 and prefix_block_hashes(list(range(64)) + [7], 16) == hashes
    first = router.choose(hashes)
    picks = [router.choose(hashes).index for _ in range(4)]   # none finish: the affine replica fills up
    assert picks[:2] == [first.index] * 2 and router.imbalance_fallbacks >= 1
    assert picks[2] != first.index
    router.set_up(first.index, False)
    assert router.choose(hashes).index != first.index       # a down replica is never chosen


def test_lora_adapters_serve_and_update_on_every_replica(ray_local, tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from lora_testutil import make_adapter

    from sarathi.lora.request import LoRARequest

    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    b = make_adapter(tiny_model_dir, tmp_path / "b", seed=2, r=4, targets=["q_proj", "v_proj"])
    c = make_client(tiny_model_dir, quantization="none", enable_lora=True, lora_modules=[f"a={a}"])
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outs = run(many_lora(c, PROMPTS[:4], params, LoRARequest("a")))
        assert min(routed(c)) >= 1, routed(c)
        single = LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True, lora_modules=[f"a={a}"],
                     **ENGINE_ARGS)
        want = single.generate(PROMPTS[:4], params, lora_request=LoRARequest("a"))
        base = single.generate(PROMPTS[:4], params)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
        assert [o.outputs[0].token_ids for o in want] != [o.outputs[0].token_ids for o in base]
        # runtime load / unload reach both replicas
        run(c.add_lora(LoRARequest("b", 0, str(b))))
        assert c.list_loras() == ["a", "b"]
        assert all(set(ray.get(r.loras.remote(), timeout=30)) == {"a", "b"} for r in c.replicas)
        run(c.remove_lora("b"))
        assert all(set(ray.get(r.loras.remote(), timeout=30)) == {"a"} for r in c.replicas)
        with pytest.raises(KeyError):
            run(c.remove_lora("b"))
        with pytest.raises(ValueError):
            run(c.add_lora(LoRARequest("bad", 0, str(tmp_path / "missing"))))
        assert c.list_loras() == ["a"]
        assert all(set(ray.get(r.loras.remote(), timeout=30)) == {"a"} for r in c.replicas)
    finally:
        run(c.shutdown())


def test_optimal_sampling_gives_the_same_text_and_alphas_on_either_replica(ray_local, tiny_model_dir, smollm2_dir,
                                                                             tmp_path):
    from conftest import make_tiny_llama

    from sarathi.sampling_params import InvalidParam

    target = make_tiny_llama(tmp_path / "target", smollm2_dir, seed=1)
    kw = dict(quantization="none", optimal_sampling_target=str(target), optimal_sampling_target_name="tiny-t")
    c = make_client(tiny_model_dir, **kw)
    try:
        assert c.optimal_sampling_models() == ["tiny-t"]
        params = SamplingParams(max_tokens=6, seed=3, ignore_eos=True,
                                optimal_sampling={"target_model": "tiny-t", "alpha": "auto"})
        outs = run(many(c, ["The quick brown fox"] * 4, params, "os"))
        assert min(routed(c)) >= 1, routed(c)
        want = LLM(model=str(tiny_model_dir), **kw, **ENGINE_ARGS).generate(["The quick brown fox"], params)[0]
        for o in outs:
            assert o.outputs[0].token_ids == want.outputs[0].token_ids
            # α* is exact to its tolerance (1e-6): the logits of a batch of two can differ from a
            # batch of one in their last bits, which may move α* across one step of its grid
            assert o.outputs[0].optimal_sampling.alpha_history == pytest.approx(
                want.outputs[0].optimal_sampling.alpha_history, abs=1e-6)
        bad = SamplingParams(max_tokens=2, optimal_sampling={"target_model": "nope"})
        with pytest.raises(InvalidParam, match="unknown optimal_sampling target") as e:
            run(collect(c, "hi", bad, "os-bad"))
        assert e.value.param == "optimal_sampling"
    finally:
        run(c.shutdown())


def test_speculative_replicas_give_one_engines_greedy_text(ray_local, tiny_model_dir):
    """--speculative-config reaches every replica: each drafts (early exit after layer 1) and
    verifies, and the text is what one engine without speculation writes."""
    spec = '{"method": "early_exit", "num_speculative_tokens": 3, "num_early_exit_layers": 1}'
    c = make_client(tiny_model_dir, speculative_config=spec)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        outs = run(many(c, PROMPTS, params, "spec"))
        assert min(routed(c)) >= 2, routed(c)
        want = LLM(model=str(tiny_model_dir), **ENGINE_ARGS).generate(PROMPTS, params)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
        assert all(_replica_stats(c, i)["spec_decode_num_drafts_total"] > 0 for i in range(2))
    finally:
        run(c.shutdown())


async def many_lora(client, prompts, params, lora):
    async def one(i, p):
        final = None
        async for out in client.generate(p, params, f"lora-{i}", lora_request=lora):
            final = out
        return final

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def test_every_ray_socket_is_loopback(client):
    import psutil

    from server_harness import assert_loopback_only

    assert assert_loopback_only([psutil.Process()] + psutil.Process().children(recursive=True)) > 0


def test_killed_replica_fails_or_retries_its_requests_then_comes_back(client):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    victim = 0
    old_pid = client.pids[victim]

    on_victim_streaming = asyncio.Event

    async def load():
        streaming = on_victim_streaming()

        async def one(i):
            rid, final = f"kill-{i}", None
            try:
                async for out in client.generate(f"{PROMPTS[i % len(PROMPTS)]} {i}", params, rid):
                    if client.replica_of.get(rid) == victim:
                        streaming.set()
                    final = out
                return final
            except ReplicaFailed as e:
                return e

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await asyncio.wait_for(streaming.wait(), 60)   # kill once the victim has streamed tokens
        os.kill(old_pid, signal.SIGKILL)
        tasks += [asyncio.create_task(one(100 + i)) for i in range(4)]   # arrive while it is down
        return await asyncio.gather(*tasks)

    t0 = time.monotonic()
    results = run(load(), timeout=90)
    assert time.monotonic() - t0 < 90
    failed = [r for r in results if isinstance(r, ReplicaFailed)]
    done = [r for r in results if not isinstance(r, BaseException)]
    assert len(failed) + len(done) == len(results)
    assert all(len(r.outputs[0].token_ids) == 48 for r in done)
    assert failed, "the killed replica had requests that had streamed tokens"
    assert all("replica 0" in str(e) for e in failed)
    # the replica comes back from a new process and the next requests succeed on both
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (client.health()["status"] == "ok" and client.pids[victim] != old_pid):
        time.sleep(0.2)
    health = client.health()
    assert health["status"] == "ok" and client.restarts[victim] == 1, health
    before = routed(client)
    outs = run(many(client, PROMPTS[:4], params, "after"))
    assert all(len(o.outputs[0].token_ids) == 48 for o in outs)
    assert min(a - b for a, b in zip(routed(client), before)) >= 1
