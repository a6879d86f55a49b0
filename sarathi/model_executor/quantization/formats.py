"""Quantized weights as the kernels take them, from the formats users bring.

Every format becomes one *logical* form, `QuantTensor`: a weight W [N out, K in] in blocks of
`block` elements along K, `W[n, k] = scale[n, k // block] * q[n, k] + min[n, k // block]`,
with q uint8 in [0, 15] (bits=4) or int8 (bits=8). `kernels.pack` turns it into the kernel's
layout. The conversions below are exact: the logical values equal what the source format
means, bit for bit (GGUF: the `gguf` package's own dequantisation; GPTQ / AWQ: (q - z) * s).

- GGUF Q8_0 / Q5_1: int8 blocks; Q5_0: 5-bit blocks (bits 5, q in [-16, 15]); Q6_K: 6-bit blocks
  of 16 (bits 6, q in [-32, 31]); Q4_0 / Q4_1 / Q4_K: 4-bit blocks; Q5_K: 5-bit blocks of 32 with a
  min (q in [0, 31]). The K-quants also keep their fp16 super-block scales (`super_scale`, and
  Q4_K's / Q5_K's `super_min`), so that the kernels store the integer sub-scales at the file's
  size. Other GGUF types
  (Q2_K, Q3_K, IQ*) have no kernel: they are dequantised and re-quantised to int8 blocks of
  32 (the next supported type) with a logged note.
- GPTQ (v1 and v2 zero conventions, act-order via g_idx) and AWQ (GEMM packing): 4-bit
  blocks of 32 inside each group; act-order keeps a permutation of the input features.
- int8: per-output-channel symmetric int8 from float weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger("sarathi")

KERNEL_BLOCK = 32


@dataclass
class QuantTensor:
    """W[n, k] = scale[n, k // block] * q[n, k] + min[n, k // block] (min None: 0).

    input_perm (act-order checkpoints): the layer computes x[:, input_perm] @ W.T, i.e. the
    stored columns are the original input features in that order."""

    q: torch.Tensor              # [N, K] uint8 (bits 4) or int8 (bits 5, 6, 8)
    scale: torch.Tensor          # [N, ceil(K / block)] float32
    min: Optional[torch.Tensor]  # like scale, or None
    bits: int
    block: int
    source: str                  # e.g. "gguf Q4_1", "gptq 4-bit g128" (logs and /metrics)
    input_perm: Optional[torch.Tensor] = None
    # GGUF K-quants: the fp16 scale of each super-block of 256 [N, K / 256] float32, with
    # scale = super_scale * an integer per sub-block (and min = -(super_min * an integer))
    super_scale: Optional[torch.Tensor] = None
    super_min: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] in the original input order."""
        b = self.block
        w = self.q.float() * self.scale.repeat_interleave(b, dim=1)[:, :self.q.shape[1]]
        if self.min is not None:
            w += self.min.repeat_interleave(b, dim=1)[:, :self.q.shape[1]]
        if self.input_perm is not None:
            out = torch.empty_like(w)
            out[:, self.input_perm] = w
            w = out
        return w

    def rows(self, index: torch.Tensor) -> "QuantTensor":
        """The output rows `index` (in that order)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return QuantTensor(self.q[index], self.scale[index], pick(self.min), self.bits, self.block, self.source,
                           self.input_perm, pick(self.super_scale), pick(self.super_min))


def same_layout(parts: Sequence[QuantTensor]) -> bool:
    """Can these be stacked along N into one kernel call?"""
    a = parts[0]
    return all(p.bits == a.bits and p.block == a.block and (p.min is None) == (a.min is None)
               and p.q.shape[1] == a.q.shape[1]
               and (p.input_perm is None) == (a.input_perm is None)
               and (p.input_perm is None or torch.equal(p.input_perm, a.input_perm))
               and (p.super_scale is None) == (a.super_scale is None)
               and (p.super_min is None) == (a.super_min is None) for p in parts)


def kernel_groups(parts: Sequence[QuantTensor]) -> List[QuantTensor]:
    """Parts stacked along N -> the fewest tensors of one layout each (one kernel call each).

    Neighbours of one layout are concatenated. When that leaves several and every part fits int8
    blocks of one size (GGUF Q4_K_M's q / k in Q5_0 beside its v in Q8_0), the 5- / 6-bit parts
    are widened to int8 so that the layer stays one call: the fused decode path needs one, and it
    saves more per step than the widened blocks' extra bytes cost (measured on Gemma 3 270M)."""
    groups: List[List[QuantTensor]] = []
    for p in parts:
        if groups and same_layout([groups[-1][0], p]):
            groups[-1].append(p)
        else:
            groups.append([p])
    if len(groups) > 1:
        wide = [_as_int8_blocks(p) for p in parts]
        if same_layout(wide):
            groups = [wide]
    return [concat_rows(g) if len(g) > 1 else g[0] for g in groups]


def _as_int8_blocks(t: QuantTensor) -> QuantTensor:
    """A 5- / 6-bit tensor as int8 blocks (its q already is int8); others unchanged."""
    if t.bits not in (5, 6):
        return t
    return QuantTensor(t.q, t.scale, t.min, 8, t.block, t.source, t.input_perm)


def concat_rows(parts: Sequence[QuantTensor]) -> QuantTensor:
    a = parts[0]
    cat = lambda name: None if getattr(a, name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return QuantTensor(cat("q"), cat("scale"), cat("min"), a.bits, a.block, a.source, a.input_perm,
                       cat("super_scale"), cat("super_min"))


# ---------------------------------------------------------------------------- GGUF

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Bytes [..., group] -> [..., 2 * group]: the low nibbles, then the high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scale_min(scales: np.ndarray):
    """The 6-bit sub-block scales and mins of Q4_K / Q5_K (12 bytes -> 8 + 8 values)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode_gguf_blocks(kind: str, b: np.ndarray):
    """Blocks [nb, bytes] of one GGUF type -> (q [nb, elems], scale [nb, sub], min or None, bits, block,
    super_scale [nb] or None, super_min [nb] or None)."""
    nb = b.shape[0]
    if kind == "Q8_0":
        return b[:, 2:].view(np.int8), _f16(b[:, :2]), None, 8, 32, None, None
    if kind == "Q4_0":
        d = _f16(b[:, :2])
        return _nibbles(b[:, 2:], 16), d, -8.0 * d, 4, 32, None, None
    if kind == "Q4_1":
        return _nibbles(b[:, 4:], 16), _f16(b[:, :2]), _f16(b[:, 2:4]), 4, 32, None, None
    if kind in ("Q5_0", "Q5_1"):
        off = 2 if kind == "Q5_0" else 4
        qh = np.ascontiguousarray(b[:, off:off + 4]).view(np.uint32)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q = _nibbles(b[:, off + 4:], 16) | (high << 4)
        d = _f16(b[:, :2])
        if kind == "Q5_0":
            return (q.astype(np.int16) - 16).astype(np.int8), d, None, 5, 32, None, None
        return q.astype(np.int8), d, _f16(b[:, 2:4]), 8, 32, None, None
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        scale, minus = d * sc, -(dmin * mn)           # [nb, 8] sub-blocks of 32
        if kind == "Q4_K":
            qs = b[:, 16:144].reshape(nb, 4, 32)       # 4 chunks: low nibbles = sub 2c, high = 2c + 1
            q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 256)
            return q, scale, minus, 4, 32, d[:, 0], dmin[:, 0]
        qh = b[:, 16:48]                               # bit j of byte i: high bit of sub-block j, element i
        qs = b[:, 48:176].reshape(nb, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32)
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        return (low | (high << 4)).reshape(nb, 256).astype(np.int8), scale, minus, 5, 32, d[:, 0], dmin[:, 0]
    if kind == "Q6_K":
        ql = b[:, :128].reshape(nb, 2, 64)
        qh = b[:, 128:192].reshape(nb, 2, 32)
        low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(nb, 2, 4, 32)   # per half: 4 rows of 32
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)        # [nb, 2, 4, 32]
        q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(nb, 256)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210])
        return q, d * sc, None, 6, 16, d[:, 0], None
    raise KeyError(kind)


GGUF_KERNEL_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def from_gguf(data: np.ndarray, kind: str, shape: Sequence[int], name: str) -> QuantTensor:
    """A GGUF tensor's raw rows [N, bytes per row] of type `kind` -> QuantTensor [N, K]."""
    import gguf

    n, k = int(shape[0]), int(shape[1])
    try:
        qtype = gguf.GGMLQuantizationType[kind]
        elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    except KeyError:
        raise ValueError(f"GGUF tensor {name!r} has type {kind}, which is not supported") from None
    if k % elems or data.shape != (n, k // elems * nbytes):
        raise ValueError(f"GGUF tensor {name!r} ({kind}): raw data {data.shape} does not match {n}x{k}")
    if kind not in GGUF_KERNEL_TYPES:
        try:
            w = gguf.quants.dequantize(data, qtype).reshape(n, k).astype(np.float32)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"GGUF tensor {name!r} has type {kind}, which cannot be decoded: {e}") from None
        logger.info("GGUF tensor %s is %s, which has no kernel: re-quantised to int8 blocks of 32", name, kind)
        return quantize_int8(torch.from_numpy(w), block=KERNEL_BLOCK, source=f"gguf {kind}->int8")
    blocks = np.ascontiguousarray(data).reshape(-1, nbytes)
    q, scale, mn, bits, block, dsup, dmin = _decode_gguf_blocks(kind, blocks)

    def rows(a, per_row):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(n, per_row))

    return QuantTensor(torch.from_numpy(np.ascontiguousarray(q).reshape(n, k)), rows(scale, k // block),
                       rows(mn, k // block), bits, block, f"gguf {kind}", None, rows(dsup, k // elems),
                       rows(dmin, k // elems))


# ---------------------------------------------------------------------------- GPTQ / AWQ

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i of a packed int32 holds column 8j + _AWQ_ORDER[i]


def _unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 values holding 32 // bits fields each (lowest bits first), unpacked along `dim` -> uint8."""
    per = 32 // bits
    view = [1] * (packed.dim() + 1)
    view[dim + 1] = per
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(view)
    vals = (packed.to(torch.int32).unsqueeze(dim + 1) >> shifts) & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per
    return vals.reshape(shape).to(torch.uint8)


def from_gptq(qweight, qzeros, scales, g_idx, bits: int, group_size: int, name: str,
              zero_offset: int = 1, awq: bool = False) -> QuantTensor:
    """A GPTQ (qweight [K/pack, N]) or AWQ (qweight [K, N/pack]) linear -> QuantTensor [N, K].

    value[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]; GPTQ v1 stores zero - 1
    (zero_offset=1), v2 and AWQ store the zero itself (zero_offset=0)."""
    if bits not in (4, 8) or (awq and bits != 4):
        raise ValueError(f"{name}: {bits}-bit {'AWQ' if awq else 'GPTQ'} weights are not supported (4-bit"
                         f"{'' if awq else ' and 8-bit'} are)")
    if qzeros is None or scales is None:
        raise ValueError(f"{name}: quantized checkpoint is missing {'qzeros' if qzeros is None else 'scales'}")
    if awq:
        q = _unpack_int32(qweight, bits, dim=1)                        # [K, N] in AWQ's column order
        zeros = _unpack_int32(qzeros, bits, dim=1)
        order = torch.tensor([8 * (c // 8) + _AWQ_ORDER[c % 8] for c in range(q.shape[1])])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
        q, zeros = q[:, inv], zeros[:, inv]
    else:
        q = _unpack_int32(qweight, bits, dim=0)                        # [K, N]
        zeros = _unpack_int32(qzeros, bits, dim=1)                     # [G, N]
    k, n = q.shape
    groups = scales.shape[0]
    if scales.shape[1] != n or zeros.shape != (groups, n):
        raise ValueError(f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                         f"{tuple(scales.shape)} do not describe one {bits}-bit layer")
    if group_size in (-1, 0):
        group_size = k
    if k % group_size or group_size % KERNEL_BLOCK or k // group_size != groups:
        raise ValueError(f"{name}: group size {group_size} must divide the input dimension {k} into "
                         f"{groups} groups and be a multiple of {KERNEL_BLOCK}")
    if g_idx is None:
        g_idx = torch.arange(k) // group_size
    g_idx = g_idx.to(torch.long)
    if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups or \
            torch.bincount(g_idx, minlength=groups).ne(group_size).any():
        raise ValueError(f"{name}: g_idx does not assign {group_size} input rows to each of {groups} groups")
    perm = torch.argsort(g_idx, stable=True)
    # v1's "zero - 1" wraps (a zero of 0 is stored as all ones), as AutoGPTQ reads it
    zero = ((zeros.to(torch.int32) + zero_offset) & ((1 << bits) - 1)).to(torch.float32)
    s = scales.to(torch.float32)
    blocks = torch.arange(k // KERNEL_BLOCK) * KERNEL_BLOCK // group_size   # the group of each block
    scale = s[blocks].t().contiguous()                                       # [N, K/32]
    minus = (-(zero * s))[blocks].t().contiguous()
    act_order = not torch.equal(perm, torch.arange(k))
    qt = q[perm].t().contiguous()
    if bits == 8:  # unsigned 0..255 -> the kernel's signed int8: (q - 128) s + (min + 128 s)
        qt = (qt.to(torch.int16) - 128).to(torch.int8)
        minus = minus + 128 * scale
    return QuantTensor(qt, scale, minus, 4 if bits == 4 else 8, KERNEL_BLOCK,
                       f"{'awq' if awq else 'gptq'} {bits}-bit g{group_size}" + (" act-order" if act_order else ""),
                       perm if act_order else None)


# ---------------------------------------------------------------------------- int8 from float

def quantize_int8(w: torch.Tensor, block: int = KERNEL_BLOCK, source: str = "int8 per-channel",
                  per_channel: bool = True) -> QuantTensor:
    """Symmetric int8 of a float weight [N, K]: one scale per output row (or per block)."""
    w = w.float()
    n, k = w.shape
    nblocks = -(-k // block)
    if per_channel:
        amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        scale = (amax / 127.0).expand(n, nblocks).contiguous()
        q = torch.round(w / (amax / 127.0))
    else:
        pad = torch.nn.functional.pad(w, (0, nblocks * block - k)).view(n, nblocks, block)
        scale = (pad.abs().amax(dim=2) / 127.0).clamp_min(1e-30)
        q = torch.round(pad / scale[..., None]).view(n, -1)[:, :k]
    return QuantTensor(q.clamp(-127, 127).to(torch.int8), scale, None, 8, block, source)


def describe(parts: List[QuantTensor]) -> str:
    return ", ".join(sorted({p.source for p in parts}))
