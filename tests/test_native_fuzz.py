"""Fuzz the native extension (vattention_ext._C) through its Python API: every input
must give a result or a Python exception, never a crash (signal) or a hang.

Each fuzz target runs in a subprocess (this file run as a script), many inputs per
process, so a segfault or abort shows up as a negative return code instead of killing
pytest; the child prints each input before running it, so the parent can name the one
that crashed. Inputs come from a seeded random loop mixing sane values with boundary
ones (negative, zero, 2**31, 2**62, 2**63-1, values past int64, ...).

Targets:
  kvcache    KVCache / KVCacheCore construction, reserve_physical_pages, step,
             step_async, alloc/free, slot queries; after every successful step the
             first and last byte of each live sequence's pages are written (a page the
             allocator claims to have mapped but did not would fault).
  attention  AttentionPlan over random caches, batches and tensors (results of valid
             fp32 runs are checked against attention_reference), and the native
             _C.AttentionPlan on raw geometry with huge sizes.

Environment: SARATHI_FUZZ_SEED (default 0), SARATHI_FUZZ_CASES (per target, default 600).

Sanitizers: with an ASan+UBSan build of the extension (see setup.py:
`SARATHI_SANITIZE=1 .venv/bin/python setup.py build_ext --build-lib build/sanitize
--build-temp build/sanitize-tmp`, or SARATHI_FUZZ_SANITIZED_SO=path/to/_C*.so) the same
fuzz runs against it with libasan preloaded; otherwise that part is skipped.
"""
from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("SARATHI_FUZZ_SEED", "0"))
CASES = int(os.environ.get("SARATHI_FUZZ_CASES", "600"))
TIMEOUT_S = 120

BOUNDARY = [-2 ** 63, -2 ** 62, -2 ** 31, -1, 0, 1, 2, 3, 7, 4095, 4096, 4097, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1,
            2 ** 40 + 3, 2 ** 62, 2 ** 63 - 1]
PAST_INT64 = [2 ** 63, 2 ** 64, -2 ** 63 - 1]


# --------------------------------------------------------------------------------------
# Child side: runs the inputs, prints "CASE ..." before each and "SUMMARY {...}" at the end.
# --------------------------------------------------------------------------------------
class Tally:
    def __init__(self):
        self.inputs = 0
        self.ok = 0
        self.errors = Counter()    # clean Python exceptions by type
        self.problems = []         # wrong results or broken invariants (Python-level bugs)

    def call(self, fn, *args, **kwargs):
        """One input: returns (True, result) or (False, exception)."""
        self.inputs += 1
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any Python exception is a clean outcome
            self.errors[type(e).__name__] += 1
            return False, e
        self.ok += 1
        return True, result

    def summary(self) -> dict:
        return {"inputs": self.inputs, "ok": self.ok, "errors": sum(self.errors.values()),
                "error_types": dict(self.errors), "problems": self.problems[:20], "num_problems": len(self.problems)}


def announce(target: str, case: int, desc) -> None:
    sys.stdout.write(f"CASE {target} {case} {desc!r}\n")
    sys.stdout.flush()


def pick(rng: random.Random, sane, p_sane: float = 0.7, past_int64: bool = True):
    """A sane value (a callable or a list to choose from) or a boundary one."""
    if rng.random() < p_sane:
        return sane(rng) if callable(sane) else rng.choice(sane)
    pool = BOUNDARY + (PAST_INT64 if past_int64 and rng.random() < 0.2 else [])
    return rng.choice(pool)


def fuzz_kvcache(rng: random.Random, cases: int, tally: Tally) -> None:
    import ctypes

    import vattention_ext as va

    for case in range(cases):
        cfg = dict(
            num_layers=pick(rng, lambda r: r.randint(1, 3)),
            num_kv_heads=pick(rng, lambda r: r.randint(1, 4)),
            head_dim=pick(rng, [8, 16, 64]),
            max_batch_size=pick(rng, lambda r: r.randint(1, 6)),
            max_context_len=pick(rng, lambda r: r.randint(1, 300)),
            page_size=pick(rng, [4096, 8192, 12288, 65536, 2 << 20]),
            map_ahead_tokens=pick(rng, lambda r: r.randint(0, 64)),
        )
        use_core = rng.random() < 0.4
        if use_core:  # the binding itself, without cache.py's Python-side arithmetic
            cfg["elem_size"] = pick(rng, [2, 4])
            cfg["device"] = rng.choice([-1, -1, -1, -2, -2 ** 31, 2 ** 31])
        else:
            cfg["dtype"] = rng.choice(["float32", "bfloat16"])
        announce("kvcache", case, ("new", use_core, cfg))
        if use_core:
            c = dict(cfg)
            made, cache = tally.call(va._C.KVCacheCore, c.pop("num_layers"), c.pop("num_kv_heads"),
                                     c.pop("head_dim"), c.pop("elem_size"), c.pop("max_batch_size"),
                                     c.pop("max_context_len"), c.pop("page_size"), **c)
            core = cache
        else:
            made, cache = tally.call(va.KVCache, **cfg)
            core = cache._core if made else None
        if not made:
            continue
        budget = pick(rng, lambda r: r.randint(1, 32) * r.choice([4096, 65536, 1 << 20]))
        announce("kvcache", case, ("reserve", budget))
        tally.call(core.reserve_physical_pages, budget)
        nslots, max_ctx = cfg["max_batch_size"], cfg["max_context_len"]
        token_bytes = cfg["num_kv_heads"] * cfg["head_dim"] * cfg.get("elem_size", 4 if cfg.get("dtype") == "float32" else 2)
        regions = core.region_ptrs()
        # Stepping maps (and MAP_POPULATEs) real memory: only with a small pool.
        small_pool = core.stats()["physical_bytes_pool"] <= 64 << 20
        for op_i in range(rng.randint(5, 25)):
            op = rng.choice(["step", "step", "step_async", "alloc", "free", "query", "deferred"])
            if op in ("step", "step_async"):
                n = nslots if rng.random() < 0.9 else rng.choice([0, nslots - 1, nslots + 1])
                lens = [pick(rng, lambda r: r.choice([0, 0, r.randint(0, max_ctx)]), p_sane=0.85) for _ in range(n)]
                if not small_pool and any(isinstance(x, int) and 0 < x for x in lens):
                    continue
                announce("kvcache", case, (op, lens))
                if op == "step":
                    ok, _ = tally.call(core.step, lens, rng.random() < 0.3)
                else:
                    ok, _ = tally.call(core.step_async, lens)
                if ok:
                    # Every live sequence's pages must be mapped and writable in every region.
                    slot_bytes = core.slot_bytes
                    for slot, n_tok in enumerate(lens):
                        if n_tok > 0:
                            for base in regions:
                                start = base + slot * slot_bytes
                                ctypes.memset(start, 1, 1)
                                ctypes.memset(start + n_tok * token_bytes - 1, 1, 1)
            elif op == "alloc":
                n = pick(rng, lambda r: r.randint(0, max_ctx))
                announce("kvcache", case, (op, n))
                tally.call(core.alloc_slot, n)
            elif op == "free":
                s = pick(rng, lambda r: r.randint(0, nslots - 1) if nslots >= 1 else 0)
                announce("kvcache", case, (op, s))
                tally.call(core.free_slot, s)
            elif op == "query":
                s = pick(rng, lambda r: r.randint(0, nslots - 1) if nslots >= 1 else 0)
                announce("kvcache", case, (op, s))
                tally.call(core.slot_blocks, s)
                tally.call(core.slot_active, s)
                tally.call(core.num_free_blocks)
                tally.call(core.stats)
            else:
                on = rng.random() < 0.5
                announce("kvcache", case, (op, on))
                tally.call(core.set_deferred_reclamation, on)
            if rng.random() < 0.2:
                announce("kvcache", case, ("wait_async",))
                tally.call(core.wait_async)
        announce("kvcache", case, ("check_invariants",))
        tally.call(core.wait_async)
        if core.stats()["blocks_total"] > 0:
            ok, err = tally.call(core.check_invariants)
            if not ok:
                tally.problems.append(f"kvcache case {case}: invariants broken: {err}")
        del core, cache


def fuzz_attention(rng: random.Random, cases: int, tally: Tally) -> None:
    import math

    import torch

    from vattention_ext import _C
    from vattention_ext.kernel import AttentionPlan, attention_reference

    torch.manual_seed(rng.randint(0, 2 ** 31))
    for case in range(cases):
        if rng.random() < 0.25:
            # The native plan on raw geometry: sizes nobody could allocate, no tensors.
            geo = dict(num_slots=pick(rng, lambda r: r.randint(0, 4), 0.5, False),
                       max_ctx=pick(rng, lambda r: r.randint(0, 100), 0.5, False),
                       num_kv_heads=pick(rng, lambda r: r.randint(1, 4), 0.6, False),
                       head_dim=pick(rng, [8, 64, 128, 512], 0.6, False),
                       stride_slot=pick(rng, lambda r: r.randint(0, 1 << 20), 0.5, False),
                       stride_token=pick(rng, lambda r: r.randint(0, 1024), 0.5, False),
                       stride_head=pick(rng, lambda r: r.randint(0, 128), 0.5, False),
                       dtype=rng.choice([_C.DType.F32, _C.DType.BF16, _C.DType.F16]),
                       q_dtype=rng.choice([None, _C.DType.F32, _C.DType.BF16, _C.DType.F16]),
                       num_threads=pick(rng, [1, 2], 0.8, False))
            n = rng.randint(0, 4)
            for key in ("slots", "context_lens", "query_lens"):
                geo[key] = [pick(rng, lambda r: r.randint(0, 8), 0.5, False) for _ in range(n)]
            announce("attention", case, ("native", geo))
            ok, plan = tally.call(_C.AttentionPlan, **geo)
            if ok:
                heads = pick(rng, lambda r: geo["num_kv_heads"] * r.randint(1, 4), 0.7, False)
                announce("attention", case, ("native-run-null", heads))
                tally.call(plan.run, 0, 0, 0, 0, 0, 0, heads, 1.0)  # ok only when there is nothing to do
            continue

        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float64])
        num_slots = rng.randint(1, 4) if rng.random() < 0.9 else 0
        max_ctx = rng.randint(1, 80) if rng.random() < 0.9 else 0
        hkv, d = rng.randint(1, 3), rng.choice([1, 8, 16, 40, 64, 128])
        pad = rng.choice([0, 0, 7])  # > 0: caches are views with a longer token stride
        # a half cache under float32 queries (--kv-cache-dtype float16), now and then a refused pair
        kv_dtype = rng.choice([dtype, dtype, torch.float16])
        k_full = torch.randn(num_slots, max_ctx + pad, hkv, d).to(kv_dtype)
        v_full = torch.randn(num_slots, max_ctx + pad, hkv, d).to(kv_dtype)
        kc, vc = k_full[:, :max_ctx], v_full[:, :max_ctx]
        n = rng.randint(0, 5)
        slots, ctx, qlens = [], [], []
        for _ in range(n):
            slots.append(pick(rng, lambda r: r.randint(0, max(0, num_slots - 1)), 0.95))
            c = pick(rng, lambda r: r.randint(0, max(0, max_ctx - 1)), 0.95)
            ctx.append(c)
            room = max_ctx - c if 0 <= c < max_ctx else 1
            qlens.append(pick(rng, lambda r: r.randint(1, max(1, min(room, 20))), 0.95))
        threads = rng.choice([None, None, 1, 2, pick(rng, [1], 0.0, True)])
        announce("attention", case, ("plan", dtype, tuple(kc.shape), kc.stride(), slots, ctx, qlens, threads))
        ok, plan = tally.call(AttentionPlan, kc, slots, ctx, qlens, num_threads=threads, q_dtype=dtype)
        if not ok:
            continue
        T = plan.num_tokens
        for _ in range(rng.randint(1, 3)):
            ratio = rng.choice([1, 1, 2, 3, 65])
            q_shape = [T, hkv * ratio, d]
            mutate = rng.random()
            if mutate < 0.1:
                q_shape[rng.randrange(3)] += rng.choice([-1, 1])
                q_shape = [max(0, x) for x in q_shape]
            q = torch.randn(*q_shape).to(dtype if mutate > 0.05 else torch.float16)
            with_new = rng.random() < 0.7
            kn = torch.randn(T, hkv, d).to(dtype) if with_new else None
            vn = torch.randn(T, hkv, d).to(dtype) if with_new else None
            if with_new and rng.random() < 0.1:
                vn = torch.randn(T + 1, hkv, d).to(dtype)
            if with_new and rng.random() < 0.05:
                kn = None
            out = None
            if rng.random() < 0.2:
                out = torch.empty(*q_shape, dtype=dtype) if rng.random() < 0.8 else torch.empty(1, dtype=dtype)
            caches = (kc, vc)
            if rng.random() < 0.1:
                caches = (kc, torch.randn(num_slots, max_ctx, hkv, d).to(kv_dtype))  # contiguous: other strides if pad
            scale = rng.choice([d ** -0.5, 1.0, 0.0, -3.0, math.inf, math.nan])
            announce("attention", case, ("run", q_shape, str(q.dtype), with_new, None if out is None else tuple(out.shape),
                                         scale))
            ok, res = tally.call(plan.run, q, kn, vn, caches[0], caches[1], scale, out=out)
            if ok and dtype == torch.float32 and math.isfinite(scale) and ratio <= 64 and T > 0:
                ref = attention_reference(q, caches[0], caches[1], slots, ctx, qlens, scale)
                err = (res - ref).abs().max().item()
                if not err <= 1e-3:
                    tally.problems.append(f"attention case {case}: max abs error {err} vs the reference")


def crash_on_purpose(rng: random.Random, cases: int, tally: Tally) -> None:
    """The harness's own check: a segfault in the child must be reported as a crash."""
    import ctypes

    announce("crash", 0, "read address 0")
    ctypes.string_at(0)


def child_main(target: str, seed: int, cases: int, so_path: str | None) -> None:
    if so_path:  # load this build of the extension as vattention_ext._C before the package imports it
        import importlib.util

        spec = importlib.util.spec_from_file_location("vattention_ext._C", so_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["vattention_ext._C"] = module
    sys.path.insert(0, str(ROOT))
    import vattention_ext

    if so_path:
        assert vattention_ext._C.__file__ == so_path, vattention_ext._C.__file__
    tally = Tally()
    rng = random.Random(f"{target}-{seed}")
    {"kvcache": fuzz_kvcache, "attention": fuzz_attention, "crash": crash_on_purpose}[target](rng, cases, tally)
    sys.stdout.write("SUMMARY " + json.dumps(tally.summary()) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# Parent side (pytest).
# --------------------------------------------------------------------------------------
def run_child(target: str, so_path: str | None = None, env_extra: dict | None = None,
              timeout: float = TIMEOUT_S) -> dict:
    env = dict(os.environ)
    env.update(env_extra or {})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", target, str(SEED), str(CASES)]
    if so_path:
        cmd.append(so_path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = [line for line in out.splitlines() if line.startswith("CASE ")][-1:]
        raise AssertionError(f"{target} fuzz hung for {timeout} s; last input: {last}") from None
    lines = proc.stdout.splitlines()
    summary = [line for line in lines if line.startswith("SUMMARY ")]
    if proc.returncode != 0 or not summary:
        last = [line for line in lines if line.startswith("CASE ")][-1:]
        raise AssertionError(f"{target} fuzz child crashed (return code {proc.returncode}); last input: {last}\n"
                             f"stderr tail:\n{proc.stderr[-4000:]}")
    result = json.loads(summary[-1][len("SUMMARY "):])
    result["crashes"] = 0
    result["stderr"] = proc.stderr
    return result


def report(name: str, result: dict) -> None:
    print(f"\n{name}: {result['inputs']} inputs, {result['errors']} clean Python errors, {result['ok']} successes, "
          f"{result['crashes']} crashes; errors by type {result['error_types']}")
    assert result["num_problems"] == 0, result["problems"]
    assert result["ok"] > 0 and result["errors"] > 0, "the fuzz should reach both outcomes"


def sanitized_extension():
    """(path of an ASan build of _C, LD_PRELOAD value), or (None, reason to skip)."""
    so = os.environ.get("SARATHI_FUZZ_SANITIZED_SO")
    if not so:
        found = sorted(glob.glob(str(ROOT / "build" / "sanitize" / "vattention_ext" / "_C*.so")))
        if not found:
            return None, ("no sanitizer build: run `SARATHI_SANITIZE=1 .venv/bin/python setup.py build_ext "
                          "--build-lib build/sanitize --build-temp build/sanitize-tmp` (or set SARATHI_FUZZ_SANITIZED_SO)")
        so = found[-1]
        sources = glob.glob(str(ROOT / "csrc" / "*.cpp")) + glob.glob(str(ROOT / "csrc" / "*.h"))
        newest_source = max(os.path.getmtime(p) for p in sources)
        if os.path.getmtime(so) < newest_source:
            return None, f"the sanitizer build {so} is older than csrc/: rebuild it (see setup.py)"
    try:
        libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, "gcc not found: cannot locate libasan.so to preload"
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        return None, f"libasan.so not found (gcc says {libasan!r})"
    libstdcxx = subprocess.run(["gcc", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    preload = f"{libasan} {libstdcxx}" if os.path.isabs(libstdcxx) and os.path.exists(libstdcxx) else libasan
    return (so, preload), None


# libstdc++ is preloaded too: python does not link it, and ASan's __cxa_throw interceptor
# must find it at start-up or the extension's first C++ exception aborts.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:abort_on_error=1:print_stacktrace=1",
}


if __name__ == "__main__" and len(sys.argv) >= 5 and sys.argv[1] == "--child":
    child_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    sys.exit(0)


import pytest  # noqa: E402  (the child does not need pytest)


def test_harness_reports_a_crash():
    with pytest.raises(AssertionError, match=r"crashed \(return code -11\); last input: .*read address 0"):
        run_child("crash")


@pytest.mark.parametrize("target", ["kvcache", "attention"])
def test_fuzz_never_crashes(target):
    report(target, run_child(target))


@pytest.mark.parametrize("target", ["kvcache", "attention"])
def test_fuzz_never_crashes_under_sanitizers(target):
    found, reason = sanitized_extension()
    if found is None:
        pytest.skip(reason)
    so, preload = found
    result = run_child(target, so, dict(SANITIZER_ENV, LD_PRELOAD=preload), timeout=4 * TIMEOUT_S)
    report(f"{target} (ASan+UBSan)", result)
    assert "runtime error" not in result["stderr"], result["stderr"][-4000:]
