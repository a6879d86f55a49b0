"""Runs loader fuzz cases for tests/test_fuzz_loaders.py, each in a forked child under limits.

Reads one JSON case a line on stdin ({"kind": ..., "path": ..., "stderr": ...}); writes one JSON result a line:
{"outcome": "ok" | "error" | "traceback" | "crash" | "hang", "detail": ...}. The parent imports
torch and the loaders once; each case runs in a fork with an address-space limit and an alarm, so a
case that allocates without bound or never returns is caught and reported, not suffered.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from sarathi.lora.adapter import load_adapter  # noqa: E402
from sarathi.model_executor import model_loader as ml  # noqa: E402

MEMORY_HEADROOM = 3 << 30   # bytes of address space a case may add to the warm parent's
TIME_LIMIT_S = 30


def target(case: dict) -> None:
    """The loader entry point a user reaches with this kind of file."""
    path = case["path"]
    if case["kind"] == "gguf":
        from pathlib import Path

        model_dir = ml.resolve_model_dir(path)
        ml.load_model(model_dir, ml.load_hf_config(model_dir), torch.float32, "cpu", "gguf", Path(path))
    elif case["kind"] in ("safetensors", "gptq"):
        from pathlib import Path

        model_dir = Path(path)
        cfg = ml.load_hf_config(model_dir)
        quantization = ml.pick_quantization("auto", cfg, None) if isinstance(cfg, dict) else "none"
        ml.load_model(model_dir, cfg, torch.float32, "cpu", quantization)
    elif case["kind"] == "adapter":
        shapes = {k: tuple(v) for k, v in case["shapes"].items()}
        load_adapter("fuzz", path, num_layers=case["num_layers"], shapes=shapes, max_rank=case["max_rank"])
    else:
        raise SystemExit(f"unknown kind {case['kind']}")


def child(case: dict, out_fd: int) -> None:
    soft = _vm_bytes() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
    signal.alarm(TIME_LIMIT_S)
    try:
        target(case)
        result = {"outcome": "ok", "detail": ""}
    except ValueError as e:  # the loaders' contract: one line naming the file and the field
        message = str(e)
        result = {"outcome": "error", "detail": message[:2000], "one_line": "\n" not in message}
    except MemoryError:
        result = {"outcome": "crash", "detail": "MemoryError (allocation beyond the limit)"}
    except BaseException as e:  # noqa: BLE001 - a raw exception is what the fuzzer looks for
        result = {"outcome": "traceback", "detail": "".join(traceback.format_exception(e))[-2000:]}
    os.write(out_fd, json.dumps(result).encode() + b"\n")
    os._exit(0)


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def run(case: dict) -> dict:
    r, wfd = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(err, 2)
        child(case, wfd)
    os.close(wfd)
    _, status = os.waitpid(pid, 0)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    seconds = time.monotonic() - t0
    with open(case["stderr"], errors="replace") as f:
        stderr = f.read()
    os.unlink(case["stderr"])
    if data:
        result = json.loads(data.decode())
        if "Traceback" in stderr and result["outcome"] in ("ok", "error"):
            result = {"outcome": "traceback", "detail": "printed to stderr: " + stderr[-2000:]}
    elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        result = {"outcome": "hang", "detail": f"no result in {TIME_LIMIT_S} s"}
    else:
        result = {"outcome": "crash", "detail": f"exit status {status}"}
    result["seconds"] = round(seconds, 3)
    return result


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(run(json.loads(line))) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
