"""The OpenAI-compatible server through real HTTP clients (openai + httpx), against a
server subprocess on a free port serving a tiny random Llama; results are compared
with the offline engine (`LLM`) on the same model and flags."""
from __future__ import annotations

import asyncio
import math
import time

import httpx
import openai
import pytest

from server_harness import engine_flags, metric, running_server, sse_events

MODEL = "tiny"
ENGINE_ARGS = dict(kv_cache_memory="64MiB", max_num_seqs=64, max_model_len=512, seed=0)
PROMPTS = ["The quick brown fox jumps over", "Hello, my name is"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    args = ["--model", str(tiny_model_dir), "--served-model-name", MODEL, *engine_flags(ENGINE_ARGS)]
    with running_server(args, tmp_path_factory.mktemp("server") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    from sarathi import LLM

    return LLM(model=str(tiny_model_dir), **ENGINE_ARGS)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(**kw):
    from sarathi import SamplingParams

    return SamplingParams(temperature=0.0, **kw)


def test_health_models_version(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    models = httpx.get(server.base_url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(server.base_url + "/version").json()["version"]


def test_completions_greedy_equal_offline(client, offline):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    want = offline.generate(PROMPTS, greedy(max_tokens=12))
    assert [c.index for c in resp.choices] == [0, 1]
    for choice, out in zip(resp.choices, want):
        assert choice.text == out.outputs[0].text
        assert choice.finish_reason == out.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)
    assert resp.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in want)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # the same prompt as token ids gives the same text
    ids = list(want[0].prompt_token_ids)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want[0].outputs[0].text


def test_chat_greedy_equal_offline(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    want = offline.chat(messages, greedy(max_tokens=10))[0]
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want.outputs[0].text
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_streamed_deltas_concatenate_to_the_full_text(client):
    kw = dict(model=MODEL, max_tokens=14, temperature=0)
    full = client.completions.create(prompt=PROMPTS[0], **kw)
    chunks = list(client.completions.create(prompt=PROMPTS[0], stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens

    messages = [{"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_logprobs_equal_offline(client, offline):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3)
    out = offline.generate([PROMPTS[1]], greedy(max_tokens=6, logprobs=3))[0].outputs[0]
    lp = resp.choices[0].logprobs
    tok = offline.get_tokenizer()
    assert len(lp.tokens) == len(out.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    offset = 0
    for i, (tid, step) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.tokens[i] == tok.decode([tid])
        assert math.isclose(lp.token_logprobs[i], step[tid].logprob, abs_tol=1e-5)
        top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:3]
        assert set(lp.top_logprobs[i]) == {tok.decode([t]) for t, _ in top} | {lp.tokens[i]}
        for t, v in top:
            assert math.isclose(lp.top_logprobs[i][tok.decode([t])], v.logprob, abs_tol=1e-5)
        assert lp.text_offset[i] == offset
        offset += len(lp.tokens[i])
    # logprobs=0: the chosen token's logprob only
    zero = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0, logprobs=0)
    assert all(list(d) == [t] for d, t in zip(zero.choices[0].logprobs.top_logprobs, zero.choices[0].logprobs.tokens))


def test_chat_logprobs_equal_offline(client, offline):
    messages = [{"role": "user", "content": "Count to three."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    out = offline.chat(messages, greedy(max_tokens=6, logprobs=2))[0].outputs[0]
    content = resp.choices[0].logprobs.content
    assert len(content) == len(out.token_ids)
    for entry, tid, step in zip(content, out.token_ids, out.logprobs):
        assert math.isclose(entry.logprob, step[tid].logprob, abs_tol=1e-5)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token or "\ufffd" in entry.token
        top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:2]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v.logprob for _, v in top], abs=1e-5)
    assert "".join(e.token for e in content) == resp.choices[0].message.content


def test_echo_with_prompt_logprobs(client, offline):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                     echo=True, logprobs=1)
    want = offline.generate([PROMPTS[0]], greedy(max_tokens=3, logprobs=1, prompt_logprobs=1))[0]
    choice = resp.choices[0]
    assert choice.text == PROMPTS[0] + want.outputs[0].text
    lp = choice.logprobs
    n_prompt = len(want.prompt_token_ids)
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, n_prompt):
        tid = want.prompt_token_ids[i]
        assert math.isclose(lp.token_logprobs[i], want.prompt_logprobs[i][tid].logprob, abs_tol=1e-5)
    assert lp.token_logprobs[n_prompt] == pytest.approx(want.outputs[0].logprobs[0][want.outputs[0].token_ids[0]].logprob,
                                                        abs=1e-5)


def test_n_choices_with_seed_are_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=1.0, n=3, seed=1234)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert [c.index for c in first.choices] == list(range(6))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices[:3]}) > 1, "n samples of one prompt should differ"
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=5, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_strings_and_finish_reasons(client):
    base = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert base.choices[0].finish_reason == "length"
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {text!r}"
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    kept = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                              stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 600}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"nope": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 0}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [-3]}, 400, "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]},
     400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[f"{b[0]}:{b[3]}:{i}"
                                                                       for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_an_openai_error(server, path, body, status, param):
    r = httpx.post(server.base_url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_malformed_json_and_unknown_route_then_still_serving(server, client):
    r = httpx.post(server.base_url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(server.base_url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    ok = client.completions.create(model=MODEL, prompt="still alive?", max_tokens=2)
    assert ok.choices[0].text is not None and ok.usage.completion_tokens >= 1


def test_tokenize_detokenize_round_trip(server, offline):
    text = "Hello world, tokens!"
    r = httpx.post(server.base_url + "/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == offline.get_tokenizer().encode(text) and r["count"] == len(r["tokens"])
    back = httpx.post(server.base_url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == offline.get_tokenizer().decode(r["tokens"])
    chat = httpx.post(server.base_url + "/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    assert chat["count"] > r["count"]


def test_64_concurrent_streaming_clients_all_complete(server):
    async def one(client: openai.AsyncOpenAI, i: int):
        stream = await client.completions.create(model=MODEL, prompt=f"Request number {i}:", max_tokens=12,
                                                 temperature=0.8, seed=i, stream=True,
                                                 extra_body={"ignore_eos": True})
        texts, finish = [], None
        async for chunk in stream:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(texts), finish

    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                    timeout=300, http_client=httpx.AsyncClient(
                                        limits=httpx.Limits(max_connections=80), timeout=300))
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 64
    assert all(finish == "length" and text for text, finish in results)
    stats = httpx.get(server.base_url + "/metrics").text
    assert metric(stats, "sarathi:num_requests_running") == 0


def test_disconnect_mid_stream_frees_the_slot(server):
    url = server.base_url
    before = metric(httpx.get(url + "/metrics").text, "sarathi:generation_tokens_total")
    body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as resp:
            events = sse_events(resp.iter_lines())
            for _ in range(3):
                next(events)
            during = httpx.get(url + "/metrics").text
            assert metric(during, "sarathi:num_requests_running") == 1
            assert metric(during, "sarathi:kv_cache_bytes_used") > 0
            events.close()  # drops the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = httpx.get(url + "/metrics").text
        if metric(after, "sarathi:num_requests_running") == 0:
            break
        time.sleep(0.02)
    assert metric(after, "sarathi:num_requests_running") == 0
    assert metric(after, "sarathi:kv_cache_bytes_used") == 0
    generated = metric(after, "sarathi:generation_tokens_total") - before
    assert generated < 400, "the aborted request kept generating"
    time.sleep(0.5)
    assert metric(httpx.get(url + "/metrics").text, "sarathi:generation_tokens_total") - before == generated


def test_metrics_expose_latency_histograms(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert metric(text, f"sarathi:{name}_count") >= 1
    for name in ("num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total", "num_preemptions_total",
                 "kv_backend_bytes_mapped", "kv_backend_bytes_committed"):
        metric(text, f"sarathi:{name}")


def test_null_fields_mean_defaults_and_unknown_fields_are_ignored(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
            "stream": None, "stop": None, "seed": None, "some_other_servers_field": 1}
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts(server):
    url = server.base_url
    body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    deadline = time.monotonic() + 10
    while metric(httpx.get(url + "/metrics").text, "sarathi:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.02)
    finished = httpx.get(url + "/metrics").text
    assert 'sarathi:request_success_total{finished_reason="abort"}' in finished


def test_serving_benchmark_measures_the_server(server, tiny_model_dir, tmp_path):
    import argparse
    import json
    import sys

    from server_harness import REPO
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serving

    tokenizer = serving.load_tokenizer(str(tiny_model_dir))
    argv = ["--base-url", server.base_url, "--num-prompts", "6", "--max-concurrency", "3", "--random-input-len", "24",
            "--random-output-len", "8", "--request-rate", "50", "--goodput", "ttft:60000", "--label", "t",
            "--result-dir", str(tmp_path)]
    s = serving.run(serving.add_args(argparse.ArgumentParser()).parse_args(argv), tokenizer)
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 6 * 8  # ignore_eos + max_tokens honoured, counted from usage
    assert s["total_input_tokens"] == sum(r["prompt_len"] for r in s["per_request"])
    assert s["ttft_ms"]["median"] > 0 and s["tpot_ms"]["p99"] >= s["tpot_ms"]["median"] > 0
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    assert json.loads((tmp_path / "serving-t.json").read_text())["completed"] == 6
    assert (tmp_path / "serving-t.png").stat().st_size > 0

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one two three"}\n{"prompt": "four five", "max_tokens": 3}\n')
    argv = ["--base-url", server.base_url, "--dataset", "jsonl", "--dataset-path", str(prompts), "--num-prompts",
            "2", "--endpoint", "chat", "--label", "j", "--result-dir", str(tmp_path), "--no-warmup"]
    s = serving.run(serving.add_args(argparse.ArgumentParser()).parse_args(argv), tokenizer)
    assert s["completed"] == 2 and s["total_output_tokens"] == 128 + 3


def test_prefix_cache_over_http(server, client):
    """cached_tokens in usage, the /metrics counters, cache_salt and POST /reset_prefix_cache."""
    url = server.base_url
    prompt = "Prefix caching over HTTP: the quick brown fox jumps over the lazy dog. " * 12

    def cached(**extra):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, **extra}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]

    before = httpx.get(url + "/metrics").text
    assert httpx.post(url + "/reset_prefix_cache", timeout=60).status_code == 200
    n, first = cached()
    _, again = cached()
    assert first == 0 and again == n - 1          # everything but the last prompt token
    assert cached(cache_salt="tenant-b")[1] == 0  # another tenant shares nothing
    after = httpx.get(url + "/metrics").text
    assert metric(after, "sarathi:prefix_cache_queries_total") - metric(before, "sarathi:prefix_cache_queries_total") \
        == 3 * n
    assert metric(after, "sarathi:prefix_cache_hits_total") - metric(before, "sarathi:prefix_cache_hits_total") == n - 1
    r = httpx.post(url + "/reset_prefix_cache", timeout=60)
    assert r.status_code == 200 and r.json()["blocks_forgotten"] > 0
    assert cached()[1] == 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=2)
    chat2 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens < chat.usage.prompt_tokens - 1  # (the template's head may be cached)
    assert chat2.usage.prompt_tokens_details.cached_tokens == chat2.usage.prompt_tokens - 1
    bad = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "cache_salt": ""}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
