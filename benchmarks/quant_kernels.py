"""Quantized linear kernels vs fp32 and torch.ao dynamic int8, on SmolLM2-135M's linear shapes.

Per shape (K x N: qkv 576x960, o 576x576, gate_up 576x3072, down 1536x576, tied LM head
576x49152) and M (1, 8, 32, 64, 512 rows): time per call of
  fp32   x @ W with W stored [in, out] (the engine today; torch / MKL),
  ao     torch.ao.nn.quantized.dynamic.Linear (fbgemm int8, per-channel weights), if it imports,
  q4     ours, bits 4 with a min and fp16 scales (GGUF Q4_1-like: 5 bits / weight),
  q8     ours, bits 8, no min, fp16 scales (GGUF Q8_0-like: 8.5 bits / weight).
Every thread count in --threads (default 1 and torch's) runs for all variants alike (on a
shared machine torch's OpenMP barrier can cost a time slice per call at 2 threads; our pool
does not wait for a helper that never started). Each variant cycles through enough copies of its weight (>= --cold-mb) that every call
streams the weight from DRAM, as a real decode step does; variants alternate call by call
and the medians are reported. GB/s = weight bytes streamed per call / time, GOP/s =
2 M N K / time. Also measured: memory read bandwidth (torch sum over 1 GiB), a
vpdpbusd int8 peak (all threads at once), and the whole model: one forward's 30 layers x 4
linears + LM head at M = 1 and 32, distinct weights per layer (the engine's floor for a
decode step spent in linear layers).

    .venv/bin/python benchmarks/quant_kernels.py              # ~5 minutes on 2 busy cores
    .venv/bin/python benchmarks/quant_kernels.py --ms 1 32 --shapes gate_up lm_head --threads 1

Prints a markdown table; writes benchmarks/results/quant_kernels.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402
from sarathi.model_executor.quantization import kernels as qk  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTER, LAYERS, VOCAB, HEADS_KV_DIM = 576, 1536, 30, 49152, 192
SHAPES = {  # name: (K in, N out)
    "qkv": (HIDDEN, HIDDEN + 2 * HEADS_KV_DIM),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTER),
    "down": (INTER, HIDDEN),
    "lm_head": (HIDDEN, VOCAB),
}
VARIANTS = ("fp32", "ao", "q4", "q8")


def make_ao():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        return lambda w_in_out: _ao_linear(w_in_out, quantize_dynamic, per_channel_dynamic_qconfig)
    except Exception as e:  # noqa: BLE001 - deprecated API, may be gone
        print(f"torch.ao dynamic quantization unavailable: {e}")
        return None


def _ao_linear(w_in_out, quantize_dynamic, qconfig):
    lin = torch.nn.Linear(w_in_out.shape[0], w_in_out.shape[1], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w_in_out.t())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: qconfig}, dtype=torch.qint8)[0]


def make_q(K, N, bits, gen):
    nb = -(-K // 32)
    if bits == 4:
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
        mn = (torch.randn(N, nb, generator=gen) * 0.01).half().float()
    else:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
        mn = None
    scale = (torch.rand(N, nb, generator=gen) * 0.01 + 1e-4).half().float()
    return qk.pack(q, scale, mn, bits, 32)


def clone_q(w):
    return qk.PackedWeight(w.data.clone(), w.bits, w.block, w.out_features, w.in_features, w.has_min, w.half_scales,
                           w.implied_min, w.int_min)


class Variant:
    """A callable y = f(x) over a rotation of weight copies, and the bytes one call streams."""

    def __init__(self, name, copies, fn, nbytes):
        self.name, self.copies, self.fn, self.nbytes, self.i = name, copies, fn, nbytes, 0

    def __call__(self, x, out):
        w = self.copies[self.i % len(self.copies)]
        self.i += 1
        return self.fn(x, w, out)


def build_variants(K, N, args, gen, ao_factory):
    fp32_bytes = K * N * 4
    copies = lambda nbytes: max(1, -(-(args.cold_mb << 20) // nbytes))  # noqa: E731
    vs = {}
    w32 = [torch.randn(K, N, generator=gen) * 0.02 for _ in range(copies(fp32_bytes))]
    vs["fp32"] = Variant("fp32", w32, lambda x, w, out: torch.matmul(x, w, out=out), fp32_bytes)
    if ao_factory is not None and "ao" in args.variants:
        ao_bytes = K * N + N * 16
        base = w32[0]
        vs["ao"] = Variant("ao", [ao_factory(base) for _ in range(copies(ao_bytes))], lambda x, m, out: m(x), ao_bytes)
    for bits in (4, 8):
        name = f"q{bits}"
        if name not in args.variants:
            continue
        w0 = make_q(K, N, bits, gen)
        ws = [w0] + [clone_q(w0) for _ in range(copies(w0.nbytes()) - 1)]
        vs[name] = Variant(name, ws, lambda x, w, out: qk.qlinear(x, w, out=out), w0.nbytes())
    if "fp32" not in args.variants:
        del vs["fp32"]
    return vs


def time_cell(vs, M, K, N, args):
    x = torch.randn(M, K)
    outs = {n: torch.empty(M, N) for n in vs}
    est = {}
    for n, v in vs.items():  # warm-up, and a time estimate to size the repeats
        v(x, outs[n])
        t = time.perf_counter()
        v(x, outs[n])
        est[n] = time.perf_counter() - t
    # Bursts of BURST calls per variant, the variant order rotating every round: most calls
    # then follow a call of the same variant (as in an engine using one of them), and what a
    # switch costs (torch's OpenMP threads still spinning, say) is spread over all variants.
    burst = 4
    rounds = int(max(args.min_reps, min(args.max_reps, args.cell_seconds / max(burst * sum(est.values()), 1e-6))))
    names = list(vs)
    times = {n: [] for n in vs}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            v = vs[n]
            for _ in range(burst):
                t = time.perf_counter()
                v(x, outs[n])
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(ts) for n, ts in times.items()}, rounds * burst


def memory_bandwidth():
    a = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    a.sum()
    r = []
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        r.append(time.perf_counter() - t)
    b = torch.empty_like(a)
    c = []
    for _ in range(3):
        t = time.perf_counter()
        b.copy_(a)
        c.append(time.perf_counter() - t)
    return {"read_gbs": a.numel() * 4 / statistics.median(r) / 1e9,
            "read_gbs_best": a.numel() * 4 / min(r) / 1e9,
            "copy_gbs": 2 * a.numel() * 4 / statistics.median(c) / 1e9}


def int8_peak(threads):
    """vpdpbusd (or the ISA's int8 step) peak: one measuring loop per thread, all at once."""
    res = [0.0] * threads

    def run(i):
        res[i] = qk.int8_peak_gops(seconds=0.3)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    single = max(qk.int8_peak_gops(seconds=0.3) for _ in range(2))
    return {"all_threads_gops": sum(res), "one_thread_gops": single}


def whole_model(args, gen, ao_factory):
    """One forward's linears: 30 layers x (qkv, o, gate_up, down) + LM head, distinct weights."""
    layer_shapes = [SHAPES[s] for s in ("qkv", "o", "gate_up", "down")]
    models = {}
    models["fp32"] = [[torch.randn(K, N, generator=gen) * 0.02 for K, N in layer_shapes] for _ in range(LAYERS)]
    head32 = torch.randn(HIDDEN, VOCAB, generator=gen) * 0.02
    if ao_factory is not None and "ao" in args.variants:
        models["ao"] = [[ao_factory(w) for w in layer] for layer in models["fp32"]]
        ao_head = ao_factory(head32)
    for bits in (4, 8):
        if f"q{bits}" in args.variants:
            models[f"q{bits}"] = [[make_q(K, N, bits, gen) for K, N in layer_shapes] for _ in range(LAYERS)]
    heads = {"fp32": head32, "q4": make_q(HIDDEN, VOCAB, 4, gen) if "q4" in models else None,
             "q8": make_q(HIDDEN, VOCAB, 8, gen) if "q8" in models else None}
    if "ao" in models:
        heads["ao"] = ao_head
    nbytes = {"fp32": (sum(K * N for K, N in layer_shapes) * LAYERS + HIDDEN * VOCAB) * 4}
    if "ao" in models:
        nbytes["ao"] = sum(K * N + N * 16 for K, N in layer_shapes) * LAYERS + HIDDEN * VOCAB
    for n in ("q4", "q8"):
        if n in models:
            nbytes[n] = sum(w.nbytes() for layer in models[n] for w in layer) + heads[n].nbytes()

    def forward(name, xs, outs):
        for layer in models[name]:
            for (K, N), w in zip(layer_shapes, layer):
                x = xs[K]
                if name == "fp32":
                    torch.matmul(x, w, out=outs[N])
                elif name == "ao":
                    w(x)
                else:
                    qk.qlinear(x, w, out=outs[N])
        x = xs[HIDDEN]
        if name == "fp32":
            torch.matmul(x, heads[name], out=outs[VOCAB])
        elif name == "ao":
            heads[name](x)
        else:
            qk.qlinear(x, heads[name], out=outs[VOCAB])

    result = {}
    for T in args.threads:
        torch.set_num_threads(T)
        result[T] = {}
        for M in args.model_ms:
            xs = {HIDDEN: torch.randn(M, HIDDEN), INTER: torch.randn(M, INTER)}
            outs = {N: torch.empty(M, N) for N in {N for _, N in layer_shapes} | {VOCAB}}
            times = {n: [] for n in models}
            for n in models:
                forward(n, xs, outs)
            names = list(models)
            for r in range(args.model_reps):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    t = time.perf_counter()
                    forward(n, xs, outs)
                    times[n].append(time.perf_counter() - t)
            result[T][M] = {n: {"step_ms": statistics.median(ts) * 1e3, "best_ms": min(ts) * 1e3,
                                "per_token_ms": statistics.median(ts) * 1e3 / M, "weight_mb": nbytes[n] / 1e6,
                                "gbs": nbytes[n] / statistics.median(ts) / 1e9}
                            for n, ts in times.items()}
            print(f"  whole model T={T} M={M}: " + "  ".join(f"{n} {v['step_ms']:.2f} ms" for n, v in result[T][M].items()),
                  flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8, 32, 64, 512])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                    help="thread counts to measure (torch and ours alike)")
    ap.add_argument("--cold-mb", type=int, default=96, help="weight copies per variant total at least this (> L3)")
    ap.add_argument("--cell-seconds", type=float, default=1.0, help="time budget per (shape, M)")
    ap.add_argument("--min-reps", type=int, default=3, help="rounds (of 4 calls per variant) per cell, at least")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--model-ms", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--model-reps", type=int, default=11)
    ap.add_argument("--out", default=str(RESULTS / "quant_kernels"))
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    ao_factory = make_ao() if "ao" in args.variants else None

    torch.set_num_threads(max(args.threads))
    bw = memory_bandwidth()
    peak = {T: int8_peak(T) for T in args.threads}
    print(f"kernel ISA {qk.kernel_isa()}; memory read {bw['read_gbs']:.1f} GB/s (best {bw['read_gbs_best']:.1f}), "
          f"copy {bw['copy_gbs']:.1f} GB/s; int8 peak (thread CPU time) "
          + ", ".join(f"{peak[T]['all_threads_gops']:.0f} GOP/s with {T} threads" for T in args.threads))

    rows = []
    for shape in args.shapes:
        K, N = SHAPES[shape]
        vs = build_variants(K, N, args, gen, ao_factory)
        for T in args.threads:
            torch.set_num_threads(T)
            for M in args.ms:
                med, reps = time_cell(vs, M, K, N, args)
                row = {"shape": shape, "K": K, "N": N, "M": M, "threads": T, "reps": reps}
                for n, t in med.items():
                    row[n] = {"us": t * 1e6, "gbs": vs[n].nbytes / t / 1e9, "gops": 2 * M * N * K / t / 1e9,
                              "weight_bytes": vs[n].nbytes, "copies": len(vs[n].copies)}
                rows.append(row)
                print(f"  {shape:8s} T={T} M={M:<4d} " + "  ".join(f"{n} {row[n]['us']:9.1f} us" for n in med),
                      flush=True)
        del vs

    model = whole_model(args, gen, ao_factory) if args.model_ms else {}

    # Markdown.
    names = [n for n in VARIANTS if any(n in r for r in rows)]
    qn = [n for n in names if n.startswith("q")]
    for T in args.threads:
        print()
        print(f"Per call, {T} thread{'s' if T > 1 else ''} (median us; weights streamed from DRAM)")
        print()
        print("| shape (KxN) | M | " + " | ".join(f"{n} us" for n in names)
              + "".join(f" | {n} GB/s | {n} GOP/s" for n in qn) + " | q4 vs fp32 | q4 vs ao |")
        print("|" + "---|" * (2 + len(names) + 2 * len(qn) + 2))
        for r in rows:
            if r["threads"] != T:
                continue
            cells = [f"{r['shape']} {r['K']}x{r['N']}", str(r["M"])]
            cells += [f"{r[n]['us']:.1f}" if n in r else "-" for n in names]
            for n in qn:
                cells += [f"{r[n]['gbs']:.1f}", f"{r[n]['gops']:.0f}"]
            cells.append(f"{r['fp32']['us'] / r['q4']['us']:.1f}x" if "fp32" in r and "q4" in r else "-")
            cells.append(f"{r['ao']['us'] / r['q4']['us']:.1f}x" if "ao" in r and "q4" in r else "-")
            print("| " + " | ".join(cells) + " |")
    if model:
        print()
        print("Whole model: one forward's linears (30 layers x qkv, o, gate_up, down + LM head), distinct weights")
        print()
        print("| threads | M | variant | step ms (median) | step ms (best) | per token ms | weight MB | GB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for T, per_m in model.items():
            for M, per in per_m.items():
                for n, v in per.items():
                    print(f"| {T} | {M} | {n} | {v['step_ms']:.2f} | {v['best_ms']:.2f} | {v['per_token_ms']:.3f} "
                          f"| {v['weight_mb']:.0f} | {v['gbs']:.1f} |")

    out = check_result_prefix(args.out)  # ~ expanded; a directory in the way is an error
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "median_of": "alternated calls (variants interleaved call by call)",
            "kernel_isa": qk.kernel_isa(), "machine": platform.processor() or platform.machine(),
            "cold_mb": args.cold_mb, "memory": bw, "int8_peak": peak}
    try:
        import os
        meta["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    write_result_file(out.with_suffix(".json"), json.dumps({"config": meta, "rows": rows,
                                                           "whole_model": {str(T): {str(M): v for M, v in per_m.items()} for T, per_m in model.items()}}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    panels = len(shapes) + (1 if model else 0)
    cols = 3
    nrow = (panels + cols - 1) // cols
    fig, axes = plt.subplots(nrow, cols, figsize=(5 * cols, 3.8 * nrow), squeeze=False)
    colors = {"fp32": "tab:gray", "ao": "tab:orange", "q4": "tab:blue", "q8": "tab:green"}
    styles = {T: ls for T, ls in zip(args.threads, ("-", "--", ":", "-."))}
    for ax, shape in zip(axes.flat, shapes):
        rs = [r for r in rows if r["shape"] == shape]
        for T in args.threads:
            for n in names:
                pts = [(r["M"], r[n]["us"]) for r in rs if n in r and r["threads"] == T]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colors[n],
                        linestyle=styles[T], label=f"{n} T={T}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape} ({rs[0]['K']}x{rs[0]['N']})")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("us per call (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    if model:
        ax = axes.flat[len(shapes)]
        groups = [(T, M) for T, per_m in model.items() for M in per_m]
        vnames = list(model[groups[0][0]][groups[0][1]])
        width = 0.8 / len(vnames)
        for i, n in enumerate(vnames):
            ax.bar([g + i * width for g in range(len(groups))], [model[T][M][n]["step_ms"] for T, M in groups], width,
                   color=colors[n], label=n)
        ax.set_xticks([g + width * (len(vnames) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"M={M}, {T} thr" for T, M in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (all linears, median)")
        ax.set_title("whole model: 30 layers + LM head")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(f"SmolLM2-135M linears, {qk.kernel_isa()}; mem read {bw['read_gbs']:.0f} GB/s, int8 peak "
                 + ", ".join(f"{peak[T]['all_threads_gops']:.0f} GOP/s ({T}T)" for T in args.threads))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
