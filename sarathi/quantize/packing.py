"""Bit packing of the two checkpoint layouts, and the reference dequantizer.

GPTQ "v1" (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``; what vLLM's gptq/exllama/marlin
paths and transformers+optimum read), for a linear with weight ``W [out, in]``:

* ``qweight`` int32 ``[in * bits / 32, out]``: ``32 / bits`` consecutive *input* rows per int32,
  row ``8*r + j`` (4 bit) in bits ``4*j .. 4*j+3`` (lowest bits first).
* ``qzeros`` int32 ``[groups, out * bits / 32]``: the zero point of group ``g`` / output ``o``
  minus one (the v1 convention: loaders add 1 back), packed along the output dim, lowest first.
* ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32 ``[in]``: the group of each input column.
* ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - (stored_zero[g_idx[i], o] + 1))``.

AutoAWQ GEMM (``version: gemm``), 4 bit only:

* ``qweight`` int32 ``[in, out / 8]``: 8 *output* columns per int32, nibble ``k`` holding column
  ``8*c + AWQ_ORDER[k]`` (``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``).
* ``qzeros`` int32 ``[groups, out / 8]``, same packing, zero points stored as they are.
* ``scales`` fp16 ``[groups, out]``; group of input ``i`` is ``i // group_size``.
* ``W[o, i] = scales[g, o] * (q[i, o] - zeros[g, o])``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble k of a packed int32 holds column AWQ_ORDER[k]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]
SUPPORTED_BITS = (4, 8)
FORMATS = ("gptq", "awq")


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return 32 // bits


def pack_int32(values: torch.Tensor, bits: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dim, 32/bits per int32, lowest bits first.

    With ``order``, slot k of each packed word holds element ``order[k]`` of its run (AWQ)."""
    per = _check_bits(bits)
    v = values.to(torch.int64)
    if v.shape[-1] % per:
        raise ValueError(f"cannot pack a last dimension of {v.shape[-1]} into int32 words of {per} values")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values to pack must lie in [0, {(1 << bits) - 1}], got [{int(v.min())}, {int(v.max())}]")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
    packed = (v << shifts).sum(-1)  # disjoint bit fields: sum == bitwise or
    packed = torch.where(packed >= (1 << 31), packed - (1 << 32), packed)
    return packed.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of pack_int32: int64 values, last dim multiplied by 32/bits."""
    per = _check_bits(bits)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=p.device) * bits
    vals = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, slot]
    if order is not None:
        inverse = sorted(range(per), key=lambda k: order[k])  # column j lives in slot inverse[j]
        vals = vals[..., inverse]
    return vals.reshape(*p.shape[:-1], p.shape[-1] * per)


# --- GPTQ v1 -----------------------------------------------------------------------------------

def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, bits: int):
    """q [out, in] ints, zeros [groups, out] true zero points (>= 1) -> (qweight, qzeros)."""
    if zeros.numel() and int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 stores zero - 1, so zero points must be >= 1")
    qweight = pack_int32(q, bits).t().contiguous()          # [in/per, out]
    qzeros = pack_int32(zeros.to(torch.int64) - 1, bits)    # [groups, out/per]
    return qweight, qzeros


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int):
    """-> (q [out, in], zeros [groups, out]) with the v1 ``+1`` applied to zeros."""
    q = unpack_int32(qweight.t(), bits)
    zeros = unpack_int32(qzeros, bits) + 1
    return q, zeros


# --- AutoAWQ GEMM ------------------------------------------------------------------------------

def pack_awq(q: torch.Tensor, zeros: torch.Tensor, bits: int = 4):
    """q [out, in] ints, zeros [groups, out] -> (qweight [in, out/8], qzeros [groups, out/8])."""
    if bits != 4:
        raise ValueError(f"AWQ GEMM checkpoints are 4-bit only, got bits={bits}")
    return pack_int32(q.t(), 4, AWQ_ORDER), pack_int32(zeros, 4, AWQ_ORDER)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int = 4):
    if bits != 4:
        raise ValueError(f"AWQ GEMM checkpoints are 4-bit only, got bits={bits}")
    return unpack_int32(qweight, 4, AWQ_ORDER).t(), unpack_int32(qzeros, 4, AWQ_ORDER)


# --- reference dequantizer (the test oracle) -------------------------------------------------

def dequantize_checkpoint_tensor(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                                 g_idx: Optional[torch.Tensor] = None, *, bits: int = 4, fmt: str = "gptq",
                                 group_size: Optional[int] = None) -> torch.Tensor:
    """Turn one saved linear (qweight/qzeros/scales[/g_idx]) back into a float32 weight [out, in].

    ``fmt`` is "gptq" (v1 layout, zero stored minus one, g_idx honoured) or "awq" (GEMM layout).
    Without g_idx the group of input i is ``i // group_size`` (group_size defaults to in/groups;
    -1 means one group)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    q, zeros = (unpack_gptq if fmt == "gptq" else unpack_awq)(qweight, qzeros, bits)
    out, in_features = q.shape
    groups = scales.shape[0]
    if tuple(scales.shape) != (groups, out) or tuple(zeros.shape) != (groups, out):
        raise ValueError(f"inconsistent shapes: q {tuple(q.shape)}, zeros {tuple(zeros.shape)}, "
                         f"scales {tuple(scales.shape)}")
    if g_idx is None:
        gs = group_size if group_size is not None and group_size > 0 else in_features // max(groups, 1)
        g_idx = torch.arange(in_features, device=q.device) // gs
    g_idx = g_idx.to(torch.int64)
    if g_idx.shape != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"g_idx must be [{in_features}] with values in [0, {groups})")
    s = scales.float()[g_idx].t()           # [out, in]
    z = zeros.float()[g_idx].t()
    return (q.float() - z) * s
