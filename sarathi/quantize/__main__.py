"""`python -m sarathi.quantize ...` / `sarathi quantize ...`."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser(prog: str = "python -m sarathi.quantize") -> argparse.ArgumentParser:
    from sarathi.model_executor.model_loader import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog=prog,
        description="Quantize the linear layers of a Llama-family model (RTN, AWQ or GPTQ) and write a "
                    "Hugging Face GPTQ (v1, AutoGPTQ layout; rtn and gptq) or AWQ (AutoAWQ GEMM) checkpoint.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF-style directory, .gguf file or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--method", required=True, choices=("rtn", "awq", "gptq"))
    p.add_argument("--bits", type=int, default=4, help="4 or 8 (awq: 4 only; default 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="input columns per scale/zero group, or -1 for one group per row (default 128)")
    p.add_argument("--calib", default=None, help="UTF-8 text file for calibration (required for awq/gptq)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--desc-act", action="store_true", help="gptq: act-order (columns by decreasing Hessian diagonal)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False,
                   help="symmetric quantization (zero point 2^(bits-1)); default asymmetric")
    p.add_argument("--num-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: damping, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (default 8)")
    p.add_argument("--awq-grid", type=int, default=20, help="awq: grid points for the scale/clip search (default 20)")
    p.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="awq: search per-group clipping thresholds (default on)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq/rtn: within a layer, feed later linears the outputs of already-quantized ones "
                        "(default on)")
    p.add_argument("--lm-head", action=argparse.BooleanOptionalAction, default=False,
                   help="rtn/gptq: also quantize the LM head (round-to-nearest, same bits and group; a tied head "
                        "is written as its own tensor and the embedding stays float). On the CPU the head is then "
                        "a quantized matmul instead of a float one, as in a GGUF file (default off)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while quantizing (default: torch's default; 1 is often faster "
                        "on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None, prog: str = "python -m sarathi.quantize") -> int:
    ns = build_parser(prog).parse_args(argv)
    from sarathi.quantize.core import QuantizeOptions, quantize

    opts = QuantizeOptions(method=ns.method, bits=ns.bits, group_size=ns.group_size, sym=ns.sym,
                           desc_act=ns.desc_act, damp=ns.damp, num_samples=ns.num_samples, seq_len=ns.seq_len,
                           seed=ns.seed, device=ns.device, batch_size=ns.batch_size, awq_grid=ns.awq_grid,
                           awq_clip=ns.awq_clip, true_sequential=ns.true_sequential,
                           lm_head=ns.lm_head, threads=ns.threads)
    try:
        report = quantize(ns.model, ns.out, opts, calib=ns.calib, overwrite=ns.overwrite, progress=not ns.quiet)
    except (ValueError, OSError) as e:  # QuantizeError and any other bad input: one line, no traceback
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    print(report.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
