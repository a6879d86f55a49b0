"""python -m adaptivocab {build,patch-model,teacher-targets,finetune,evaluate} ..."""
from __future__ import annotations

import argparse
import math
import sys
import time

# Errors that bad input predictably raises: shown as one `error:` line, not a traceback.
# (json.JSONDecodeError and UnicodeDecodeError are ValueErrors; FileNotFoundError,
# PermissionError, IsADirectoryError and NotADirectoryError are OSErrors.)
USER_ERRORS = (ValueError, OSError)


def int_at_least(low: int):
    """argparse type: an int >= `low` (sizes and counts; 0 would divide by zero or do nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _build(args) -> None:
    from adaptivocab.outdir import check_output_dir, staged_output_dir
    from adaptivocab.patch_tokenizer import PatchTokenizer

    t0 = time.perf_counter()
    check_output_dir(args.out, args.overwrite, [args.base, *args.corpus])  # before the slow build
    tok = PatchTokenizer.build(args.base, args.corpus, num_new_tokens=args.num_new_tokens, max_ngram=args.max_ngram,
                               min_count=args.min_count)
    with staged_output_dir(args.out, "build", args.overwrite, [args.base, *args.corpus]) as tmp:
        tok.save_pretrained(tmp)
    info = tok.build_info
    print(f"built {len(tok.ngrams)} n-tokens (max n={args.max_ngram}) from {info['corpus_bytes'] / 1e6:.2f} MB "
          f"({info['corpus_base_tokens']} base tokens; estimated {info['estimated_saved_tokens']} saved on the "
          f"training corpus) in {time.perf_counter() - t0:.1f} s -> {args.out}")


def _patch_model(args) -> None:
    from adaptivocab.patch_model import patch_model

    out = patch_model(args.model, args.patch_tokenizer, args.out, init=args.init, overwrite=args.overwrite)
    print(f"patched model ({args.init} init) -> {out}")


def _finetune(args) -> None:
    from adaptivocab.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        train=[p.strip() for p in args.train.split(",") if p.strip()], seq_len=args.seq_len, batch_size=args.batch_size,
        lr=args.lr, max_tokens=args.max_tokens, max_minutes=args.max_minutes, eval_every=args.eval_every,
        eval_bytes=args.eval_bytes, save_every=args.save_every, seed=args.seed, bf16=args.bf16, threads=args.threads,
        teacher_targets=args.teacher_targets, teacher_weight=args.teacher_weight)
    out = finetune(args.model, args.corpus, args.out, cfg, eval_corpus=args.eval_corpus, overwrite=args.overwrite)
    print(f"fine-tuned model -> {out}")


def _teacher_targets(args) -> None:
    from adaptivocab.teacher import TeacherConfig, make_targets

    cfg = TeacherConfig(top_k=args.top_k, expand_per_position=args.expand, min_mass=args.min_mass, bf16=args.bf16)
    stats = make_targets(args.model, args.corpus, args.out, cfg, seq_len=args.seq_len, seed=args.seed,
                         max_blocks=args.max_blocks, max_minutes=args.max_minutes, base=args.base, threads=args.threads)
    print(f"teacher targets: {stats['computed']} new blocks ({stats['tokens']} positions) in {stats['minutes']:.1f} min, "
          f"{stats['cached_blocks']} cached in all; mean uncovered mass {stats.get('mean_uncovered', 0):.4f}, "
          f"mean mass outside top-{args.top_k} {stats.get('mean_rest', 0):.4f} -> {args.out}")


def weight(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _evaluate(args) -> None:
    from adaptivocab.evaluate import evaluate

    evaluate(args.base, args.patched, args.corpus, out=args.out, labels=args.labels, max_bytes=args.max_bytes,
             window=args.window, max_tokens=args.max_tokens,
             concurrency=args.concurrency, speed=args.speed, rounds=args.rounds, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per step (also walked by the CLI fuzz tests)."""
    ap = argparse.ArgumentParser(prog="python -m adaptivocab", description="AdaptiVocab: domain n-gram vocabularies")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="choose n-tokens from a domain corpus and save a patch tokenizer")
    b.add_argument("--base", required=True, help="base model: HF-style directory, GGUF file or known name")
    b.add_argument("--corpus", required=True, nargs="+", help="UTF-8 text files of the domain")
    b.add_argument("--num-new-tokens", type=positive_int, required=True)
    b.add_argument("--max-ngram", type=int_at_least(2), default=5)
    b.add_argument("--min-count", type=positive_int, default=2, help="ignore n-grams seen fewer times")
    b.add_argument("--out", required=True, help="directory for patch_tokenizer.json")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool at --out")
    b.set_defaults(func=_build)

    p = sub.add_parser("patch-model", help="write a model directory with rows for the n-tokens")
    p.add_argument("--model", required=True)
    p.add_argument("--patch-tokenizer", "--patch_tokenizer_path", required=True, dest="patch_tokenizer")
    p.add_argument("--init", choices=["exp", "mean", "first", "last"], default="exp")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool at --out")
    p.set_defaults(func=_patch_model)

    f = sub.add_parser("finetune", help="light CPU fine-tuning of a patched model (resumable)")
    f.add_argument("--model", required=True, help="patched model directory")
    f.add_argument("--corpus", required=True, nargs="+")
    f.add_argument("--eval-corpus", nargs="*", default=None, help="held-out files for the bits/byte curve")
    f.add_argument("--out", required=True)
    f.add_argument("--train", default="embeddings,lm_head,first_layer,last_layer",
                   help="comma list of: embeddings, lm_head, first_layer, last_layer, norm, all")
    f.add_argument("--seq-len", type=positive_int, default=256)
    f.add_argument("--batch-size", type=positive_int, default=8)
    f.add_argument("--lr", type=positive_float, default=1e-3)
    f.add_argument("--max-tokens", type=positive_int, default=1_000_000, help="stop after this many training tokens")
    f.add_argument("--max-minutes", type=positive_float, default=25.0, help="stop after this much wall time")
    f.add_argument("--eval-every", type=positive_int, default=50, help="steps between held-out bits/byte points")
    f.add_argument("--eval-bytes", type=positive_int, default=20_000)
    f.add_argument("--save-every", type=positive_int, default=50, help="steps between checkpoints")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    f.add_argument("--threads", type=positive_int, default=None)
    f.add_argument("--teacher-targets", default=None,
                   help="directory made by teacher-targets: train on its blocks with the base model's targets")
    f.add_argument("--teacher-weight", type=weight, default=0.5,
                   help="loss = (1 - w) * next-token CE + w * CE to the teacher targets")
    f.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool at --out")
    f.set_defaults(func=_finetune)

    t = sub.add_parser("teacher-targets",
                       help="the base model's next-token distributions in patched tokens, for distillation")
    t.add_argument("--model", required=True, help="patched model directory (its base is the teacher)")
    t.add_argument("--base", default=None, help="teacher model (default: the base the patched model names)")
    t.add_argument("--corpus", required=True, nargs="+", help="the fine-tuning corpus")
    t.add_argument("--out", required=True, help="cache directory (extended if it exists with the same settings)")
    t.add_argument("--seq-len", type=positive_int, default=256, help="as the fine-tune's --seq-len")
    t.add_argument("--seed", type=int, default=0, help="as the fine-tune's --seed: blocks go in its order")
    t.add_argument("--max-blocks", type=positive_int, default=1000, help="blocks to cover, from the start of the order")
    t.add_argument("--max-minutes", type=positive_float, default=30.0)
    t.add_argument("--top-k", type=positive_int, default=32, help="patched tokens stored per position")
    t.add_argument("--expand", type=float, default=4.0,
                   help="off-text n-gram prefixes evaluated per position (average over a block)")
    t.add_argument("--min-mass", type=float, default=1e-3, help="prefixes below this probability are not evaluated")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for the teacher passes")
    t.add_argument("--threads", type=positive_int, default=None)
    t.set_defaults(func=_teacher_targets)

    e = sub.add_parser("evaluate", help="tokens/byte, bits/byte, n-token share and engine bytes/s")
    e.add_argument("--base", required=True)
    e.add_argument("--patched", required=True, nargs="+", help="one or more patched model directories")
    e.add_argument("--labels", nargs="*", default=None, help="names for the patched models (default: dir names)")
    e.add_argument("--corpus", required=True, nargs="+", help="held-out domain text")
    e.add_argument("--out", default="benchmarks/results/adaptivocab_eval")
    e.add_argument("--max-bytes", type=positive_int, default=50_000, help="held-out bytes scored for bits/byte")
    e.add_argument("--window", type=int_at_least(2), default=512)
    e.add_argument("--max-tokens", type=positive_int, default=64, help="generated tokens per request in the speed test")
    e.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 16],
                   help="numbers of requests submitted together (one batch each)")
    e.add_argument("--speed", choices=["engine", "hf", "none"], default="engine",
                   help="generation speed through our engine (default), HF generate, or skip")
    e.add_argument("--rounds", type=positive_int, default=3,
                   help="alternating timing rounds; the fastest of each side counts")
    e.add_argument("--threads", type=positive_int, default=None)
    e.set_defaults(func=_evaluate)
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the source
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (outputs are only put in place when complete)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
