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

from sarathi.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                 TokenizeRequest)
from server_harness import running_server, sse_events

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 2_000_000
FLAGS = ["--served-model-name", "tiny", "--api-key", KEY, "--kv-cache-memory", "64MiB", "--max-model-len", "256",
         "--max-num-seqs", "32", "--max-queue-len", "4", "--max-n", "8", "--max-request-bytes", str(MAX_BYTES),
         "--header-timeout", "1.5", "--body-timeout", "1.5", "--max-prompt-tokens-per-request", "8192"]
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


def test_surrogates_in_any_field_are_a_400(server):
    """The second probe's findings: a lone surrogate in cache_salt used to escape per-request
    isolation and stop the engine; in `model` the 404 could not be encoded (a 500)."""
    for raw, param in (('{"prompt": "Hi", "max_tokens": 4, "cache_salt": "\\ud800"}', "cache_salt"),
                       ('{"model": "\\ud800", "prompt": "Hi"}', "model"),
                       ('{"prompt": "Hi", "response_format": {"type": "\\ud800"}}', "response_format"),
                       ('{"prompt": "Hi", "user": "\\udc00"}', "user"),
                       ('{"prompt": "Hi", "some_new_field": {"deep": ["\\ud800"]}}', "some_new_field")):
        assert_clean_400(post(server, "/v1/completions", raw=raw), param)
    chat = '{"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "\\ud800"}}'
    assert_clean_400(post(server, "/v1/chat/completions", raw=chat), "response_format")
    assert_clean_400(post(server, "/v1/completions", raw='{"prompt": "Hi", "x": ' + "[" * 40 + "]" * 40 + "}"), "x")
    assert_healthy(server)


def test_negative_logit_bias_keys_are_refused(server):
    assert_clean_400(post(server, "/v1/completions", {"prompt": "Hi", "logit_bias": {"-5": 3}}), "logit_bias")


def test_many_long_prompts_in_one_request_are_refused(server):
    """One request of 100 prompts of 8,000 token ids used to run 79 s and stall other streams: here
    100 x 200 ids against --max-prompt-tokens-per-request 8192 (the default is the KV budget in tokens)."""
    ids = [[7] * 200] * 100
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 2})
    assert_clean_400(r, "prompt")
    assert "max-prompt-tokens-per-request" in r.json()["error"]["message"]
    assert_healthy(server)


def test_queue_bound_holds_under_a_burst(server):
    """--max-queue-len 4: twenty requests at once are not all admitted; the rest get 503 with
    Retry-After, and every admitted one completes."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 30, "ignore_eos": True}
    results = []

    def one():
        results.append(post(server, "/v1/completions", body, timeout=120))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    codes = sorted(r.status_code for r in results)
    refused = [r for r in results if r.status_code == 503]
    assert len(results) == 20 and set(codes) <= {200, 503} and refused, codes
    assert all(r.headers.get("retry-after") == "1" and r.json()["error"]["code"] == "overloaded" for r in refused)
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


def _fields(model) -> list:
    """Every field of a request model: a field added to the protocol is fuzzed the day it lands."""
    return sorted(model.model_fields)


def _typed(annotation):
    """A strategy of hostile values of the field's own type (extreme, but well-formed JSON)."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return st.one_of([_typed(a) for a in args])
    if origin is list:
        return st.lists(_typed(args[0]) if args else st.none(), max_size=3).map(json.dumps)
    if origin is dict:
        return st.dictionaries(st.sampled_from(["1", "-1", "99999999", "\ud800", "x"]),
                               st.sampled_from([0, 1, -1e9]), max_size=2).map(json.dumps)
    if annotation is bool:
        return st.sampled_from(["true", "false"])
    if annotation is int:
        return st.sampled_from([0, -1, 1, 2**31, 2**63, -2**63, 2**64]).map(str)
    if annotation is float:
        return st.sampled_from(["0.0", "-0.0", "1e308", "-1e308", "1e-320", "NaN", "Infinity"])
    if annotation is str:
        return st.sampled_from(['""', '"x"', '"\\ud800"', '"\\udfff x"', '"' + "y" * 5000 + '"'])
    return st.sampled_from(["{}", "null", '{"type": "\\ud800"}'])


def _value(model, name):
    return st.one_of(st.sampled_from(_WEIRD), _typed(model.model_fields[name].annotation))


_ENDPOINTS = [("/v1/completions", CompletionRequest, '"prompt": "Hi", "max_tokens": 2'),
              ("/v1/chat/completions", ChatCompletionRequest,
               '"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'),
              ("/tokenize", TokenizeRequest, '"prompt": "Hi"'),
              ("/detokenize", DetokenizeRequest, '"tokens": [5, 6]')]


@st.composite
def requests(draw):
    path, model, base = draw(st.sampled_from(_ENDPOINTS))
    chosen = draw(st.lists(st.sampled_from(_fields(model)), min_size=1, max_size=4, unique=True))
    parts = [f'"{name}": {draw(_value(model, name))}' for name in chosen]
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
