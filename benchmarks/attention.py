"""Decode attention latency per layer: vAttention's slot-contiguous C++ kernel vs the
paged backend (gather the blocks, then the same kernel), through the engine's two KV
backends, at contexts 512 - 8192 with SmolLM2's head shape (Hq=9, Hkv=3, D=64).

Both sides run in the same process on the same machine, alternating call by call; the paged block tables come from the scheduler's KVManager after a shuffle
(blocks of a long-running server are scattered, not consecutive).

    .venv/bin/python benchmarks/attention.py            # ~1-2 minutes
    .venv/bin/python benchmarks/attention.py --contexts 512 4096 --batch 8

Prints a table and writes benchmarks/results/attention.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402
from sarathi.core.kv_manager import KVManager  # noqa: E402
from sarathi.model_executor.kv_cache import KVCacheSpec, StepBatch, kv_backend_class  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(backend: str, batch: int, context: int, args) -> tuple:
    """A one-layer cache holding `batch` sequences of `context` tokens, and a decode step batch."""
    token_bytes = 2 * args.kv_heads * args.head_dim * 4  # K and V, fp32, one layer
    budget = int(batch * (context + 64) * token_bytes * 1.1) + (8 << 20)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=torch.float32,
                       device=torch.device("cpu"), max_model_len=context + 64, max_num_seqs=batch,
                       kv_cache_memory=budget, block_size=args.block_size, async_mapping=False)
    cls = kv_backend_class(backend)
    num_blocks, block_size, slots = cls.layout(spec)
    kv = KVManager(num_blocks, block_size, slots)
    rng = random.Random(0)
    rng.shuffle(kv._free_blocks)  # scattered blocks, as after hours of serving
    cache = cls(spec)
    # Fill the context with a prefill step per sequence (not timed).
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        kv.admit(i, context)
        step = StepBatch(slots=[kv.slot(i)], context_lens=[0], query_lens=[context],
                         block_tables=[list(kv.block_table(i))], num_prefills=1)
        state = cache.begin_step(step)
        k = torch.randn(context, args.kv_heads, args.head_dim, generator=g)
        _store_only(cache, backend, step, state, k, k.clone())
    for i in range(batch):
        kv.grow(i, context + 1)
    decode = StepBatch(slots=[kv.slot(i) for i in range(batch)], context_lens=[context] * batch,
                       query_lens=[1] * batch, block_tables=[list(kv.block_table(i)) for i in range(batch)])
    return cache, cache.begin_step(decode)


def _store_only(cache, backend, step, state, k, v):
    """Write a prefill's K/V into the cache without running attention over it."""
    if backend == "paged":
        cache.store(0, k, v, state)
    else:
        slot, n = step.slots[0], step.query_lens[0]
        cache.k[0][slot, :n] = k
        cache.v[0][slot, :n] = v


def time_decode(sides: dict, args) -> dict:
    """Alternate the backends call by call, so load from other processes hits both alike."""
    g = torch.Generator().manual_seed(1)
    n = args.batch
    q = torch.randn(n, args.heads, args.head_dim, generator=g)
    k = torch.randn(n, args.kv_heads, args.head_dim, generator=g)
    scale = args.head_dim ** -0.5
    times = {name: [] for name in sides}
    for rep in range(args.repeats + 2):
        for name, (cache, decode) in sides.items():
            t0 = time.perf_counter()
            cache.attend(0, q, k, k, decode, scale)
            if rep >= 2:  # the first two are warm-up
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--batch", type=int, default=16, help="decoding sequences per step")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16, help="paged backend tokens per block")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", default=str(RESULTS / "attention"))
    args = ap.parse_args()

    rows = []
    print(f"decode attention, one layer, batch {args.batch}, Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim}, "
          f"fp32, {torch.get_num_threads()} threads (median of {args.repeats})")
    print(f"{'context':>8} {'vattention ms':>14} {'paged ms':>10} {'paged/vattn':>12}")
    for ctx in args.contexts:
        sides = {backend: build(backend, args.batch, ctx, args) for backend in ("vattention", "paged")}
        res = time_decode(sides, args)
        for cache, _ in sides.values():
            cache.close()
        del sides
        va, pg = statistics.median(res["vattention"]), statistics.median(res["paged"])
        rows.append({"context": ctx, "vattention_ms": va * 1e3, "paged_ms": pg * 1e3, "speedup": pg / va,
                     "vattention_samples_ms": [x * 1e3 for x in res["vattention"]],
                     "paged_samples_ms": [x * 1e3 for x in res["paged"]]})
        print(f"{ctx:>8} {va * 1e3:>14.3f} {pg * 1e3:>10.3f} {pg / va:>11.2f}x")

    out = check_result_prefix(args.out)  # ~ expanded; a directory in the way is an error
    meta = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
            "block_size": args.block_size, "dtype": "float32", "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "repeats": args.repeats}
    write_result_file(out.with_suffix(".json"), json.dumps({"config": meta, "rows": rows}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["context"] for r in rows], [r["vattention_ms"] for r in rows], "o-", label="vattention (slot-contiguous)")
    ax.plot([r["context"] for r in rows], [r["paged_ms"] for r in rows], "s-", label="paged (block 16, gather)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode attention per layer (ms)")
    ax.set_title(f"decode attention, batch {args.batch}, CPU fp32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
