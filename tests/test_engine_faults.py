"""Fault isolation in the engine: a failure tied to some requests fails only those; a
broken engine stops for good (and the server then reports unhealthy and exits)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

import sarathi.engine.llm_engine as llm_engine
import sarathi.model_executor.model_runner as model_runner
from sarathi import LLM, SamplingParams
from sarathi.engine.engine_client import RequestFailed

ENGINE_ARGS = dict(kv_cache_memory="32MiB", max_num_seqs=16, max_model_len=256, seed=0)
POISON = 0.777  # a temperature the injected sampler fault picks out


def poison_sampler(monkeypatch, error: type) -> None:
    """Make the engine's sampler raise `error` for any batch holding a POISON-temperature row."""
    real = model_runner.sample

    def faulty(logits, rows, generator):
        if any(r.params.temperature == POISON for r in rows):
            raise error("injected")
        return real(logits, rows, generator)

    monkeypatch.setattr(model_runner, "sample", faulty)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir), **ENGINE_ARGS)


def _run(llm, reqs):
    """Add (id, prompt, params) requests and step until done; returns {id: final output}."""
    eng = llm.engine
    for rid, prompt, params in reqs:
        eng.add_request(rid, prompt, params)
    done = {}
    for _ in range(500):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if not eng.has_unfinished_requests():
            return done
    raise AssertionError("engine did not finish")


def test_sampling_fault_fails_only_its_request(llm, monkeypatch):
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = _run(llm, [("ref", "Hello there", good)])["ref"].outputs[0].token_ids
    poison_sampler(monkeypatch, OverflowError)
    done = _run(llm, [("good", "Hello there", good),
                      ("bad", "Hello there", SamplingParams(temperature=POISON, max_tokens=8))])
    assert done["bad"].error and "OverflowError" in done["bad"].error
    assert done["good"].error is None and done["good"].outputs[0].token_ids == want
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_forward_fault_fails_the_batch_then_engine_goes_on(llm, monkeypatch):
    runner = llm.engine.runner
    real = runner.forward
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected forward failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "forward", fail_once)
    monkeypatch.setattr(llm.engine.scheduler, "max_prefills", 0)   # both prompts in the failing step
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    done = _run(llm, [("a", "one", params), ("b", "two", params)])
    assert all(out.error and "RuntimeError" in out.error for out in done.values())
    done = _run(llm, [("c", "three", params)])
    assert done["c"].error is None and len(done["c"].outputs[0].token_ids) == 4


def test_repeated_forward_failures_are_fatal(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), **ENGINE_ARGS)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    llm.engine.runner.execute = broken
    params = SamplingParams(max_tokens=4)
    with pytest.raises(RuntimeError, match="device lost"):
        for i in range(llm_engine.MAX_CONSECUTIVE_FAILURES):
            llm.engine.add_request(f"r{i}", "x", params)
            llm.engine.step()


def test_dead_engine_server_is_unhealthy_and_stops(tiny_model_dir):
    """A dead engine: streams end with an error event and [DONE], /health answers 503, on_fatal runs."""
    from test_server_lifecycle import InProcessServer, wait_health

    from sarathi.config import EngineConfig
    from sarathi.engine.async_llm_engine import AsyncLLMEngine
    from sarathi.entrypoints.openai.api_server import build_app, make_arg_parser
    from server_harness import sse_events

    args = make_arg_parser().parse_args(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                                         "--kv-cache-memory", "32MiB", "--max-model-len", "256"])
    fatal = []

    def factory():
        engine = AsyncLLMEngine(EngineConfig.from_cli_args(args))

        def broken(*a, **k):
            raise RuntimeError("device lost")

        engine.engine.runner.execute = broken
        return engine

    app = build_app(args, engine_factory=factory, on_fatal=lambda: fatal.append(True))
    with InProcessServer(app) as srv:
        wait_health(srv.base_url)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "stream": True}
        # each request fails its batch; the third failure in a row kills the engine
        events = []
        for _ in range(llm_engine.MAX_CONSECUTIVE_FAILURES):
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code in (200, 503)
                if r.status_code == 200:
                    events.append(list(sse_events(r.iter_lines())))   # fails unless [DONE] comes
        assert events and all(ev and "error" in ev[-1] for ev in events)
        r = httpx.get(srv.base_url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert fatal == [True]
        r = httpx.post(srv.base_url + "/v1/completions", json=dict(body, stream=False), timeout=30)
        assert r.status_code == 503


def test_request_failed_reaches_async_stream(tiny_model_dir, monkeypatch):
    from sarathi.config import EngineConfig
    from sarathi.engine.async_llm_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), **ENGINE_ARGS))
    poison_sampler(monkeypatch, ValueError)

    async def main():
        async def consume(rid, params):
            outs = []
            async for out in engine.generate("Hello", params, rid):
                outs.append(out)
            return outs

        good, bad = await asyncio.gather(
            consume("good", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
            consume("bad", SamplingParams(temperature=POISON, max_tokens=6)), return_exceptions=True)
        await engine.shutdown()
        return good, bad

    good, bad = asyncio.run(main())
    assert isinstance(bad, RequestFailed) and "injected" in str(bad)
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 6
