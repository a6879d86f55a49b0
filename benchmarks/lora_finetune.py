"""Fine-tune the embedded SmolLM2 on the Python-docs corpus with LoRA on the float base and
QLoRA on a 4-bit NF4 base, for the same CPU time each; held-out bits/byte before and after
(scored by our engine with the adapter unmerged), training tokens/s and memory.

    .venv/bin/python benchmarks/data/fetch_python_docs.py      # once
    .venv/bin/python benchmarks/lora_finetune.py --budget-min 15

Prints a table, writes benchmarks/results/lora-finetune.json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from quantized import windows  # noqa: E402  (seeded held-out windows)


def chunks(text: str, size: int):
    """Paragraph-aligned pieces of about `size` characters."""
    out, cur = [], []
    for para in text.split("\n\n"):
        cur.append(para)
        if sum(len(c) for c in cur) >= size:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return [c for c in out if c.strip()]


def write_jsonl(path: Path, texts):
    with path.open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def score(llm, wins, lora):
    from sarathi import SamplingParams

    tok = llm.get_tokenizer()
    outs = llm.generate(prompt_token_ids=wins, sampling_params=SamplingParams(max_tokens=0, prompt_logprobs=1),
                        lora_request=lora)
    nats, nbytes = 0.0, 0
    for w, out in zip(wins, outs):
        for tid, step in zip(w[1:], out.prompt_logprobs[1:]):
            nats -= step[tid].logprob
        nbytes += len(tok.decode(w[1:]).encode("utf-8"))
    return nats / math.log(2) / nbytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default=str(HERE / "data" / "python-docs"))
    p.add_argument("--budget-min", type=float, default=30.0, help="training minutes per variant")
    p.add_argument("--variants", nargs="+", default=["none", "nf4", "int4"], help="--base-quantization values")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-chunks", type=int, default=12, help="held-out pieces for the Trainer's eval loss")
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--skip-train", action="store_true", help="score the adapters a previous run left in --work-dir")
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "lora-finetune"))
    p.add_argument("--result-dir", default=str(HERE / "results"))
    args = p.parse_args()
    data_dir, work = Path(args.data_dir), Path(args.work_dir)
    if not (data_dir / "train.txt").is_file():
        sys.exit(f"{data_dir}/train.txt missing: run benchmarks/data/fetch_python_docs.py first")
    work.mkdir(parents=True, exist_ok=True)
    train = chunks((data_dir / "train.txt").read_text(encoding="utf-8"), 1500)
    random.Random(0).shuffle(train)
    write_jsonl(work / "train.jsonl", train)
    heldout = (data_dir / "heldout.txt").read_text(encoding="utf-8")
    write_jsonl(work / "eval.jsonl", chunks(heldout, 1500)[:args.eval_chunks])

    runs = {}
    for variant in args.variants:
        out = work / f"adapter-{variant}"
        cmd = [sys.executable, "-m", "sarathi.lora", "train", "--base", args.model, "--data", str(work / "train.jsonl"),
               "--eval-data", str(work / "eval.jsonl"), "--out", str(out), "--base-quantization", variant,
               "--time-budget", str(args.budget_min), "--max-length", str(args.max_length),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--r", str(args.r),
               "--lora-alpha", str(2 * args.r), "--eval-steps", str(args.eval_steps), "--save-steps", "100000",
               "--logging-steps", "10", "--threads", str(args.threads), "--no-resume"]
        t0 = time.perf_counter()
        if not args.skip_train:
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
        summary = json.loads((out / "train_summary.json").read_text())
        runs[variant] = {"adapter": str(out), "wall_seconds": None if args.skip_train else time.perf_counter() - t0,
                         **{k: summary[k] for k in ("global_step", "tokens_seen", "train_seconds", "train_loss",
                                                    "eval_loss", "peak_rss_mb", "train_rss_mb", "trainable_params")},
                         "tokens_per_s": summary["tokens_seen"] / summary["train_seconds"],
                         "curve": [(h["tokens"], h["eval_loss"]) for h in summary["history"] if "eval_loss" in h]}

    from sarathi import LLM, LoRARequest

    llm = LLM(model=args.model, quantization="none", enable_lora=True, max_lora_rank=args.r, max_model_len=1024,
              kv_cache_memory="1GiB", lora_modules=[f"ft-{v}={r['adapter']}" for v, r in runs.items()])
    wins = windows(llm.get_tokenizer(), heldout, args.windows, args.window_len)
    before = score(llm, wins, None)
    for v, r in runs.items():
        r["bits_per_byte"] = score(llm, wins, LoRARequest(f"ft-{v}"))
    print(f"\n| base weights during training | steps | tokens | tokens/s | RSS while training MB | peak RSS MB | "
          "held-out bits/byte (before -> after) |\n|---|---|---|---|---|---|---|")
    for v, r in runs.items():
        label = {"none": "float32 (LoRA)", "nf4": "NF4 (QLoRA, bitsandbytes)", "int4": "int4 groups (QLoRA)"}[v]
        print(f"| {label} | {r['global_step']} | {r['tokens_seen']} | {r['tokens_per_s']:.0f} | "
              f"{r['train_rss_mb'] or float('nan'):.0f} | {r['peak_rss_mb']:.0f} | {before:.4f} -> "
              f"{r['bits_per_byte']:.4f} |")
    result = {"args": vars(args), "bits_per_byte_before": before, "runs": runs, "time": time.time()}
    res_dir = Path(args.result_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "lora-finetune.json").write_text(json.dumps(result, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for v, r in runs.items():
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, "o-", label=f"base {v}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out eval loss (nats/token)")
    ax.set_title(f"LoRA fine-tune, {args.budget_min:g} CPU minutes per variant")
    ax.legend()
    fig.tight_layout()
    fig.savefig(res_dir / "lora-finetune.png", dpi=120)
    print(f"saved {res_dir / 'lora-finetune.json'} and .png")


if __name__ == "__main__":
    main()
