"""Decode at concurrency 1 against the memory-bandwidth bound, both measured in the same run.

    .venv/bin/python benchmarks/bandwidth_bound.py --model /tmp/llama-1b-random-q4_0.gguf   # ~2 minutes

The bound is the bytes one decode step must stream (every linear layer's packed weights, the LM
head included, plus the KV cache the attention reads at that context) over the machine's read
bandwidth (a native-speed sum over 1 GiB, best of 5, benchmarks/decode_gemv.py's measure, with the
engine's thread count). Rounds alternate a bandwidth measure and --steps offline decode steps of one
sequence (the engine's own step: scheduler, model, sampler; no server), so a machine that slows down
mid-run moves both. Reports the median step, the median bandwidth, the bound and their ratio (the
issue's target: a step within 1.4x of the bound on a ~1B model). Writes
benchmarks/results/bandwidth_bound.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF file or model name (default: embedded)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kv-cache-dtype", default="float16")
    p.add_argument("--out", default=str(HERE / "results" / "bandwidth_bound"))
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.prompt_len < 1:
        raise SystemExit("--steps, --rounds and --prompt-len must be >= 1")
    out = check_result_prefix(args.out)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does

    import torch

    from decode_gemv import read_bandwidth
    from format_table import linear_bytes
    from sarathi import SamplingParams
    from sarathi.config import EngineConfig
    from sarathi.engine.llm_engine import LLMEngine
    from vattention_ext.threads import native_threads

    engine = LLMEngine(EngineConfig.from_kwargs(model=args.model, max_num_seqs=1, kv_cache_dtype=args.kv_cache_dtype))
    runner = engine.runner
    weight_bytes, weights = linear_bytes(runner)
    rng = random.Random(0)
    ids = [rng.randrange(3, runner.vocab_size) for _ in range(args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.rounds * (args.steps + 1) + 8, ignore_eos=True)
    engine.add_request("r0", None, params, prompt_token_ids=ids)
    while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    threads = native_threads()             # the kernels' threads: the bandwidth is measured with as many
    torch_threads = torch.get_num_threads()
    steps, bws, ctx = [], [], []
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        bws.append(read_bandwidth(threads))
        torch.set_num_threads(torch_threads)   # the engine's own setting back
        ctx.append(engine.scheduler.running[0].num_tokens)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        steps.append((time.perf_counter() - t0) / args.steps)
    # K and V of every layer at the mean context (sliding-window layers read less: an upper bound there)
    kv_bytes = runner.kv_bytes_per_token * (statistics.mean(ctx) + args.steps / 2)
    step, bw = statistics.median(steps), statistics.median(bws)
    bound = (weight_bytes + kv_bytes) / (bw * 1e9)
    row = {"model": args.model, "formats": runner.formats, "weights": weights, "weight_mb_per_token": weight_bytes / 1e6,
           "kv_mb_per_token": kv_bytes / 1e6, "threads": threads, "read_gbs_median": bw, "read_gbs_rounds": bws,
           "step_ms_median": 1e3 * step, "step_ms_rounds": [1e3 * s for s in steps], "bound_ms": 1e3 * bound,
           "ratio_to_bound": step / bound, "prompt_len": args.prompt_len, "steps": args.steps, "rounds": args.rounds,
           "kv_cache_dtype": args.kv_cache_dtype, "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    print(f"{args.model}: {weight_bytes / 1e6:.1f} MB of weights + {kv_bytes / 1e6:.1f} MB of KV per token; "
          f"read bandwidth {bw:.1f} GB/s ({threads} threads; rounds {', '.join(f'{b:.1f}' for b in bws)})")
    print(f"decode step {1e3 * step:.2f} ms (rounds {', '.join(f'{1e3 * s:.1f}' for s in steps)}); bound "
          f"{1e3 * bound:.2f} ms; step / bound = {step / bound:.2f}")
    write_result_file(out.with_suffix(".json"), json.dumps(row, indent=1))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
