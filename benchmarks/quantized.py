"""Quantized weights: quality and engine speed of each format on the embedded model, same run.

    .venv/bin/python benchmarks/data/fetch_python_docs.py     # once: the held-out / calibration text
    .venv/bin/python benchmarks/quantized.py [--windows 40] [--skip-build]

Variants of SmolLM2-135M-Instruct: `none` (fp32, the GGUF dequantised: exact HF parity),
`gguf` (the Q4_1 file's own blocks, as llama.cpp runs it), `int8` (per-channel at load),
and `rtn` / `awq` / `gptq` 4-bit group 128 written by `sarathi quantize` from the fp32 weights
(calibrated on the training split). Quality, teacher-forced over held-out windows through the
engine's prompt scoring (`max_tokens=0, prompt_logprobs=1`): bits per byte, and top-1
agreement with `none` (same argmax at each position). Speed through the offline engine:
single-stream decode and a 32-request decode batch. Prints a table, writes
benchmarks/results/quantized.{json,png}.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "benchmarks" / "data" / "python-docs"

from adaptivocab.outdir import check_result_prefix, write_result_file  # noqa: E402


def variants(args) -> dict:
    """name -> LLM keywords."""
    from sarathi.model_executor.model_loader import cache_root, resolve_model_dir

    base = str(resolve_model_dir(args.model))
    out = {"none": dict(model=args.model, quantization="none"), "gguf": dict(model=args.model, quantization="gguf"),
           "int8": dict(model=args.model, quantization="int8")}
    qdir = cache_root() / "quantized"
    for method in args.methods:
        target = qdir / f"{Path(base).name}-{method}-4bit-g{args.group_size}"
        if not (target / "config.json").is_file():
            if args.skip_build:
                continue
            cmd = [sys.executable, "-m", "sarathi.quantize", "--model", base, "--method", method, "--bits", "4",
                   "--group-size", str(args.group_size), "--calib", str(args.calib), "--out", str(target)]
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"  {method}: {time.perf_counter() - t0:.0f}s", flush=True)
        out[method] = dict(model=str(target), quantization="auto")
    return out


def windows(tokenizer, text: str, n: int, length: int, seed: int = 0):
    """n token windows of `length` from the held-out text, at seeded random offsets."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(0, len(ids) - length), n))
    return [ids[s:s + length] for s in starts]


def score(llm, wins):
    """Teacher-forced: (nats, bytes, top-1 id per position) over the windows (first token unscored)."""
    from sarathi import SamplingParams

    tok = llm.get_tokenizer()
    outs = llm.generate(prompt_token_ids=wins, sampling_params=SamplingParams(max_tokens=0, prompt_logprobs=1))
    nats, nbytes, top1 = 0.0, 0, []
    for w, out in zip(wins, outs):
        for tid, step in zip(w[1:], out.prompt_logprobs[1:]):
            nats -= step[tid].logprob
            top1.append(next(t for t, lp in step.items() if lp.rank == 1))
        nbytes += len(tok.decode(w[1:]).encode("utf-8"))
    return nats, nbytes, top1


def speed(llm, vocab: int, batch: int, prompt_len: int, out_len: int) -> float:
    """Output tokens/s of `batch` requests decoding together (random prompts, ignore_eos)."""
    from sarathi import SamplingParams

    rng = random.Random(1)
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--heldout", default=str(DOCS / "heldout.txt"))
    ap.add_argument("--calib", default=str(DOCS / "train.txt"))
    ap.add_argument("--methods", nargs="*", default=["rtn", "awq", "gptq"])
    ap.add_argument("--group-size", type=int, default=64,
                    help="SmolLM2's hidden size 576 is not a multiple of 128, so 64 (the next that divides it)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--skip-build", action="store_true", help="only variants already quantized")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "quantized"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from sarathi import LLM

    text = Path(args.heldout).read_text(encoding="utf-8")
    runs = variants(args)
    rows, reference_top1, wins = [], None, None
    for name, kwargs in runs.items():
        llm = LLM(max_model_len=1024, max_num_seqs=64, kv_cache_memory="1GiB", **kwargs)
        runner = llm.engine.runner
        if wins is None:
            wins = windows(llm.get_tokenizer(), text, args.windows, args.window_len)
        t0 = time.perf_counter()
        nats, nbytes, top1 = score(llm, wins)
        row = {"variant": name, "quantization": runner.quantization, "bits_per_byte": nats / math.log(2) / nbytes,
               "score_seconds": time.perf_counter() - t0, "weight_bytes": runner.weight_bytes()}
        if reference_top1 is None:
            reference_top1 = top1
        row["top1_agreement"] = sum(a == b for a, b in zip(top1, reference_top1)) / len(top1)
        if not args.skip_speed:
            row["single_stream_tok_s"] = speed(llm, runner.vocab_size, 1, 128, 128)
            row["batch32_tok_s"] = speed(llm, runner.vocab_size, 32, 128, 64)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm, runner
        gc.collect()

    base = rows[0]
    print(f"\nheld-out: {args.windows} windows x {args.window_len} tokens of {Path(args.heldout).name}")
    print("| variant | weights MB | bits/byte | vs none | top-1 agreement | 1-stream tok/s | batch-32 tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['weight_bytes'] / 1e6:.0f} | {r['bits_per_byte']:.4f} | "
              f"{r['bits_per_byte'] / base['bits_per_byte']:.3f}x | {100 * r['top1_agreement']:.1f}% | "
              f"{r.get('single_stream_tok_s', float('nan')):.1f} | {r.get('batch32_tok_s', float('nan')):.1f} |")
    out = check_result_prefix(args.out)  # ~ expanded; a directory in the way is an error
    meta = {"model": args.model, "windows": args.windows, "window_len": args.window_len, "heldout": args.heldout,
            "group_size": args.group_size, "threads": __import__("torch").get_num_threads()}
    write_result_file(out.with_suffix(".json"), json.dumps({"config": meta, "rows": rows}, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in rows]
    a1.bar(names, [r["bits_per_byte"] for r in rows])
    a1.set_ylim(min(r["bits_per_byte"] for r in rows) * 0.95, max(r["bits_per_byte"] for r in rows) * 1.02)
    a1.set_ylabel("held-out bits/byte (lower is better)")
    if not args.skip_speed:
        x = range(len(rows))
        a2.bar([i - 0.2 for i in x], [r["single_stream_tok_s"] for r in rows], width=0.4, label="1 stream")
        a2.bar([i + 0.2 for i in x], [r["batch32_tok_s"] for r in rows], width=0.4, label="batch 32")
        a2.set_xticks(list(x), names)
        a2.set_ylabel("output tok/s")
        a2.legend()
    fig.suptitle("SmolLM2-135M-Instruct: quantized formats (CPU)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
