"""The multi-node path on one machine: `ray start --head` on 127.0.0.1 in a subprocess, then the
OpenAI server joins it with --ray-address and serves two replicas of the tiny model through HTTP.

Ray's processes are found by the temp dir this test gives them and ended by pid; every socket
they (and the server) hold must be on 127.0.0.1. Every wait is bounded.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from server_harness import REPO, ServerProcess, assert_loopback_only, free_port, metric, sse_events  # noqa: E402

MODEL = "tiny"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}   # Ray keeps 127.0.0.1 as the node address


def ray_processes(temp: str):
    """Every process of this Ray cluster: those naming its temp dir, and their descendants."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(temp in arg for arg in (p.info["cmdline"] or [])):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="srh-", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    # Ray's token authentication, with this cluster's own token (a driver joining by address needs it)
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = dict(os.environ, **LOOPBACK_ENV, **auth, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    ray_cli = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
    started = subprocess.run([*ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
                              "--object-store-memory=100000000", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}", temp, auth
    finally:
        stop_processes(ray_processes(temp))
        shutil.rmtree(temp, ignore_errors=True)


def stop_processes(procs) -> None:
    """SIGTERM, then SIGKILL what still runs after 5 s (daemons reparented away stay zombies)."""
    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(running(p) for p in procs):
        time.sleep(0.2)
    for p in filter(running, procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def server(cluster, tiny_model_dir, tmp_path_factory):
    address, _, auth = cluster
    args = ["--model", str(tiny_model_dir), "--served-model-name", MODEL, "--data-parallel-size", "2",
            "--distributed-executor-backend", "ray", "--ray-address", address, "--num-threads", "1",
            "--max-num-seqs", "16", "--chunk-size", "64", "--kv-cache-memory", "64MiB", "--max-model-len", "512"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("ray-server") / "server.log", env={**LOOPBACK_ENV, **auth})
    try:
        proc.wait_ready(timeout=300)
        yield proc
    finally:
        proc.stop()


def health(server) -> dict:
    return httpx.get(server.base_url + "/health", timeout=10).json()


def labelled(text: str, name: str, replica: int) -> float:
    m = re.search(rf'^{re.escape(name)}{{replica="{replica}"}} ([0-9.eE+-]+)$', text, re.M)
    assert m, f"{name}{{replica={replica}}} not in /metrics"
    return float(m.group(1))


def test_health_lists_both_replicas(server):
    h = health(server)
    assert h["status"] == "ok" and [r["replica"] for r in h["replicas"]] == [0, 1]
    assert all(r["up"] and r["pid"] > 0 for r in h["replicas"]), h


def test_streamed_greedy_answers_agree_across_replicas_and_metrics_have_replica_labels(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=60)
    texts = []
    for _ in range(4):
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}],
                                                max_tokens=12, temperature=0, stream=True)
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert len(set(texts)) == 1 and texts[0]
    deadline = time.monotonic() + 10   # replica gauges are polled every 0.5 s
    while time.monotonic() < deadline:
        text = httpx.get(server.base_url + "/metrics").text
        per_replica = sum(labelled(text, "sarathi:replica_generation_tokens_total", i) for i in (0, 1))
        if per_replica >= 48:
            break
        time.sleep(0.2)
    assert metric(text, "sarathi:generation_tokens_total") == per_replica >= 48
    assert all(labelled(text, "sarathi:replica_requests_routed_total", i) >= 1 for i in (0, 1))
    assert all(labelled(text, "sarathi:replica_up", i) == 1 for i in (0, 1))
    for i in (0, 1):   # each Ray item carries at least one output
        assert labelled(text, "sarathi:replica_stream_outputs_total", i) >= \
            labelled(text, "sarathi:replica_stream_items_total", i) >= 1


def test_disconnect_aborts_on_the_replica(server):
    url = server.base_url
    before = httpx.get(url + "/metrics").text
    aborted = [labelled(before, "sarathi:replica_requests_aborted_total", i) for i in (0, 1)]
    body = {"model": MODEL, "prompt": "Keep going", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as resp:
            events = sse_events(resp.iter_lines())
            for _ in range(3):
                next(events)
            busy = [r["replica"] for r in health(server)["replicas"] if r["outstanding_requests"] == 1]
            events.close()   # drops the connection mid-stream
    assert len(busy) == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        now = [labelled(text, "sarathi:replica_requests_aborted_total", i) for i in (0, 1)]
        if now[busy[0]] == aborted[busy[0]] + 1 and metric(text, "sarathi:num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert now[busy[0]] == aborted[busy[0]] + 1 and now[1 - busy[0]] == aborted[1 - busy[0]], (aborted, now)
    assert metric(text, "sarathi:num_requests_running") == 0


def test_no_ray_or_server_socket_leaves_loopback(server, cluster):
    _, temp, _ = cluster
    server_procs = [psutil.Process(server.proc.pid)] + psutil.Process(server.proc.pid).children(recursive=True)
    procs = ray_processes(temp) + server_procs
    assert len(procs) >= 6   # gcs, raylet, agents, two replicas, the server
    assert assert_loopback_only(procs) > 0


def test_killed_replica_gives_503_or_retries_and_health_degrades_then_recovers(server):
    url = server.base_url
    victim = health(server)["replicas"][0]
    body = {"model": MODEL, "prompt": "Tell a long story", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", url + "/v1/completions", json=dict(body, prompt=f"Story {i}"))
                   for i in range(4)]
        responses = [s.__enter__() for s in streams]
        events = [sse_events(r.iter_lines()) for r in responses]
        for e in events:
            next(e)                       # every stream has output (so none is retried)
        os.kill(victim["pid"], signal.SIGKILL)
        outcomes = []
        for e in events:                  # each one ends: finished, or an OpenAI-shaped error event
            last = None
            for last in e:
                pass
            outcomes.append(last)
        for s in streams:
            s.__exit__(None, None, None)
    errors = [o["error"] for o in outcomes if "error" in o]
    assert errors and all(e["code"] == "replica_unavailable" and e["type"] == "server_unavailable" for e in errors)
    assert len(errors) < 4    # the other replica's streams finished
    degraded = health(server)
    assert degraded["status"] == "degraded" and not degraded["replicas"][0]["up"], degraded
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "while one is down", "max_tokens": 4},
                    timeout=60)
    assert ok.status_code == 200, ok.text   # the endpoint keeps serving during the restart
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and health(server)["status"] != "ok":
        time.sleep(0.5)
    back = health(server)
    assert back["status"] == "ok" and back["replicas"][0]["restarts"] == 1 and back["replicas"][0]["pid"] != victim["pid"]
    for i in range(4):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": f"after {i}", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
