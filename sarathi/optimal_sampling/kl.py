"""The math of two-model optimal sampling (seed 003), in log space over the last dimension.

At each token, sample from the geometric mixture q_α(y) ∝ π_θ(y)^(1−α) π_t(y)^α with α* such
that KL(q‖π_θ) = KL(q‖π_t). That difference equals Δ(α) = E_{q_α}[log π_t − log π_θ], which
is non-decreasing in α (its derivative is Var_{q_α}[log π_t − log π_θ] ≥ 0), with
Δ(0) = −KL(π_θ‖π_t) ≤ 0 and Δ(1) = KL(π_t‖π_θ) ≥ 0: bisection on [0, 1] finds the root.

Closed forms: identical distributions make Δ ≡ 0 (α* = 1/2 by symmetry); distributions with
disjoint supports have no geometric mixture at all (q_α is zero everywhere for 0 < α < 1), so
the solver returns α* = 1/2 and `q_star` falls back to the arithmetic mixture. Nothing
returns NaN: −inf log-probabilities (tokens one side rules out) are handled as zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

NEG_INF = float("-inf")


def _log_normalize(x: torch.Tensor) -> torch.Tensor:
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def log_q(logp_theta: torch.Tensor, logp_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """log q_α over the common support (−inf elsewhere). α = 0 gives π_θ, α = 1 gives π_t."""
    if alpha <= 0.0:
        return _log_normalize(logp_theta)
    if alpha >= 1.0:
        return _log_normalize(logp_t)
    mix = (1.0 - alpha) * logp_theta + alpha * logp_t
    return _log_normalize(mix)


def _expect(logq: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """E_q[values] with 0 · (±inf) taken as 0 where q = 0."""
    q = logq.exp()
    return torch.where(q > 0, q * values, torch.zeros_like(q)).sum(-1)


def kl(logp: torch.Tensor, logr: torch.Tensor) -> float:
    """KL(p‖r) = E_p[log p − log r] (inf when p has mass where r has none)."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logr, torch.zeros_like(logp))
    return float((p * diff).sum(-1))


def delta(logp_theta: torch.Tensor, logp_t: torch.Tensor, alpha: float) -> float:
    """Δ(α) = KL(q_α‖π_θ) − KL(q_α‖π_t) = E_{q_α}[log π_t − log π_θ]."""
    lq = log_q(logp_theta, logp_t, alpha)
    q = lq.exp()
    diff = torch.where(q > 0, logp_t - logp_theta, torch.zeros_like(lq))
    return float((q * diff).sum(-1))


def _support(logp_theta: torch.Tensor, logp_t: torch.Tensor) -> Tuple[bool, bool]:
    both = torch.isfinite(logp_theta) & torch.isfinite(logp_t)
    return bool(both.any()), bool(torch.equal(logp_theta, logp_t))


def _gaps(mix_base: torch.Tensor, d: torch.Tensor, support: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Δ(α) per row on the open interval: q_α lives on the common support."""
    mix = torch.where(support, mix_base + alpha[:, None] * d, torch.full_like(d, NEG_INF))
    q = torch.softmax(mix, dim=-1)
    return (q * d).sum(-1)


def solve_alpha(logp_theta: torch.Tensor, logp_t: torch.Tensor, tol: float = 1e-6,
                max_iter: int = 100) -> torch.Tensor:
    """α* of every row of [B, V] log-probabilities (float64 [B]): bisection on all rows at once.

    Bisection, not Newton: its result depends only on the signs of Δ, so the same row gives the
    same α* bit for bit whatever rows it is batched with and however many threads reduce the sums
    (Newton's iterates carry the last bits of those sums: 1e-8 apart between two batchings).

    Rows with identical distributions or disjoint supports get 1/2; a row whose Δ keeps one
    sign on (0, 1) gets the nearer end."""
    lt = _log_normalize(logp_theta.double())
    lh = _log_normalize(logp_t.double())
    support = torch.isfinite(lt) & torch.isfinite(lh)
    d = torch.where(support, lh - lt, torch.zeros_like(lt))
    base = torch.where(support, lt, torch.zeros_like(lt))
    rows = lt.shape[0]
    alpha = torch.full((rows,), 0.5, dtype=torch.float64, device=lt.device)
    special = ~support.any(-1) | (lt == lh).all(-1)
    eps = min(tol, 1e-9)
    at_lo = _gaps(base, d, support, torch.full_like(alpha, eps)) >= 0
    at_hi = _gaps(base, d, support, torch.full_like(alpha, 1 - eps)) <= 0
    lo, hi = torch.zeros_like(alpha), torch.ones_like(alpha)
    for _ in range(max_iter):
        if float((hi - lo).max()) < tol:
            break
        mid = 0.5 * (lo + hi)
        below = _gaps(base, d, support, mid) < 0
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    alpha = 0.5 * (lo + hi)
    alpha = torch.where(at_lo, torch.zeros_like(alpha), alpha)
    alpha = torch.where(at_hi & ~at_lo, torch.ones_like(alpha), alpha)
    return torch.where(special, torch.full_like(alpha, 0.5), alpha)


NORMALIZATION_TOL = 1e-4  # float32 softmax over a large vocabulary sums to 1 within ~1e-6


def log_normalize(x: torch.Tensor) -> torch.Tensor:
    """Log-weights over the last dimension made log-probabilities (x − logsumexp x)."""
    return _log_normalize(x)


def _checked_logprobs(name: str, x, *, from_probs: bool) -> torch.Tensor:
    """A 1-D float64 log-probability vector from `x`, or ValueError saying what is wrong with it."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if from_probs:
        if not torch.isfinite(x).all() or (x < 0).any():
            raise ValueError(f"{name} must be finite probabilities >= 0")
        total = float(x.sum())
        if abs(total - 1.0) > NORMALIZATION_TOL:
            raise ValueError(f"{name} sums to {total:.6g}, not 1: pass probabilities (or logprobs_*= for "
                             "log-probabilities)")
        return torch.where(x > 0, x.log(), torch.full_like(x, NEG_INF))
    if (x == float("inf")).any():
        raise ValueError(f"{name} contains +inf")
    total = float(torch.logsumexp(x, 0))
    if not abs(total) <= NORMALIZATION_TOL:
        raise ValueError(f"{name} is not log-normalised (logsumexp {total:.6g}, not 0): pass log-probabilities, "
                         "probs_*= for probabilities, or log_normalize() log-weights first")
    return x


def solve_kl_symmetry(*, probs_theta=None, probs_t=None, logprobs_theta=None, logprobs_t=None,
                      tol: float = 1e-6, max_iter: int = 100) -> float:
    """α* in [0, 1] with KL(q_α‖π_θ) = KL(q_α‖π_t), to within tol in α (bisection).

    The two distributions are given by keyword, either as probabilities (`probs_theta`, `probs_t`,
    seed 003's form) or as log-probabilities (`logprobs_theta`, `logprobs_t`); input that is not
    normalised in the form it claims is refused (ValueError), so neither can pass for the other.
    """
    if (probs_theta is None) != (probs_t is None) or (logprobs_theta is None) != (logprobs_t is None) \
            or (probs_theta is None) == (logprobs_theta is None):
        raise TypeError("solve_kl_symmetry takes either probs_theta= and probs_t= or logprobs_theta= and "
                        "logprobs_t= (keywords only)")
    from_probs = probs_theta is not None
    prefix = "probs" if from_probs else "logprobs"
    lt = _checked_logprobs(f"{prefix}_theta", probs_theta if from_probs else logprobs_theta, from_probs=from_probs)
    lh = _checked_logprobs(f"{prefix}_t", probs_t if from_probs else logprobs_t, from_probs=from_probs)
    if lt.shape != lh.shape:
        raise ValueError(f"{prefix}_theta has {lt.numel()} entries and {prefix}_t {lh.numel()}")
    return float(solve_alpha(lt.reshape(1, -1), lh.reshape(1, -1), tol, max_iter)[0])


def q_star(logp_theta: torch.Tensor, logp_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Probabilities of q_α (float64); the arithmetic mixture when the supports are disjoint."""
    logp_theta, logp_t = _log_normalize(logp_theta.double()), _log_normalize(logp_t.double())
    overlap, _ = _support(logp_theta, logp_t)
    if not overlap and 0.0 < alpha < 1.0:
        return (1.0 - alpha) * logp_theta.exp() + alpha * logp_t.exp()
    return log_q(logp_theta, logp_t, alpha).exp()


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> int:
    """One index drawn from probs with the request's own generator."""
    return int(torch.multinomial(probs.float(), 1, generator=generator))


def diagnostics(logp_theta: torch.Tensor, logp_t: torch.Tensor, alpha: float) -> Dict[str, float]:
    """Per-token diagnostics: both KLs and their gap, entropy of q, and the normalised effective
    sample size of the importance weights q/π (1 / E_q[q/π], in (0, 1]) for each model."""
    logp_theta, logp_t = _log_normalize(logp_theta.double()), _log_normalize(logp_t.double())
    q = q_star(logp_theta, logp_t, alpha)
    lq = torch.where(q > 0, q.log(), torch.full_like(q, NEG_INF))
    kl_theta, kl_t = kl(lq, logp_theta), kl(lq, logp_t)

    def ess(logp):
        second = torch.where(q > 0, q * torch.exp(lq - logp), torch.zeros_like(q)).sum(-1)
        return float(1.0 / second) if math.isfinite(float(second)) and float(second) > 0 else 0.0

    ess_theta, ess_t = ess(logp_theta), ess(logp_t)
    return {"alpha": float(alpha), "kl_q_theta": kl_theta, "kl_q_t": kl_t, "kl_gap": kl_theta - kl_t,
            "entropy_q": float(-_expect(lq, lq)), "ess_theta": ess_theta, "ess_t": ess_t,
            "ess_ratio": ess_theta / ess_t if ess_t > 0 else float("inf")}


@dataclass
class TopKMerge:
    """Candidates of two top-k lists, with each side's log-probabilities on all of them."""

    token_ids: torch.Tensor     # [m] union of both top-k sets
    logp_theta: torch.Tensor    # [m] float64
    logp_t: torch.Tensor
    covered_theta: float        # mass of π_θ's own top-k
    covered_t: float
    filled_theta: int           # candidates whose π_θ value was filled in by the rule
    filled_t: int


def _fill(known: Dict[int, float], ids, vocab_size: int) -> Tuple[torch.Tensor, float, int]:
    """Log-probs of `ids`; a token missing from the top-k gets the leftover mass spread evenly
    over the unseen vocabulary, (1 − covered) / (V − k). Its true value is at most the smallest
    listed probability, so the error of a filled value is bounded by that."""
    covered = min(sum(math.exp(v) for v in known.values()), 1.0)
    unseen = max(vocab_size - len(known), 1)
    fill = math.log(max(1.0 - covered, 1e-30) / unseen)
    lowest = min(known.values()) if known else fill
    fill = min(fill, lowest)
    values = [known.get(i, fill) for i in ids]
    return torch.tensor(values, dtype=torch.float64), covered, sum(1 for i in ids if i not in known)


def merge_top_k(top_theta: Dict[int, float], top_t: Dict[int, float], vocab_size: int) -> TopKMerge:
    """Union of two {token id: logprob} top-k lists with the fill rule of `_fill`."""
    ids = sorted(set(top_theta) | set(top_t))
    lt, cov_t, fill_t = _fill(top_t, ids, vocab_size)
    ltheta, cov_theta, fill_theta = _fill(top_theta, ids, vocab_size)
    return TopKMerge(torch.tensor(ids), ltheta, lt, cov_theta, cov_t, fill_theta, fill_t)
