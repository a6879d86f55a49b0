"""LoRA adapters through the OpenAI server: picked by the `model` field, listed in
/v1/models with their parent, loaded and unloaded at run time (vLLM's endpoints)."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from lora_testutil import make_adapter
from server_harness import running_server

ENGINE = ["--kv-cache-memory", "64MiB", "--max-model-len", "512", "--quantization", "none", "--enable-lora",
          "--max-loras", "2", "--max-lora-rank", "8"]
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("srv-adapters")
    return {f"a{i}": make_adapter(tiny_model_dir, root / f"a{i}", seed=i, r=4) for i in (1, 2, 3)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, tmp_path_factory):
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", *ENGINE,
            "--lora-modules", f"a1={adapters['a1']}", f"a2={adapters['a2']}", "--allow-runtime-lora-updating"]
    with running_server(args, tmp_path_factory.mktemp("lora-server") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def offline(tiny_model_dir, adapters):
    from sarathi import LLM

    return LLM(model=str(tiny_model_dir), quantization="none", enable_lora=True, max_lora_rank=8,
               kv_cache_memory="64MiB", max_model_len=512,
               lora_modules=[f"{k}={v}" for k, v in adapters.items()])


def complete(server, model, **kw):
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **kw})
    return r


def offline_text(offline, model):
    from sarathi import LoRARequest, SamplingParams

    lora = None if model == "tiny" else LoRARequest(model)
    return offline.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0), lora_request=lora)[0].outputs[0].text


def test_models_lists_adapters_with_parent(server, adapters):
    data = httpx.get(server.base_url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["tiny"]["parent"] is None
    assert by_id["a1"]["parent"] == "tiny" and by_id["a1"]["root"] == str(adapters["a1"])
    assert {"tiny", "a1", "a2"} == set(by_id)


def test_model_field_picks_the_adapter(server, offline):
    texts = {}
    for model in ("tiny", "a1", "a2"):
        r = complete(server, model)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        texts[model] = r.json()["choices"][0]["text"]
        assert texts[model] == offline_text(offline, model)
    assert len(set(texts.values())) == 3
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.completions.create(model="a2", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == texts["a2"]
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "a1"


def test_unknown_model_is_404_in_openai_shape(server):
    r = complete(server, "nope")
    assert r.status_code == 404
    err = r.json()["error"]
    # the 404 names the base model only: other tenants' adapter names are not listed
    assert err["code"] == "model_not_found" and err["param"] == "model" and "a1" not in err["message"]


def test_concurrent_requests_over_three_adapters_with_max_loras_2(server, offline, adapters):
    """Three adapters and the base in flight at once with --max-loras 2: all succeed, equal to alone."""
    r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(adapters["a3"])})
    assert r.status_code == 200, r.text

    async def go():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            models = ["a1", "a2", "a3", "tiny"] * 3
            rs = await asyncio.gather(*[c.post("/v1/completions", json={
                "model": m, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}) for m in models])
            return models, rs

    models, rs = asyncio.run(go())
    for m, r in zip(models, rs):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline_text(offline, m)
    assert 'sarathi:lora_requests_info{max_lora="2"' in httpx.get(server.base_url + "/metrics").text
    r = httpx.post(server.base_url + "/v1/unload_lora_adapter", json={"lora_name": "a3"})
    assert r.status_code == 200


def test_runtime_load_unload_errors(server, tmp_path):
    post = lambda path, body: httpx.post(server.base_url + path, json=body, timeout=30)  # noqa: E731
    r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"]
    r = post("/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    r = post("/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post("/v1/load_lora_adapter", {"lora_name": ""})
    assert r.status_code == 400
    assert complete(server, "a1").status_code == 200   # nothing else affected


def test_runtime_updates_need_the_flag(tiny_model_dir, adapters, tmp_path):
    args = ["--model", str(tiny_model_dir), *ENGINE]
    with running_server(args, tmp_path / "server.log") as proc:
        r = httpx.post(proc.base_url + "/v1/load_lora_adapter",
                       json={"lora_name": "a1", "lora_path": str(adapters["a1"])})
        assert r.status_code == 400 and "--allow-runtime-lora-updating" in r.json()["error"]["message"]
        assert complete(proc, "a1").status_code == 404


def test_unload_racing_with_requests(server, adapters):
    """Unload an adapter while streams use it: each stream either completes (the unload is refused
    while it runs) or is refused before its first byte (404 once the adapter is gone); never cut
    off mid-stream. Loaded again, it serves as before."""
    import threading

    post = lambda path, body: httpx.post(server.base_url + path, json=body, timeout=60)  # noqa: E731
    assert post("/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": str(adapters["a3"])}).status_code == 200
    want = complete(server, "a3").json()["choices"][0]["text"]
    results, unloads = [], []

    def stream():
        body = {"model": "a3", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
            if r.status_code != 200:
                r.read()
                results.append((r.status_code, None))
                return
            text, done = "", False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    import json
                    text += json.loads(line[6:])["choices"][0]["text"]
            results.append((200, text if done else None))

    def unload():
        for _ in range(40):   # bounded: retry while the adapter is in use
            r = post("/v1/unload_lora_adapter", {"lora_name": "a3"})
            unloads.append(r.status_code)
            if r.status_code == 200:
                return

    threads = [threading.Thread(target=stream) for _ in range(6)] + [threading.Thread(target=unload)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert unloads[-1] == 200 and set(unloads) <= {200, 400}
    for status, text in results:
        assert (status, text) == (200, want) or status == 404, (status, text)
    assert complete(server, "a3").status_code == 404
    assert post("/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": str(adapters["a3"])}).status_code == 200
    assert complete(server, "a3").json()["choices"][0]["text"] == want
    assert post("/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 200
