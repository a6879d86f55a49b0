"""Decode GEMV against the memory bandwidth: qlinear at M = 1..8 for each weight format.

Each format is built the way the engine loads it (GGUF raw blocks through formats.from_gguf,
GPTQ / AWQ tensors through formats.from_gptq, int8 from floats), on the linear shapes of the
~1B Llama (hidden 2048, GQA 32/8, intermediate 8192, vocab 32000) and of Gemma 3 270M (hidden
640, q 1024, kv 256, intermediate 2048, vocab 262144). Random weights: the kernels' speed does
not depend on the values. Every call streams its weight from DRAM (each cell cycles through
copies totalling >= --cold-mb, more than the L3). Per cell: the median and the best of N calls
(wall time), and GB/s = packed bytes / time, next to the machine's read bandwidth measured in
the same run (a native-speed sum over 1 GiB with 1 and 2 threads).

    .venv/bin/python benchmarks/decode_gemv.py                    # ~1-2 minutes
    .venv/bin/python benchmarks/decode_gemv.py --models 1b --formats Q4_0 --ms 1 --threads 2
    .venv/bin/python benchmarks/decode_gemv.py --formats Q6_K Q4_K Q5_K Q5_0 --expanded  # + the previous layout

--expanded also times the 5- / 6-bit and K-quant formats in the layout they had before they were
native (int8 blocks for Q5_0 / Q5_K / Q6_K, fp32 sub-scales for Q4_K), the same weights, same run.

Prints a markdown table; writes benchmarks/results/decode_gemv.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402
from sarathi.model_executor.quantization import formats, kernels as qk  # noqa: E402
from vattention_ext.threads import set_native_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # name: {shape: (K in, N out)}
    "1b": {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048),
           "lm_head": (2048, 32000)},
    "gemma": {"qkv": (640, 1536), "o": (1024, 640), "gate_up": (640, 4096), "down": (2048, 640),
              "lm_head": (640, 262144)},
}
BLOCK_ELEMS = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "gptq4-g128": 128}
NATIVE = ("Q4_K", "Q5_0", "Q5_K", "Q6_K")  # packed at the file's size; --expanded: also as before
FORMATS = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "gptq4-g128", "gptq8-g32", "int8")


def gguf_weight(kind: str, N: int, K: int, rng: np.random.Generator) -> formats.QuantTensor:
    """A GGUF tensor of random raw blocks (fp16 fields set to small finite values)."""
    import gguf

    elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, size=(N * K // elems, nbytes), dtype=np.uint8)
    fields = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for off in fields[kind]:  # a random finite fp16 per block
        half = rng.uniform(1e-3, 2e-3, size=raw.shape[0]).astype(np.float16)
        raw[:, off:off + 2] = half.view(np.uint8).reshape(-1, 2)
    return formats.from_gguf(raw.reshape(N, -1), kind, (N, K), f"bench {kind}")


def gptq_weight(bits: int, group: int, N: int, K: int, gen: torch.Generator) -> formats.QuantTensor:
    per = 32 // bits
    qweight = torch.randint(-2**31, 2**31 - 1, (K // per, N), dtype=torch.int32, generator=gen)
    qzeros = torch.randint(-2**31, 2**31 - 1, (K // group, N // per), dtype=torch.int32, generator=gen)
    scales = (torch.rand(K // group, N, generator=gen) * 0.01 + 1e-3).half()
    return formats.from_gptq(qweight, qzeros, scales, None, bits, group, "bench gptq")


def build(fmt: str, N: int, K: int, rng, gen) -> formats.QuantTensor:
    if fmt.startswith("Q"):
        return gguf_weight(fmt, N, K, rng)
    if fmt.startswith("gptq"):
        b, g = fmt[4:].split("-g")
        return gptq_weight(int(b), int(g), N, K, gen)
    if fmt == "int8":
        return formats.quantize_int8(torch.randn(N, K, generator=gen))
    raise KeyError(fmt)


def read_bandwidth(threads: int) -> float:
    """GB/s of torch's sum over 1 GiB, best of 5."""
    torch.set_num_threads(threads)
    a = torch.ones(1 << 28, dtype=torch.float32)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    torch.set_num_threads(max(args_threads_default(), 1))
    return a.numel() * 4 / best / 1e9


def args_threads_default() -> int:
    return os.cpu_count() or 1


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_cell(ws, M, K, N, threads, reps):
    x = torch.randn(M, K)
    out = torch.empty(M, N)
    for w in ws[:2]:
        qk.qlinear(x, w, out=out, num_threads=threads)
    ts = []
    for i in range(reps):
        w = ws[i % len(ws)]
        t = time.perf_counter()
        qk.qlinear(x, w, out=out, num_threads=threads)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def layout(w: qk.PackedWeight) -> str:
    mins = "+min" if w.has_min and not w.implied_min and not w.int_min else "+z8" if w.int_min else ""
    return f"{w.bits}b/B{w.block}{mins}/" + ("super" if w.k_super else "fp16" if w.half_scales else "fp32")


def time_weight(model, shape, fmt, w0, args, bw):
    N, K = w0.shape
    copies = max(1, -(-(args.cold_mb << 20) // w0.nbytes()))
    ws = [w0] + [qk.PackedWeight(w0.data.clone(), w0.bits, w0.block, N, K, w0.has_min, w0.half_scales,
                                 w0.implied_min, w0.int_min, w0.k_super)
                 for _ in range(copies - 1)]
    rows = []
    for T in args.threads:
        set_native_threads(T)
        for M in args.ms:
            med, best = time_cell(ws, M, K, N, T, args.reps)
            row = {"model": model, "shape": shape, "K": K, "N": N, "format": fmt, "M": M, "threads": T,
                   "bytes": w0.nbytes(), "bits_per_weight": 8 * w0.nbytes() / (N * K), "layout": layout(w0),
                   "us_median": med * 1e6, "us_best": best * 1e6,
                   "gbs_median": w0.nbytes() / med / 1e9, "gbs_best": w0.nbytes() / best / 1e9,
                   "frac_of_bw": w0.nbytes() / med / 1e9 / bw[T]}
            rows.append(row)
            print(f"  {model:5s} {shape:7s} {K}x{N} {fmt:10s} {row['layout']:16s} T={T} M={M}: "
                  f"{row['us_median']:8.1f} us (best {row['us_best']:8.1f})  "
                  f"{row['gbs_median']:5.1f} GB/s = {100 * row['frac_of_bw']:3.0f}% of read bw", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--shapes", nargs="+", default=None, help="subset of qkv o gate_up down lm_head")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cold-mb", type=int, default=80)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--expanded", action="store_true", help="also time Q4_K / Q5_0 / Q6_K packed as before")
    ap.add_argument("--out", default=str(RESULTS / "decode_gemv"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    bw = {T: read_bandwidth(T) for T in args.threads}
    print(f"kernel ISA {qk.kernel_isa()}; read bandwidth " + ", ".join(f"{v:.1f} GB/s ({T}T)" for T, v in bw.items())
          + f"; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for model in args.models:
        for shape, (K, N) in MODELS[model].items():
            if args.shapes and shape not in args.shapes:
                continue
            for fmt in args.formats:
                if K % BLOCK_ELEMS.get(fmt, 32):
                    continue  # a K-quant needs K % 256 == 0 (Gemma's 640-input layers are Q5_0 / Q8_0)
                qt = build(fmt, N, K, rng, gen)
                packings = [qk.pack(qt.q, qt.scale, qt.min, qt.bits, qt.block, super_scale=qt.super_scale,
                                    super_min=qt.super_min)]
                if args.expanded and fmt in NATIVE:
                    packings.append(qk.pack(qt.q, qt.scale, qt.min, 8 if qt.bits in (5, 6) else qt.bits, qt.block))
                del qt
                for w0 in packings:
                    rows += time_weight(model, shape, fmt, w0, args, bw)
                del packings, w0
    set_native_threads(None)
    print()
    print("| model | shape (KxN) | format | packed layout | bits/w | T | M | us median | us best | GB/s | % of read bw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['shape']} {r['K']}x{r['N']} | {r['format']} | {r['layout']} | "
              f"{r['bits_per_weight']:.2f} | {r['threads']} | {r['M']} | {r['us_median']:.1f} | {r['us_best']:.1f} | "
              f"{r['gbs_median']:.1f} | {100 * r['frac_of_bw']:.0f} |")
    out = check_result_prefix(args.out)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "kernel_isa": qk.kernel_isa(),
            "read_gbs": {str(T): v for T, v in bw.items()}, "cold_mb": args.cold_mb, "reps": args.reps,
            "loadavg_at_end": os.getloadavg()}
    write_result_file(out.with_suffix(".json"), json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
