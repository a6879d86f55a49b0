"""Hostile and unusual input against a real server subprocess (with an API key): every
input gets a clear 4xx, never a 5xx, the server stays healthy and a reference request
gives the same text afterwards; big or slow clients cannot stall anyone else."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_harness import running_server, sse_events

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 2_000_000
FLAGS = ["--served-model-name", "tiny", "--api-key", KEY, "--kv-cache-memory", "64MiB", "--max-model-len", "256",
         "--max-num-seqs", "32", "--max-queue-len", "4", "--max-n", "8", "--max-request-bytes", str(MAX_BYTES),
         "--header-timeout", "1.5", "--body-timeout", "1.5"]
REFERENCE = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
COUNTS = {"tried": 0, "4xx": 0, "2xx": 0, "5xx": 0}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(["--model", str(tiny_model_dir), *FLAGS],
                        tmp_path_factory.mktemp("hardening") / "server.log") as proc:
        proc.reference = post(proc, "/v1/completions", REFERENCE).json()["choices"][0]["text"]
        yield proc
        assert proc.proc.poll() is None, "server died"


def post(server, path, body=None, raw=None, headers=AUTH, timeout=60):
    content = raw if raw is not None else json.dumps(body)  # json.dumps writes NaN / Infinity literals
    return httpx.post(server.base_url + path, content=content,
                      headers={"Content-Type": "application/json", **headers}, timeout=timeout)


def assert_healthy(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = post(server, "/v1/completions", REFERENCE)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == server.reference


def assert_clean_400(r, param=None):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


# ---------------------------------------------------------------------------- the probe's findings

def test_huge_top_k_is_a_400_not_a_dead_engine(server):
    """The critical finding: top_k=2**63 used to kill the engine for every client."""
    for top_k in (9223372036854775808, 2**63 - 1, 10**30, 49153):
        assert_clean_400(post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "top_k": top_k}),
                         "top_k")
    assert_healthy(server)


@pytest.mark.parametrize("field,raw_value", [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", '"NaN"'), ("temperature", "1e999"),
    ("repetition_penalty", "NaN"), ("repetition_penalty", "Infinity"), ("top_p", "NaN"), ("min_p", "NaN"),
    ("presence_penalty", "-Infinity"), ("seed", str(2**64)), ("seed", "-1"), ("n", "20000"), ("n", "9"),
    ("logprobs", "21"), ("logprobs", str(2**63)), ("max_tokens", "-1"), ("min_tokens", str(2**63)),
    ("stop_token_ids", f"[{2**63}]"), ("logit_bias", '{"99999999": 1}'), ("logit_bias", '{"5": "NaN"}'),
])
def test_bad_numbers_blame_the_right_field(server, field, raw_value):
    raw = '{"model": "tiny", "prompt": "Hello", "max_tokens": 4, "%s": %s}' % (field, raw_value)
    if field == "max_tokens":
        raw = '{"model": "tiny", "prompt": "Hello", "max_tokens": %s}' % raw_value
    assert_clean_400(post(server, "/v1/completions", raw=raw), field)


def test_lone_surrogates(server):
    assert_clean_400(post(server, "/v1/completions", raw='{"prompt": "\\ud800 x", "max_tokens": 2}'), "prompt")
    chat = '{"messages": [{"role": "user", "content": "a\\udfff"}], "max_tokens": 2}'
    assert_clean_400(post(server, "/v1/chat/completions", raw=chat), "messages")
    assert_clean_400(post(server, "/tokenize", raw='{"prompt": "\\ud800"}'), "prompt")
    assert_clean_400(post(server, "/v1/completions", raw='{"prompt": "a", "stop": ["\\ud800"]}'), "stop")
    assert_healthy(server)


def test_queue_bound_counts_requests_not_samples(server):
    """--max-queue-len 4 and n=8: one request with many samples is one request in the queue."""
    big = {"model": "tiny", "prompt": "Hello", "max_tokens": 40, "n": 8, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=big, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)  # the request is in the engine
        follow = post(server, "/v1/completions", dict(REFERENCE, max_tokens=2))
        assert follow.status_code == 200, follow.text
        assert sum(1 for _ in sse_events(lines)) > 0


def test_low_severity_findings(server):
    url = server.base_url
    # echo + max_tokens 0 scores the prompt (OpenAI and vLLM accept it)
    r = post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "Hello there" and choice["logprobs"]["token_logprobs"][1] is not None
    assert_clean_400(post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 0}), "max_tokens")
    # the auth scheme is case-insensitive
    assert post(server, "/v1/completions", REFERENCE, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert post(server, "/v1/completions", REFERENCE, headers={"Authorization": f"BEARER  {KEY}"}).status_code == 200
    assert post(server, "/v1/completions", REFERENCE, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    # probes use HEAD
    assert httpx.head(url + "/health").status_code == 200
    # an unknown model name is not echoed back whole
    r = post(server, "/v1/completions", {"model": "m" * 1_000_000, "prompt": "x"})
    assert r.status_code == 404 and len(r.text) < 1000
    # API docs are behind the key like the API
    assert httpx.get(url + "/docs").status_code == 401
    assert httpx.get(url + "/openapi.json").status_code == 401
    assert httpx.get(url + "/openapi.json", headers=AUTH).status_code == 200
    # a body that is not JSON says so
    r = httpx.post(url + "/v1/completions", content="prompt=hi", headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 400 and "Content-Type" in r.json()["error"]["message"]
    assert_healthy(server)


# ---------------------------------------------------------------------------- size and time limits

def _stream_gaps(server, stop: threading.Event, gaps: list, started: threading.Event):
    """Stream long completions until told to stop; record the longest gap between chunks."""
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            last = time.monotonic()
            for line in r.iter_lines():
                now = time.monotonic()
                if line:
                    started.set()
                    gaps.append(now - last)
                    last = now
                if stop.is_set():
                    break


@pytest.mark.parametrize("size,status", [(10_000_000, 413), (1_500_000, 400)])
def test_big_prompt_never_stalls_other_streams(server, size, status):
    """A 10 MB body is refused before parsing (413); a 1.5 MB prompt under the byte limit is
    refused untokenised (it cannot fit the context); neither stops another client's stream."""
    stop, started, gaps = threading.Event(), threading.Event(), []
    t = threading.Thread(target=_stream_gaps, args=(server, stop, gaps, started))
    t.start()
    try:
        assert started.wait(60)
        gaps.clear()
        t0 = time.monotonic()
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": "word " * (size // 5), "max_tokens": 4})
        elapsed = time.monotonic() - t0
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(60)
    assert r.status_code == status, r.text[:300]
    assert elapsed < 5
    assert gaps and max(gaps) < 1.0, f"longest gap between streamed chunks {max(gaps):.2f}s"


def test_slow_headers_are_cut_off(server):
    """Slowloris: a connection that never finishes its headers is closed after --header-timeout."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # silent connection
        t0 = time.monotonic()
        assert s.recv(1024) == b""
        assert time.monotonic() - t0 < 5


def test_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        t0 = time.monotonic()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
    assert_healthy(server)


# ---------------------------------------------------------------------------- fuzzing every field

_WEIRD = ['null', '0', '-1', '1', '2', '0.5', '-0.5', '1e999', '-1e999', 'NaN', 'Infinity', '"NaN"', '""', '"x"',
          '"\\ud800"', 'true', 'false', '[]', '{}', '[1, 2]', '[-1]', '{"1": 1}', str(2**31), str(2**63),
          str(2**64), str(-2**63), '"' + "z" * 3000 + '"', '[[]]', '[""]', '{"a": [1, {"b": null}]}']
_COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream",
                      "stream_options", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty",
                      "logit_bias", "seed", "logprobs", "echo", "suffix", "best_of", "min_tokens", "ignore_eos",
                      "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "user"]
_CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
                "stream", "stop", "seed", "logprobs", "top_logprobs", "logit_bias", "add_generation_prompt",
                "tools", "response_format", "min_tokens"]
_TOKENIZER_FIELDS = ["model", "prompt", "messages", "add_special_tokens", "tokens"]
_ENDPOINTS = [("/v1/completions", _COMPLETION_FIELDS, '"prompt": "Hi", "max_tokens": 2'),
              ("/v1/chat/completions", _CHAT_FIELDS, '"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'),
              ("/tokenize", _TOKENIZER_FIELDS, '"prompt": "Hi"'),
              ("/detokenize", _TOKENIZER_FIELDS, '"tokens": [5, 6]')]


@st.composite
def requests(draw):
    path, names, base = draw(st.sampled_from(_ENDPOINTS))
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    parts = [f'"{name}": {draw(st.sampled_from(_WEIRD))}' for name in chosen]
    # the base fields come first so that a fuzzed field of the same name overrides them
    return path, "{" + ", ".join([base] + parts) + "}"


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=requests())
def test_fuzz_every_field_never_5xx(server, case):
    path, raw = case
    r = post(server, path, raw=raw, timeout=120)
    COUNTS["tried"] += 1
    bucket = f"{r.status_code // 100}xx"
    COUNTS[bucket] = COUNTS.get(bucket, 0) + 1
    assert r.status_code < 500, (path, raw[:300], r.text[:300])
    if r.status_code >= 400:
        assert r.json()["error"]["message"]
    elif '"stream": true' in raw:
        assert r.text.rstrip().endswith("data: [DONE]")


def test_after_fuzzing_the_server_is_healthy_and_deterministic(server):
    assert_healthy(server)
    print(f"\nfuzz: {COUNTS}")
