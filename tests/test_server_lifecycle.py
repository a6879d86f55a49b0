"""Server life cycle over real HTTP: 503 while the model loads, the API key, the
queue bound, the launch paths, and a model that fails to load."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from server_harness import REPO, ServerProcess, free_port, metric, sse_events


class InProcessServer:
    """uvicorn on a thread, so the test can hold the model load at a gate."""

    def __init__(self, app):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def wait_health(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "model never became ready"
        time.sleep(0.1)


def gated_app(argv, gate: threading.Event):
    from sarathi.config import EngineConfig
    from sarathi.engine.async_llm_engine import AsyncLLMEngine
    from sarathi.entrypoints.openai.api_server import build_app, make_arg_parser

    args = make_arg_parser().parse_args(argv)
    config = EngineConfig.from_cli_args(args)

    def load():
        assert gate.wait(120)
        return AsyncLLMEngine(config)

    return build_app(args, engine_factory=load)


def test_503_while_loading_then_ready_and_api_key(tiny_model_dir):
    gate = threading.Event()
    app = gated_app(["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--api-key", "s3cret",
                     "--kv-cache-memory", "32MiB", "--max-model-len", "256"], gate)
    auth = {"Authorization": "Bearer s3cret"}
    with InProcessServer(app) as srv:
        r = httpx.get(srv.base_url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["message"]
        assert httpx.get(srv.base_url + "/metrics").status_code == 200
        gate.set()
        wait_health(srv.base_url)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(srv.base_url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.base_url + "/v1/models").status_code == 401
        assert httpx.post(srv.base_url + "/tokenize", json={"prompt": "x"}).status_code == 401
        r = httpx.post(srv.base_url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        import openai
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="s3cret", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url + "/v1", api_key="bad", max_retries=0).models.list()


def test_queue_bound_answers_503_overloaded(tiny_model_dir):
    gate = threading.Event()
    gate.set()
    app = gated_app(["--model", str(tiny_model_dir), "--max-num-seqs", "1", "--max-queue-len", "1",
                     "--kv-cache-memory", "32MiB", "--max-model-len", "512"], gate)
    with InProcessServer(app) as srv:
        wait_health(srv.base_url)
        model = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
        long = {"model": model, "prompt": "busy", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
            with a.stream("POST", srv.base_url + "/v1/completions", json=long) as running:
                first = sse_events(running.iter_lines())  # keep a reference: closing it drops the connection
                next(first)
                with b.stream("POST", srv.base_url + "/v1/completions", json=long) as waiting:
                    assert waiting.status_code == 200
                    deadline = time.monotonic() + 30
                    while metric(httpx.get(srv.base_url + "/metrics").text, "sarathi:num_requests_waiting") < 1:
                        assert time.monotonic() < deadline
                        time.sleep(0.02)
                    r = httpx.post(srv.base_url + "/v1/completions", json={"model": model, "prompt": "x"})
                    assert r.status_code == 503
                    assert r.json()["error"]["code"] == "overloaded"
        # both streams were dropped: the engine is idle again and serves normally
        deadline = time.monotonic() + 10
        while metric(httpx.get(srv.base_url + "/metrics").text, "sarathi:num_requests_running") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


@pytest.mark.parametrize("cmd", [
    ["-m", "sarathi.entrypoints.openai.api_server", "--help"],
    ["-m", "sarathi.entrypoints.openai_server.api_server", "--help"],
    ["-m", "sarathi", "serve", "--help"],
])
def test_launch_paths_share_the_flags(cmd):
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--api-key", "--port", "--max-queue-len", "--model_name", "--model_attention_backend",
                 "--chunk-size", "--kv-cache-memory", "--served-model-name"):
        assert flag in r.stdout


def test_bad_flag_and_failed_load_exit_with_a_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sarathi.entrypoints.openai.api_server", "--scheduler", "fifo"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--scheduler" in r.stderr
    proc = ServerProcess(["--model", str(tmp_path / "no-such-model")], tmp_path / "server.log")
    try:
        assert proc.proc.wait(120) == 1
        assert "no-such-model" in proc.log() and "failed to load" in proc.log()
    finally:
        proc.stop()
