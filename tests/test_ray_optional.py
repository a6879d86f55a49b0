"""Ray is an optional extra: without it, asking for the Ray backend fails with an install hint."""
from __future__ import annotations

import subprocess
import sys

import pytest

from sarathi.config import EngineConfig
from server_harness import REPO

HINT = "pip install -e '.[ray]'"


def test_config_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # as if Ray were not installed
    with pytest.raises(ValueError, match=r"pip install -e '\.\[ray\]'"):
        EngineConfig(distributed_executor_backend="ray", data_parallel_size=2)
    with pytest.raises(ValueError, match="needs --distributed-executor-backend ray"):
        EngineConfig(data_parallel_size=2)


def test_server_flag_without_ray_exits_with_the_hint():
    code = ("import sys; sys.modules['ray'] = None; from sarathi.entrypoints.openai.api_server import main; "
            "main(['--data-parallel-size', '2', '--distributed-executor-backend', 'ray'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and HINT in done.stderr, done.stderr
