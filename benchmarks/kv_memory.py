"""KV memory: vattention vs paged (block 16) vs naive max-length preallocation
(the `contiguous` backend) on one workload of mixed prompt/output lengths, plus the
per-step page-mapping overhead of synchronous vs asynchronous mapping.

Part 1 drives the engine's real KV backends (vattention twice: with the engine's
deferred reclamation, and with eager freeing that returns finished sequences' pages
to the OS) (begin_step maps pages / builds block
indices) under the scheduler's torch-free KVManager with a fixed KV budget: FCFS
admission, whole-prompt prefill, one token per decode step, recompute preemption
when blocks run out. No model runs; memory is what the kernel reports: Rss in
/proc/self/smaps of the vattention reservations (and the memfd pool's blocks), and of
the paged / naive tensors. Part 2 decodes a batch with the C++ attention kernel over
all layers as the work between steps and times the mapping calls.

    .venv/bin/python benchmarks/kv_memory.py        # ~2-4 minutes

Prints tables and writes benchmarks/results/kv_memory.{json,png}.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vattention_ext  # noqa: E402
from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402
from sarathi.core.kv_manager import KVManager  # noqa: E402
from sarathi.model_executor.kv_cache import KVCacheSpec, StepBatch, kv_backend_class  # noqa: E402
from vattention_ext.kernel_memory import mincore_resident_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20


def make_spec(args, backend_async=True) -> KVCacheSpec:
    return KVCacheSpec(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                       dtype=torch.float32, device=torch.device("cpu"), max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, kv_cache_memory=args.budget_mib * MIB,
                       block_size=16, page_size=args.page_size, async_mapping=backend_async)


def workload(args) -> list:
    rng = random.Random(args.seed)
    reqs = []
    for _ in range(args.requests):
        p = rng.randint(args.min_prompt, args.max_prompt)
        o = rng.randint(args.min_output, args.max_output)
        reqs.append((p, min(o, args.max_model_len - p)))
    return reqs


def committed_bytes(backend: str, cache) -> dict:
    """Kernel-reported resident bytes of the backend's KV memory: smaps Rss of the
    vattention reservations (plus the memfd pool's allocated blocks), mincore(2) over
    the paged / naive tensors."""
    if backend.startswith("vattention"):
        st = cache.cache.stats()
        return {"committed": st["rss_bytes_mapped"], "pool_resident": st["pool_resident_bytes"],
                "mapped": st["pages_mapped"] * st["page_size"],
                "reclaimable": st["pages_reclaimable"] * st["page_size"]}
    rss = sum(mincore_resident_bytes(t.data_ptr(), t.numel() * t.element_size()) for t in (cache.k, cache.v))
    return {"committed": rss, "pool_resident": rss, "mapped": rss, "reclaimable": 0}


def run_backend(name: str, args, reqs) -> dict:
    """name: vattention (engine default: deferred reclamation), vattention-eager (finished
    sequences' pages go back to the OS at once), paged, contiguous."""
    backend = name.split("-")[0]
    spec = make_spec(args)
    cls = kv_backend_class(backend)
    num_blocks, block_size, num_slots = cls.layout(spec)
    kv = KVManager(num_blocks, block_size, min(num_slots, args.max_num_seqs))
    cache = cls(spec)
    if name == "vattention-eager":
        cache.cache.set_deferred_reclamation(False)
    token_bytes = spec.bytes_per_token
    waiting = collections.deque(range(len(reqs)))
    running: list = []  # admission order
    ctx, done_tokens = {}, {}
    samples, max_running, preemptions, step = [], 0, 0, 0
    worst_unused_ratio = 0.0
    while waiting or running:
        # Decodes first, oldest first: room for one more token each, preempting the newest if needed.
        for sid in list(running):
            if sid not in running:
                continue
            while sid in running and not kv.can_grow(sid, ctx[sid] + 1):
                victim = running.pop()
                cache.free_slot(kv.free(victim))
                ctx[victim], done_tokens[victim] = 0, 0
                waiting.appendleft(victim)
                preemptions += 1
            if sid in running:
                kv.grow(sid, ctx[sid] + 1)
        decodes = list(running)
        prefills = []
        while waiting and kv.can_admit(reqs[waiting[0]][0]):
            sid = waiting.popleft()
            kv.admit(sid, reqs[sid][0])
            prefills.append(sid)
        if not prefills and not decodes:
            raise SystemExit(f"{backend}: the KV budget cannot hold request {waiting[0]} ({reqs[waiting[0]]})")
        seqs = prefills + decodes
        batch = StepBatch(slots=[kv.slot(s) for s in seqs],
                          context_lens=[0] * len(prefills) + [ctx[s] for s in decodes],
                          query_lens=[reqs[s][0] for s in prefills] + [1] * len(decodes),
                          block_tables=[list(kv.block_table(s)) for s in seqs] if backend == "paged" else None,
                          num_prefills=len(prefills))
        cache.begin_step(batch)
        for s, n in zip(seqs, batch.query_lens):
            ctx[s] = ctx.get(s, 0) + n
            done_tokens[s] = done_tokens.get(s, 0) + 1
        running.extend(prefills)
        max_running = max(max_running, len(running))
        live_tokens = sum(ctx[s] for s in running)
        if step % args.sample_every == 0:
            m = committed_bytes(name, cache)
            row = {"step": step, "running": len(running), "live_bytes": live_tokens * token_bytes, **m}
            if backend == "vattention":
                page = cache.cache.stats()["page_size"]
                regions = 2 * args.layers
                unused = m["mapped"] - m["reclaimable"] - live_tokens * token_bytes
                bound = len(running) * regions * page
                row["unused_live_bytes"] = unused
                row["unused_bound_bytes"] = bound
                if bound:
                    worst_unused_ratio = max(worst_unused_ratio, unused / bound)
            samples.append(row)
        for s in list(running):
            if done_tokens[s] >= reqs[s][1]:
                running.remove(s)
                cache.free_slot(kv.free(s))
        step += 1
    final = committed_bytes(name, cache)
    out = {"backend": name, "layout": {"num_blocks": num_blocks, "block_size_tokens": block_size,
                                          "num_slots": min(num_slots, args.max_num_seqs)},
           "steps": step, "max_running": max_running, "preemptions": preemptions,
           "peak_committed": max(r["committed"] for r in samples), "final": final,
           "mean_committed": statistics.mean(r["committed"] for r in samples),
           "mean_live": statistics.mean(r["live_bytes"] for r in samples), "samples": samples}
    if backend == "vattention":
        out["page_size"] = cache.cache.stats()["page_size"]
        out["worst_unused_over_bound"] = worst_unused_ratio
    cache.close()
    return out


def mapping_overhead(args, use_async: bool) -> dict:
    """Decode args.map_batch sequences for args.map_steps steps; the C++ attention kernel over
    all layers is the work between steps. Returns the time spent in the mapping calls."""
    L, H, D = args.layers, args.kv_heads, args.head_dim
    token_bytes = H * D * 4
    max_ctx = args.map_start + args.map_warmup + args.map_steps + 8
    budget = int(args.map_batch * max_ctx * token_bytes * 2 * L * 1.3)  # room for map-ahead
    cache = vattention_ext.KVCache(L, H, D, args.map_batch, max_ctx, page_size=args.page_size,
                                   kv_cache_memory=budget)
    rng = random.Random(1)
    lens = [rng.randint(args.map_start // 2, args.map_start) for _ in range(args.map_batch)]
    cache.step(lens)  # the prompts: mapped before timing starts
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.map_batch, 3 * H, D, generator=g)
    kn = torch.randn(args.map_batch, H, D, generator=g)
    slots = torch.arange(args.map_batch)
    qlens = torch.ones(args.map_batch, dtype=torch.int64)
    times = []

    def one_step(timed: bool):
        nonlocal lens
        ctx = torch.tensor(lens, dtype=torch.int64)
        new_lens = [n + 1 for n in lens]
        t0 = time.perf_counter()
        if use_async:
            cache.step_async(new_lens)
        else:
            cache.step(new_lens)
        if timed:
            times.append(time.perf_counter() - t0)
        for layer in range(L):  # the forward pass's attention over the slots
            vattention_ext.attention(q, cache.k_cache(layer), cache.v_cache(layer), slots, ctx, qlens, 0.125,
                                     k_new=kn, v_new=kn)
        lens = new_lens

    # Warm-up (untimed): async mode's first call maps one page ahead for every slot at once.
    for _ in range(args.map_warmup):
        one_step(False)
    cache.wait_async()
    before = cache.stats()
    t_loop = time.perf_counter()
    for _ in range(args.map_steps):
        one_step(True)
    loop_s = time.perf_counter() - t_loop
    cache.wait_async()
    after = cache.stats()
    cache.close()
    d = {k: after[k] - before[k] for k in ("sync_blocks_mapped", "sync_map_ns", "async_blocks_mapped", "async_map_ns")}
    return {"async": use_async, "steps": args.map_steps, "mean_step_call_ms": statistics.mean(times) * 1e3,
            "median_step_call_ms": statistics.median(times) * 1e3, "total_call_ms": sum(times) * 1e3,
            "blocks_mapped_in_step": d["sync_blocks_mapped"], "mapping_ms_in_step": d["sync_map_ns"] / 1e6,
            "blocks_mapped_background": d["async_blocks_mapped"], "mapping_ms_background": d["async_map_ns"] / 1e6,
            "tokens_per_page": args.page_size // token_bytes, "decode_loop_s": loop_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budget-mib", type=int, default=512, help="physical KV budget for every backend")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=None, help="vattention page bytes (default: extension's)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=768)
    ap.add_argument("--min-output", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-every", type=int, default=5)
    ap.add_argument("--map-batch", type=int, default=32)
    ap.add_argument("--map-steps", type=int, default=200)
    ap.add_argument("--map-start", type=int, default=400)
    ap.add_argument("--map-warmup", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "kv_memory"))
    args = ap.parse_args()
    if args.page_size is None:
        args.page_size = vattention_ext.default_page_size(args.kv_heads * args.head_dim * 4, args.budget_mib * MIB)

    reqs = workload(args)
    print(f"workload: {len(reqs)} requests, prompts {args.min_prompt}-{args.max_prompt}, outputs "
          f"{args.min_output}-{args.max_output} tokens; KV budget {args.budget_mib} MiB; {args.layers} layers x "
          f"{args.kv_heads} KV heads x {args.head_dim} (fp32); vattention page {args.page_size} B")
    results = {}
    for name in ("vattention", "vattention-eager", "paged", "contiguous"):
        results[name] = run_backend(name, args, reqs)
    names = {"vattention": "vattention", "vattention-eager": "vattention eager", "paged": "paged (block 16)",
             "contiguous": "naive max-length"}
    print(f"\n{'backend':<18} {'max concurrent':>14} {'steps':>6} {'preempt':>8} {'peak committed MiB':>19} "
          f"{'mean committed MiB':>19} {'mean live MiB':>14}")
    for b, r in results.items():
        print(f"{names[b]:<18} {r['max_running']:>14} {r['steps']:>6} {r['preemptions']:>8} "
              f"{r['peak_committed'] / MIB:>19.1f} {r['mean_committed'] / MIB:>19.1f} {r['mean_live'] / MIB:>14.1f}")
    for b in ("vattention", "vattention-eager"):
        r = results[b]
        print(f"{names[b]}: committed-but-unused (excluding reclaimable pages) at most "
              f"{r['worst_unused_over_bound']:.2f} x one page per active slot per K/V region; "
              f"memfd pool resident at the end: {r['final']['pool_resident'] / MIB:.1f} MiB")
    va = results["vattention-eager"]

    mapping = [mapping_overhead(args, False), mapping_overhead(args, True)]
    sync, asyn = mapping
    hidden = 1.0 - asyn["mapping_ms_in_step"] / sync["mapping_ms_in_step"] if sync["mapping_ms_in_step"] else 0.0
    print(f"\nper-step mapping ({args.map_batch} decoding sequences, {args.map_steps} steps, "
          f"{args.page_size // (args.kv_heads * args.head_dim * 4)} tokens/page, attention over "
          f"{args.layers} layers between steps)")
    print(f"{'mode':<6} {'blocks mapped in step':>22} {'mapping ms in step':>19} {'blocks in background':>21} "
          f"{'background ms':>14} {'step call ms (median/mean)':>27} {'whole loop s':>13}")
    for m in mapping:
        print(f"{'async' if m['async'] else 'sync':<6} {m['blocks_mapped_in_step']:>22} {m['mapping_ms_in_step']:>19.1f} "
              f"{m['blocks_mapped_background']:>21} {m['mapping_ms_background']:>14.1f} "
              f"{m['median_step_call_ms']:>13.3f} / {m['mean_step_call_ms']:<11.3f} {m['decode_loop_s']:>13.2f}")
    print(f"async mapping hides {hidden * 100:.1f}% of the mapping time the steps spent with sync mapping "
          f"(mean step-call wall time {sync['mean_step_call_ms']:.3f} -> {asyn['mean_step_call_ms']:.3f} ms)")

    out = check_result_prefix(args.out)  # ~ expanded; a directory in the way is an error
    write_result_file(out.with_suffix(".json"), json.dumps(
        {"config": vars(args), "backends": results, "mapping": mapping, "async_hidden_fraction": hidden}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for b, r in results.items():
        s = r["samples"]
        ax1.plot([x["step"] for x in s], [x["committed"] / MIB for x in s], label=f"{names[b]} committed")
        ax2.plot([x["step"] for x in s], [x["running"] for x in s], label=names[b])
    s = va["samples"]
    ax1.plot([x["step"] for x in s], [x["live_bytes"] / MIB for x in s], "k:", label="live KV (vattention run)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("MiB (kernel Rss)")
    ax1.set_title("physical KV memory committed")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("running sequences")
    ax2.set_title(f"concurrency under a {args.budget_mib} MiB budget")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
