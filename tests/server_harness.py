"""Helpers for the server tests: a tiny random Llama model directory, a server
subprocess on a free port, and SSE / Prometheus parsing."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m sarathi.entrypoints.openai.api_server ...` on 127.0.0.1:<free port>."""

    def __init__(self, args: List[str], log_path: Path, module: str = "sarathi.entrypoints.openai.api_server",
                 env: Optional[Dict[str, str]] = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1",
                                      "--port", str(self.port), *args],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_listening(self, timeout: float = 120.0) -> None:
        """Until the port answers (any status); /health may still be 503."""
        self._wait(lambda r: True, timeout)

    def wait_ready(self, timeout: float = 300.0) -> None:
        self._wait(lambda r: r.status_code == 200, timeout)

    def _wait(self, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if ok(httpx.get(self.base_url + "/health", timeout=5)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def engine_flags(engine_args: Dict[str, Any]) -> List[str]:
    """LLM(...) keywords -> the same settings as CLI flags."""
    out: List[str] = []
    for key, value in engine_args.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


@contextmanager
def running_server(args: List[str], log_path: Path) -> Iterator[ServerProcess]:
    """A ready server for the duration of the block (stopped even if the start fails)."""
    proc = ServerProcess(args, log_path)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """Parse `data: {...}` lines until `data: [DONE]`; fails if [DONE] never comes."""
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)
    raise AssertionError("stream ended without data: [DONE]")


def metric(text: str, name: str) -> float:
    """Value of an unlabelled Prometheus sample."""
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _is_loopback(addr) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr.ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def assert_loopback_only(procs) -> int:
    """Every inet socket of these processes binds and dials loopback; returns how many dial out."""
    import psutil

    dialled = 0
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            assert _is_loopback(c.laddr), (p.pid, p.name(), c)
            if c.raddr:
                assert _is_loopback(c.raddr), (p.pid, p.name(), c)
                dialled += 1
    return dialled
