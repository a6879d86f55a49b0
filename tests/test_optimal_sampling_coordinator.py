"""The HTTP coordinator against two live servers of ours (tiny models), with faults injected
between it and them: answers of 500 and dropped connections are retried transparently."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import make_tiny_llama
from server_harness import running_server
from sarathi.optimal_sampling.__main__ import main as cli_main
from sarathi.optimal_sampling.coordinator import Coordinator, CoordinatorConfig

ENGINE = ["--quantization", "none", "--kv-cache-memory", "64MiB", "--max-model-len", "256"]
PROMPTS = ["The quick brown fox", "Hello, my name is", "def add(a, b):"]


@pytest.fixture(scope="module")
def servers(tiny_model_dir, smollm2_dir, tmp_path_factory):
    target = make_tiny_llama(tmp_path_factory.mktemp("coord-target"), smollm2_dir, seed=1)
    logs = tmp_path_factory.mktemp("coord-logs")
    with running_server(["--model", str(tiny_model_dir), *ENGINE], logs / "theta.log") as theta, \
            running_server(["--model", str(target), *ENGINE], logs / "t.log") as t:
        yield theta, t


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from sarathi.transformers_utils.tokenizer import get_tokenizer

    return get_tokenizer(smollm2_dir)


class Faulty(httpx.AsyncBaseTransport):
    """Every `every_500`-th request answers 500, every `every_drop`-th drops the connection."""

    def __init__(self, every_500=4, every_drop=7):
        self.inner = httpx.AsyncHTTPTransport()
        self.n, self.every_500, self.every_drop, self.injected = 0, every_500, every_drop, 0

    async def handle_async_request(self, request):
        self.n += 1
        if self.every_drop and self.n % self.every_drop == 0:
            self.injected += 1
            raise httpx.RemoteProtocolError("server disconnected without sending a response", request=request)
        if self.every_500 and self.n % self.every_500 == 0:
            self.injected += 1
            return httpx.Response(500, json={"error": {"message": "injected"}})
        return await self.inner.handle_async_request(request)

    async def aclose(self):
        await self.inner.aclose()


async def no_sleep(_):
    return None


def run(servers, tokenizer, transport=None, **kw):
    theta, t = servers
    config = CoordinatorConfig(theta.base_url, t.base_url, top_k=10, **kw)

    async def go():
        # One prompt at a time: each server then sees the same batches in every run, so its float
        # sums (and the alphas derived from them) repeat exactly.
        async with Coordinator(config, tokenizer, transport=transport, sleep=no_sleep) as c:
            outs = await c.generate_batch(PROMPTS, max_tokens=8, seed=5, concurrency=1, progress=False)
            return outs, dict(c.stats)
    return asyncio.run(go())


def test_tokens_come_back_keyed_by_id(servers):
    theta, _ = servers
    r = httpx.post(theta.base_url + "/v1/completions", json={
        "prompt": [1, 2, 3], "max_tokens": 1, "logprobs": 3, "return_tokens_as_token_ids": True}, timeout=60)
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"][0].startswith("token_id:") and all(k.startswith("token_id:") for k in lp["top_logprobs"][0])


def test_coordinator_generates_and_faults_are_transparent(servers, tokenizer):
    clean, stats = run(servers, tokenizer)
    for o in clean:
        assert o.error is None and len(o.generated_tokens) <= 8 and len(o.alpha_history) >= len(o.generated_tokens)
        assert o.generated_text == tokenizer.decode(o.generated_tokens, skip_special_tokens=True)
        assert all(0 <= a <= 1 for a in o.alpha_history)
        assert all(abs(d["kl_gap"]) < 1e-4 and 0 < d["covered_theta"] <= 1 for d in o.diagnostics)
    assert stats["retries"] == 0
    faulty = Faulty()
    again, stats = run(servers, tokenizer, transport=faulty)
    assert faulty.injected > 3 and stats["retries"] == faulty.injected
    assert [o.generated_tokens for o in again] == [o.generated_tokens for o in clean]
    assert [o.alpha_history for o in again] == [o.alpha_history for o in clean]


def test_a_dead_endpoint_ends_with_an_error_not_a_hang(servers, tokenizer):
    theta, _ = servers
    config = CoordinatorConfig(theta.base_url, "http://127.0.0.1:9", t_model="x", top_k=5, max_retries=2,
                               timeout=5)

    async def go():
        async with Coordinator(config, tokenizer, sleep=no_sleep) as c:
            return await asyncio.wait_for(c.generate_batch(PROMPTS[:2], max_tokens=4, progress=False), 60)
    outs = asyncio.run(go())
    assert all(o.error and "after 3 attempts" in o.error and not o.generated_tokens for o in outs)


def test_cli_writes_jsonl(servers, tmp_path):
    theta, t = servers
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    rc = cli_main(["--theta-url", theta.base_url, "--t-url", t.base_url, "--prompts", str(prompts), "--out", str(out),
                   "--max-tokens", "4", "--top-k", "5", "--concurrency", "3"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(set(r) >= {"generated_text", "generated_tokens", "alpha_history", "diagnostics", "error"} for r in rows)
