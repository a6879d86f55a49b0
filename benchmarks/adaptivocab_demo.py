"""The AdaptiVocab demo on the Python 3.11 docs: build, patch (4 inits), fine-tune, evaluate.

Runs the `python -m adaptivocab` commands the README lists, one after the other, with
their outputs under benchmarks/results/adaptivocab/ (model directories are git-ignored;
eval.json / eval.png and the logs are the results). A step whose output already exists
is skipped unless --fresh. Fetch the corpus first:
    .venv/bin/python benchmarks/data/fetch_python_docs.py
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "python-docs"
OUT = ROOT / "benchmarks" / "results" / "adaptivocab"
INITS = ("mean", "first", "last", "exp")


def run(args, log: Path = None) -> None:
    cmd = [sys.executable, "-m", "adaptivocab", *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    if log is None:
        subprocess.run(cmd, cwd=ROOT, check=True)
    else:
        with open(log, "w") as f:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def save_finetune_curve(ft: Path, out: Path) -> None:
    """Copy the fine-tune's budget and held-out bits/byte curve to results JSON + PNG."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads((ft / "finetune_log.json").read_text())
    keep = {k: log[k] for k in ("step", "tokens_seen", "minutes", "trainable_params", "corpus_tokens", "config", "curve")}
    out.with_suffix(".json").write_text(json.dumps(keep, indent=1))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p["tokens"] for p in log["curve"]], [p["bits_per_byte"] for p in log["curve"]], marker="o")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out bits/byte")
    ax.set_title(f"fine-tune: {log['tokens_seen']} tokens, {log['minutes']:.1f} min")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    for p in log["curve"]:
        print(f"  step {p['step']:4d}  tokens {p['tokens']:7d}  {p['minutes']:5.1f} min  bits/byte {p['bits_per_byte']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--num-new-tokens", type=int, default=5000)
    ap.add_argument("--fresh", action="store_true", help="redo every step")
    args = ap.parse_args()
    train, heldout = DATA / "train.txt", DATA / "heldout.txt"
    if not train.is_file():
        sys.exit(f"{train} is missing: run benchmarks/data/fetch_python_docs.py first")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for p in OUT.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
    tok = OUT / "patch_tokenizer"
    if not tok.is_dir():
        run(["build", "--base", args.base, "--corpus", train, "--num-new-tokens", args.num_new_tokens,
             "--max-ngram", 5, "--out", tok])
    for init in INITS:
        if not (OUT / f"smollm2-{init}").is_dir():
            run(["patch-model", "--model", args.base, "--patch-tokenizer", tok, "--init", init,
                 "--out", OUT / f"smollm2-{init}"])
    ft = OUT / "smollm2-exp-ft"
    finetune_args = ["--model", OUT / "smollm2-exp", "--corpus", train, "--eval-corpus", heldout, "--eval-bytes", 4000,
                     "--train", "lm_head,last_layer,norm", "--bf16", "--lr", "1e-3", "--seq-len", 256,
                     "--batch-size", 4, "--eval-every", 8, "--save-every", 8]
    if not ft.is_dir():
        # CPU budget: lm_head + last layer (+ final norm) in bf16 autocast; see the README for why.
        run(["finetune", *finetune_args, "--out", ft, "--max-tokens", 65536, "--max-minutes", 25],
            log=OUT / "finetune.log")
    save_finetune_curve(ft, OUT / "finetune_curve")
    # The same run continued from its 25-minute checkpoint to twice the token budget (a longer data point).
    longer = OUT / "smollm2-exp-ft50"
    if not longer.is_dir():
        shutil.rmtree(OUT / "smollm2-exp-ft50.checkpoint", ignore_errors=True)
        shutil.copytree(OUT / "smollm2-exp-ft.checkpoint", OUT / "smollm2-exp-ft50.checkpoint")
        run(["finetune", *finetune_args, "--out", longer, "--max-tokens", 131072, "--max-minutes", 50],
            log=OUT / "finetune50.log")
    save_finetune_curve(longer, OUT / "finetune_curve_45min")
    run(["evaluate", "--base", args.base, "--patched", *[OUT / f"smollm2-{i}" for i in INITS], longer, ft,
         "--labels", *INITS, "exp+ft-45min", "exp+ft-25min", "--corpus", heldout, "--max-bytes", 8000,
         "--max-tokens", 64, "--concurrency", 1, 16, "--rounds", 3, "--out", OUT / "eval"])


if __name__ == "__main__":
    main()
