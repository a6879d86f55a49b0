"""`sarathi lora train|merge` (also `python -m sarathi.lora_training ...`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from sarathi.lora.adapter import LLAMA_LINEARS


def build_parser(prog: str = "python -m sarathi.lora_training") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="LoRA fine-tuning and merging (PEFT format)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a LoRA adapter (QLoRA with --base-quantization nf4/int4)")
    t.add_argument("--base", required=True, help="base model: alias, HF directory or .gguf")
    t.add_argument("--data", required=True, help='JSONL of {"text"}, {"prompt","completion"} or {"messages"}')
    t.add_argument("--out", required=True, help="output directory (adapter + checkpoints)")
    t.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
    t.add_argument("--eval-fraction", type=float, default=0.05)
    t.add_argument("--r", type=int, default=16, help="LoRA rank")
    t.add_argument("--lora-alpha", type=int, default=32)
    t.add_argument("--lora-dropout", type=float, default=0.05)
    t.add_argument("--target-modules", nargs="+", default=list(LLAMA_LINEARS), choices=LLAMA_LINEARS)
    t.add_argument("--base-quantization", default="none", choices=("none", "nf4", "int4"),
                   help="frozen base format: nf4 = bitsandbytes NF4 (QLoRA), int4 = 4-bit groups dequantised "
                        "per layer")
    t.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"),
                   help="recompute activations in the backward (less memory, ~1/3 more compute); auto: on for a "
                        "4-bit base, as the QLoRA recipe does")
    t.add_argument("--max-length", type=int, default=512, help="tokens per training example (longer texts are "
                   "cut into windows)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    t.add_argument("--time-budget", type=float, default=None, help="minutes of training, then save and stop")
    t.add_argument("--stop-after-steps", type=int, default=None,
                   help="end this session after N steps with a checkpoint (run again to resume)")
    t.add_argument("--eval-steps", type=int, default=50)
    t.add_argument("--save-steps", type=int, default=50)
    t.add_argument("--logging-steps", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--no-resume", dest="resume", action="store_false",
                   help="ignore checkpoints already in --out")
    m = sub.add_parser("merge", help="fold an adapter into its base: a plain HF safetensors directory")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[List[str]] = None, prog: str = "python -m sarathi.lora_training") -> int:
    ns = build_parser(prog).parse_args(argv)
    try:
        if ns.command == "train":
            from sarathi.lora_training.train import TrainOptions, train

            opts = TrainOptions(**{k: v for k, v in vars(ns).items() if k != "command"})
            summary = train(opts)
            print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "options")}, indent=1))
        else:
            from sarathi.lora_training.merge import merge

            print(merge(ns.base, ns.adapter, ns.out, ns.overwrite))
    except (ValueError, OSError) as e:  # bad input (ValueError) or an unreadable / unwritable path
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
