"""The quantization math on one weight matrix: group parameters, RTN, GPTQ and the AWQ searches.

Conventions shared by every method (W is [out, in], groups run along the input dim):

* ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` and ``w' = (q - zero) * scale``.
* Scales are rounded (up) to fp16 *before* quantizing, so the saved fp16 scales reproduce exactly
  the weights the algorithms used (and GPTQ's error compensation saw).
* Asymmetric: the range is [min(w, 0), max(w, 0)], ``zero = round(-min / scale)``. When the
  checkpoint stores ``zero - 1`` (GPTQ v1) a zero point of 0 cannot be written; those rows get
  ``zero = 1`` and a scale stretched to ``(max - min) / (maxq - 1)`` so the range is still covered.
* Symmetric: ``scale = 2 * max|w| / maxq``, ``zero = 2**(bits-1)`` (8 at 4 bit, 128 at 8 bit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

_FP16_TINY = 2.0 ** -14  # smallest normal fp16; scales below it would lose precision in fp16


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int       # resolved (> 0); -1 is turned into in_features by the caller
    sym: bool
    v1_zeros: bool        # the checkpoint stores zero - 1 (GPTQ v1): zero points must be >= 1

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round scales *up* to the next fp16 value, so the quantization grid still spans the range
    (every weight stays within half a step of its code)."""
    x = x.float().clamp(min=_FP16_TINY)
    h = x.to(torch.float16)
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def find_params(w: torch.Tensor, spec: QuantSpec, max_val: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [rows, cols]; max_val [rows] clips the range to [-max_val, max_val]."""
    maxq = spec.maxq
    w = w.float()
    xmin = w.amin(1).clamp(max=0)
    xmax = w.amax(1).clamp(min=0)
    if max_val is not None:
        xmin = torch.maximum(xmin, -max_val)
        xmax = torch.minimum(xmax, max_val)
    if spec.sym:
        amax = torch.maximum(-xmin, xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = _fp16_round(2 * amax / maxq)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
        return scale, zero
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = _fp16_round((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    if spec.v1_zeros:
        bad = zero < 1
        if bool(bad.any()):
            scale = torch.where(bad, _fp16_round((xmax - xmin) / (maxq - 1)), scale)
            zero = torch.where(bad, torch.ones_like(zero), zero)
    return scale, zero


def quantize_cols(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """w [rows, k] with per-row scale/zero [rows] -> integer codes (as float) [rows, k]."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)


@dataclass
class QuantResult:
    q: torch.Tensor        # int32 [out, in] codes in [0, maxq]
    scales: torch.Tensor   # float32 [groups, out] (fp16-representable)
    zeros: torch.Tensor    # int32 [groups, out] true zero points
    g_idx: torch.Tensor    # int32 [in]
    weight: torch.Tensor   # float32 [out, in] dequantized

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.q.float() - self.zeros.float()[g].t()) * self.scales[g].t()


def rtn_quantize(W: torch.Tensor, spec: QuantSpec, max_val: Optional[torch.Tensor] = None) -> QuantResult:
    """Round-to-nearest per (row, group). max_val [out, groups] optionally clips each group (AWQ)."""
    out, cols = W.shape
    gs = spec.group_size
    G = cols // gs
    wg = W.float().reshape(out * G, gs)
    scale, zero = find_params(wg, spec, None if max_val is None else max_val.reshape(-1))
    q = quantize_cols(wg, scale, zero, spec.maxq)
    deq = ((q - zero[:, None]) * scale[:, None]).reshape(out, cols)
    return QuantResult(q=q.reshape(out, cols).to(torch.int32), scales=scale.reshape(out, G).t().contiguous(),
                       zeros=zero.reshape(out, G).t().contiguous().to(torch.int32),
                       g_idx=(torch.arange(cols, device=W.device) // gs).to(torch.int32), weight=deq)


def _inverse_cholesky_upper(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising the damping if needed."""
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        d = max(d * 10, 1e-4)
    raise ValueError(f"{name}: the calibration Hessian is not positive definite even with damping {d:g}; "
                     "use more calibration data or a larger --damp")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                  desc_act: bool = False, blocksize: int = 128, name: str = "weight") -> QuantResult:
    """GPTQ (Frantar et al. 2022) on W [out, in] with Hessian H [in, in] (2 X^T X / n).

    Columns are quantized one by one (in decreasing diag(H) order with desc_act), the rounding
    error of each is spread over the not-yet-quantized columns through the inverse Hessian's
    Cholesky factor; updates are applied lazily per block of ``blocksize`` columns. Group
    parameters are fixed when the first column of a group (in processing order) is reached, from
    the then-current (error-compensated) weights. With desc_act, ``g_idx[c]`` is the group of the
    position column c was processed at, and the codes are returned in the original column order."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    out, cols = W.shape
    gs = spec.group_size
    maxq = spec.maxq
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = _inverse_cholesky_upper(H, damp, name)
    del H
    G = math.ceil(cols / gs)
    Q = torch.zeros(out, cols, dtype=torch.float32, device=W.device)
    scales = torch.zeros(G, out, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(G, out, dtype=torch.float32, device=W.device)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if col % gs == 0:
                end = col + gs
                grp = W1[:, i:i + gs] if end <= i2 else torch.cat([W1[:, i:], W[:, i2:end]], dim=1)
                scale, zero = find_params(grp, spec)
                scales[col // gs] = scale
                zeros[col // gs] = zero
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            Q1[:, i] = q
            err = (w - (q - zero) * scale) / d
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    g_pos = torch.arange(cols, device=W.device) // gs
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        g_idx = g_pos[invperm]
    else:
        g_idx = g_pos
    res = QuantResult(q=Q.to(torch.int32), scales=scales, zeros=zeros.to(torch.int32),
                      g_idx=g_idx.to(torch.int32), weight=torch.empty(0))
    res.weight = res.dequantize()
    return res


# --- AWQ -----------------------------------------------------------------------------------------

def output_error(dW: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sum over calibration tokens of ||x dW^T||^2 = trace(dW H dW^T), with H = sum x x^T."""
    return ((dW @ H) * dW).sum()


def awq_search_scales(Ws: List[torch.Tensor], H: torch.Tensor, x_absmean: torch.Tensor, spec: QuantSpec,
                      n_grid: int = 20) -> Tuple[torch.Tensor, float, float, float]:
    """Grid-search per-input-channel scales s = mean|x|^alpha, alpha in linspace(0, 1, n_grid).

    The loss is the exact output squared error on all calibration tokens of the linears that
    share this input, trace(dW H dW^T) with dW = Q(W diag(s)) diag(s)^-1 - W.
    Returns (best scales, best alpha, best loss, loss at alpha = 0, i.e. plain RTN)."""
    W = torch.cat([w.float() for w in Ws], dim=0)
    H = H.float()
    best = (None, 0.0, float("inf"))
    rtn_loss = float("inf")
    base = x_absmean.float().clamp(min=0)
    for k in range(n_grid):
        alpha = k / max(n_grid - 1, 1)
        s = base.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        Wq = rtn_quantize(W * s, spec).weight / s
        loss = float(output_error(Wq - W, H))
        if k == 0:
            rtn_loss = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], best[2], rtn_loss


def awq_search_clip(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, n_grid: int = 20,
                    max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clipping threshold max_val = max|w| * (1 - k/n_grid), k < max_shrink*n_grid,
    minimising the group's own output error d_g^T H_gg d_g (AutoAWQ's auto_clip, with the exact
    per-group second moment instead of a token sample). Returns max_val [out, groups]."""
    out, cols = W.shape
    gs = spec.group_size
    G = cols // gs
    Wg = W.float().reshape(out, G, gs)
    idx = torch.arange(G, device=W.device)
    Hb = H.float().reshape(G, gs, G, gs)[idx, :, idx, :]  # diagonal blocks [G, gs, gs]
    org_max = Wg.abs().amax(-1)
    best_val = org_max.clone()
    best_err = torch.full_like(org_max, float("inf"))
    for k in range(max(int(max_shrink * n_grid), 1)):
        mv = org_max * (1 - k / n_grid)
        d = rtn_quantize(W, spec, mv).weight.reshape(out, G, gs) - Wg
        err = torch.einsum("ogi,gij,ogj->og", d, Hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_val = torch.where(better, mv, best_val)
    return best_val
