"""End-to-end engine throughput, vattention vs paged KV backend, same run: the
engine-core throughput workloads (benchmarks/throughput.py) through two engines that
differ only in --kv-cache-backend, run alternately (A B A B) so load from other
processes hits both alike; reports each side's best round and the ratio.

    .venv/bin/python benchmarks/kv_backends_throughput.py --scale 0.25   # ~5 minutes on 2 cores

Prints a table and writes benchmarks/results/kv_backends_throughput.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402
from sarathi import LLM, SamplingParams  # noqa: E402
from throughput import make_workload, run_engine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("vattention", "paged")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scale", type=float, default=0.25, help="fraction of the 64 requests to run")
    ap.add_argument("--workloads", default="mixed,decode")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--out", default=str(RESULTS / "kv_backends_throughput"))
    ns = ap.parse_args()

    engines = {b: LLM(model=ns.model, kv_cache_backend=b, max_model_len=2048, max_num_seqs=64,
                      kv_cache_memory=ns.kv_cache_memory, chunk_size=512) for b in BACKENDS}
    vocab = engines["vattention"].engine.runner.vocab_size
    rows = {}
    print(f"{torch.get_num_threads()} torch threads; scale {ns.scale}; best of {ns.rounds} alternating rounds")
    print(f"{'workload':<9} {'vattention tok/s':>17} {'paged tok/s':>12} {'vattn/paged':>12}")
    for name in ns.workloads.split(","):
        prompts, out_len = make_workload(name, vocab, ns.scale, random.Random(0))
        runs = {b: [] for b in BACKENDS}
        for b in BACKENDS:  # warm-up
            engines[b].generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4))
        for _ in range(ns.rounds):
            for b in BACKENDS:
                runs[b].append(run_engine(engines[b], prompts, out_len))
        best = {b: max(r["output_tok_s"] for r in runs[b]) for b in BACKENDS}
        rows[name] = {"requests": len(prompts), "output_len": out_len, "runs": runs, "best_output_tok_s": best,
                      "ratio": best["vattention"] / best["paged"]}
        print(f"{name:<9} {best['vattention']:>17.1f} {best['paged']:>12.1f} {rows[name]['ratio']:>11.2f}x")

    out = check_result_prefix(ns.out)  # ~ expanded; a directory in the way is an error
    write_result_file(out.with_suffix(".json"), json.dumps({"config": vars(ns), "workloads": rows}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(rows)
    width = 0.38
    for i, b in enumerate(BACKENDS):
        ax.bar([x + i * width for x in range(len(names))], [rows[n]["best_output_tok_s"][b] for n in names], width,
               label=b)
    ax.set_xticks([x + width / 2 for x in range(len(names))], names)
    ax.set_ylabel("output tokens/s (best round)")
    ax.set_title("engine throughput by KV backend (SmolLM2, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
