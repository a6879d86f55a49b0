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


@pytest.mark.parametrize("flags, message", [
    (["--data-parallel-size", "0"], "data_parallel_size must be >= 1"),
    (["--data-parallel-size", "2"], "needs --distributed-executor-backend ray"),
    (["--distributed-executor-backend", "mp"], "invalid choice"),
    (["--routing", "random"], "invalid choice"),
    (["--routing-max-imbalance", "-1"], "routing_max_imbalance must be >= 0"),
    (["--ray-max-restarts", "-2"], "ray_max_restarts must be >= -1"),
])
def test_bad_scale_out_flags_are_refused(flags, message, capsys):
    from sarathi.entrypoints.openai.api_server import main

    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_server_flag_without_ray_exits_with_the_hint():
    code = ("import sys; sys.modules['ray'] = None; from sarathi.entrypoints.openai.api_server import main; "
            "main(['--data-parallel-size', '2', '--distributed-executor-backend', 'ray'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and HINT in done.stderr, done.stderr


def test_offline_engine_refuses_the_ray_backend():
    pytest.importorskip("ray")
    from sarathi import LLM

    with pytest.raises(ValueError, match="served by the OpenAI server"):
        LLM(distributed_executor_backend="ray", data_parallel_size=2)
