"""The engine's exact optimal-sampling math in C++ (csrc/sampling/optimal.cpp): α*, the
per-token diagnostics and the draw from q* for a batch of rows of full-vocabulary logits, float64.

Same quantities as `kl.solve_alpha` / `kl.diagnostics` (the torch reference, which the
tests hold it to), computed differently where speed asks for it:
  - each row is one thread's work in one fixed order, so the same logits give the same bits in
    any batch and with any thread count; α* comes from Newton steps inside a bisection bracket
    (slope Var_q[log π_t − log π_θ]): ~3 passes over the vocabulary instead of ~22;
  - α* is reported on the grid of the largest power of two <= tol (as bisection's result lies
    on its grid): logits can differ in their last bits between two batchings of the model, and a
    continuous α* would show that noise in alpha_history; on the grid it almost never does;
  - a pass shifts the exponents by (1 − α)·max log π_θ + α·max log π_t, a bound on every
    mixed log-probability, instead of first finding their maximum;
  - the draw inverts q*'s cumulative mass (in blocks of 64 tokens, then token by token) at one
    uniform number from the row's generator, like the engine's plain sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from sarathi.optimal_sampling import _C
from sarathi.optimal_sampling.kl import diagnostics
from vattention_ext.threads import native_threads


@dataclass
class Rows:
    """Per row: the α used, its diagnostics (keys as kl.diagnostics), and where a uniform number
    was given, the token drawn from q_α and its log q_α (else -1 and NaN)."""

    alphas: List[float]
    diagnostics: List[Dict[str, float]]
    tokens: List[int]
    logq: List[float]


def solve_rows(logits_theta: torch.Tensor, logits_t: torch.Tensor, alphas: Sequence[Optional[float]],
               tols: Sequence[float], uniforms: Optional[Sequence[Optional[float]]] = None, max_iter: int = 100,
               threads: Optional[int] = None) -> Rows:
    """For [B, V] float32 logits or log-probabilities of π_θ and π_t (normalised here in float64;
    -inf = token ruled out) and per row an α in [0, 1] or None (solve for α*, to tols[i] in α):
    the α used and its diagnostics; with uniforms[i] in [0, 1), also a token drawn from q_α by
    inverting its cumulative mass at that number (a row's own generator's draw)."""
    if logits_theta.shape != logits_t.shape or logits_theta.dim() != 2:
        raise ValueError(f"logits_theta and logits_t must be [rows, vocab] of one shape, got "
                         f"{tuple(logits_theta.shape)} and {tuple(logits_t.shape)}")
    rows = logits_theta.shape[0]
    uniforms = [None] * rows if uniforms is None else list(uniforms)
    if len(alphas) != rows or len(tols) != rows or len(uniforms) != rows:
        raise ValueError(f"need one alpha, tol and uniform per row ({rows}), got {len(alphas)}, {len(tols)} and "
                         f"{len(uniforms)}")
    lt = logits_theta.detach().to("cpu", torch.float32).contiguous()
    lh = logits_t.detach().to("cpu", torch.float32).contiguous()
    a = torch.tensor([math.nan if x is None else float(x) for x in alphas], dtype=torch.float64)
    tol = torch.tensor([float(x) for x in tols], dtype=torch.float64)
    u = torch.tensor([math.nan if x is None else float(x) for x in uniforms], dtype=torch.float64)
    diag = torch.empty(rows, _C.DIAG_FIELDS, dtype=torch.float64)
    token = torch.empty(rows, dtype=torch.int64)
    logq = torch.empty(rows, dtype=torch.float64)
    _C.optimal_rows(lt.data_ptr(), lh.data_ptr(), rows, lt.shape[1], lt.shape[1], a.data_ptr(), tol.data_ptr(),
                    diag.data_ptr(), u.data_ptr(), token.data_ptr(), logq.data_ptr(), int(max_iter),
                    native_threads() if threads is None else int(threads))
    out_alphas = a.tolist()
    out: List[Dict[str, float]] = []
    for i, (alpha, d) in enumerate(zip(out_alphas, diag.tolist())):
        kt, kh, entropy, second_theta, second_t, disjoint = d
        if disjoint and 0.0 < alpha < 1.0:  # no geometric mixture: the arithmetic one (rare)
            lp_t, lp_h = torch.log_softmax(lt[i].double(), -1), torch.log_softmax(lh[i].double(), -1)
            out.append(diagnostics(lp_t, lp_h, alpha))
            continue
        ess = [1.0 / s if math.isfinite(s) and s > 0 else 0.0 for s in (second_theta, second_t)]
        out.append({"alpha": alpha, "kl_q_theta": kt, "kl_q_t": kh, "kl_gap": kt - kh, "entropy_q": entropy,
                    "ess_theta": ess[0], "ess_t": ess[1], "ess_ratio": ess[0] / ess[1] if ess[1] > 0 else math.inf})
    return Rows(out_alphas, out, token.tolist(), logq.tolist())
