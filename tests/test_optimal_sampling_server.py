"""Optimal sampling through the OpenAI server: the request extension, the per-choice
`optimal_sampling` field (streamed per chunk), /v1/models and bad input."""
from __future__ import annotations

import httpx
import pytest

from conftest import make_tiny_llama
from server_harness import running_server, sse_events

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_model_dir, smollm2_dir, tmp_path_factory):
    target = make_tiny_llama(tmp_path_factory.mktemp("os-target"), smollm2_dir, seed=1)
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--quantization", "none",
            "--kv-cache-memory", "64MiB", "--max-model-len", "256", "--optimal-sampling-target", str(target),
            "--optimal-sampling-target-name", "tiny-t"]
    with running_server(args, tmp_path_factory.mktemp("os-server") / "server.log") as proc:
        yield proc


def body(**kw):
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "seed": 3, "ignore_eos": True,
            "optimal_sampling": {"target_model": "tiny-t", "alpha": "auto"}, **kw}


def test_completion_returns_alpha_history_and_streams_the_same(server):
    r = httpx.post(server.base_url + "/v1/completions", json=body(), timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    info = choice["optimal_sampling"]
    assert info["target_model"] == "tiny-t" and len(info["alpha_history"]) == 10
    assert all(abs(d["kl_gap"]) < 1e-4 for d in info["diagnostics"])
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body(stream=True), timeout=60) as s:
        events = list(sse_events(s.iter_lines()))
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    alphas = [a for e in events if e["choices"] for a in e["choices"][0].get("optimal_sampling", {})
              .get("alpha_history", [])]
    assert text == choice["text"] and alphas == info["alpha_history"]


def test_chat_and_plain_requests(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "seed": 1,
        "optimal_sampling": {"target_model": "tiny-t", "alpha": 0.5}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["optimal_sampling"]["alpha_history"][0] == 0.5
    plain = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3},
                       timeout=60).json()
    assert "optimal_sampling" not in plain["choices"][0]


def test_models_and_bad_input(server):
    data = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models").json()["data"]}
    assert data["tiny-t"]["optimal_sampling_target"] is True
    post = lambda b: httpx.post(server.base_url + "/v1/completions", json=b, timeout=60)  # noqa: E731
    for bad, word in [(body(optimal_sampling={"target_model": "nope"}), "unknown optimal_sampling target"),
                      (body(temperature=0.7), "temperature"),
                      (body(optimal_sampling={"target_model": "tiny-t", "alpha": 2}), "alpha"),
                      (body(optimal_sampling="tiny-t"), "optimal_sampling"),
                      ({"model": "tiny-t", "prompt": PROMPT}, "only as an optimal_sampling target")]:
        r = post(bad)
        assert r.status_code == 400, (bad, r.text)
        assert word in r.json()["error"]["message"]
    assert post(body()).status_code == 200
