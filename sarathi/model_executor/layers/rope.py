"""Rotary position embeddings with the scaling variants the supported configs use.

`RopeSpec` is what a config says (base, scaling, how much of head_dim rotates);
`RotaryEmbedding` turns positions into cos/sin tables; `apply_rope` rotates q or k
(halves layout, as HF's rotate_half; the dims past `rotary_dim` pass through).

Scaling variants: linear, llama3, yarn (static frequencies plus an attention factor),
longrope / su (Phi-3: short factors below the original context, long factors from it on,
chosen per position so a token's rotation never depends on its batch), and freq_factors
(one divisor per frequency: the `rope_freqs` tensor llama.cpp's converter writes for llama3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

SCALINGS = ("default", "linear", "llama3", "yarn", "longrope", "freq_factors")


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    scaling: Optional[dict] = field(default=None, hash=False, compare=False)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048

    def key(self) -> tuple:
        """Two layers with equal keys share one cos/sin table per step."""
        return (self.theta, repr(sorted((self.scaling or {}).items())), self.partial_rotary_factor,
                self.max_position_embeddings)


def rope_spec(cfg: dict, theta: Optional[float] = None, params: Optional[dict] = None) -> RopeSpec:
    """The RoPE of an HF config: old style (rope_theta, rope_scaling) or transformers 5's
    rope_parameters dict. `params` overrides rope_parameters (Gemma 3's per layer type)."""
    p = dict(params if params is not None else (cfg.get("rope_parameters") or {}))
    scaling = cfg.get("rope_scaling") if params is None else None
    scaling = dict(scaling or p)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "su":
        kind = "longrope"
    if kind not in SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported ({', '.join(SCALINGS)} are)")
    if theta is None:
        theta = p.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = p.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    max_pos = cfg.get("max_position_embeddings", 2048)
    if kind == "default":
        return RopeSpec(float(theta), None, float(partial), max_pos)
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    scaling["rope_type"] = kind
    if kind in ("yarn", "longrope", "llama3"):
        scaling.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos))
    return RopeSpec(float(theta), scaling, float(partial), max_pos)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """(inverse frequencies, the long ones for longrope or None, factor on cos and sin)."""
    d = int(head_dim * spec.partial_rotary_factor)
    exponents = torch.arange(0, d, 2, dtype=torch.float64) / d
    inv = 1.0 / (spec.theta ** exponents)
    s = spec.scaling
    if s is None:
        return inv, None, 1.0
    kind = s["rope_type"]
    if kind == "linear":
        return inv / s["factor"], None, 1.0
    if kind == "freq_factors":
        return inv / torch.tensor(s["factors"], dtype=torch.float64), None, 1.0
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled), None, 1.0
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or spec.max_position_embeddings / old_len
    if kind == "yarn":
        mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
        attention = s.get("attention_factor")
        if attention is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

        lo, hi = correction_dim(fast), correction_dim(slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        return inv / factor * (1 - extrapolation) + inv * extrapolation, None, float(attention)
    # longrope
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    short = inv / torch.tensor(s["short_factor"], dtype=torch.float64)
    long = inv / torch.tensor(s["long_factor"], dtype=torch.float64)
    return short, long, float(attention)


class RotaryEmbedding:
    """cos/sin [T, 1, rotary_dim / 2] for a batch of positions, in the model's dtype."""

    def __init__(self, spec: RopeSpec, head_dim: int):
        self.spec, self.head_dim = spec, head_dim
        self.rotary_dim = int(head_dim * spec.partial_rotary_factor)
        self._long_from = (spec.scaling or {}).get("original_max_position_embeddings", 0)
        self._freqs = None  # (inv, long inv or None, attention factor), built on first use on the positions' device

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._freqs is None or self._freqs[0].device != positions.device:
            inv, long, factor = rope_inv_freq(self.spec, self.head_dim)
            dev = positions.device
            self._freqs = (inv.float().to(dev), None if long is None else long.float().to(dev), factor)
        inv, long, factor = self._freqs
        inv = inv[None, :]
        if long is not None:
            inv = torch.where(positions[:, None] >= self._long_from, long[None, :], inv)
        freqs = (positions.to(torch.float32)[:, None] * inv)[:, None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T,H,D]; cos/sin [T,1,R/2] (halves layout, as HF's rotate_half) over the first R dims."""
    rot = 2 * cos.shape[-1]
    if rot == x.shape[-1]:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2, rest = x[..., :rot // 2], x[..., rot // 2:rot], x[..., rot:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
