"""The native LoRA kernel wrapper: many adapters in one call (Punica's SGMV) on the CPU.

The kernel is compiled into the same extension as the quantized matmuls (csrc/quant) and runs on
the same thread pool; this wrapper checks every argument before a pointer reaches it.
"""
from __future__ import annotations

from typing import Optional

import torch

from sarathi.model_executor.quantization import _C
from vattention_ext.threads import native_threads

_F32 = torch.float32


def lora_sgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor, segs: torch.Tensor,
              parts: torch.Tensor, rank: int, y: torch.Tensor, *, slot_ranks: Optional[torch.Tensor] = None,
              num_threads: Optional[int] = None, isa: Optional[str] = None) -> torch.Tensor:
    """Many LoRA adapters in one call, added into y in place (Punica's SGMV, fp32, on the same
    thread pool as qlinear): for each (slot, begin, end) of segs [nseg, 3] int64 and each row r
    of rows[begin:end] (int64, distinct), y[r, c:c+w] += ((x[r] @ A[slot])[p R:(p+1) R]) @
    B[slot, p R:(p+1) R, c:c+w] for every part p = (c, w) of parts [P, 2] int64.

    x float32 [T, in] (unit column stride), A [S, in, W], B [S, W, out] contiguous float32,
    y float32 [T, out] with unit column stride. slot_ranks: int64 [S], each slot's adapter rank
    (<= rank; the columns beyond it are zero and skipped), default all `rank`."""
    for name, t in (("x", x), ("y", y)):
        if (not isinstance(t, torch.Tensor) or t.dtype is not _F32 or not t.is_cpu or t.ndim != 2
                or (t.shape[1] > 1 and t.stride(1) != 1) or (t.shape[0] > 1 and t.stride(0) < t.shape[1])):
            raise ValueError(f"{name} must be a float32 CPU matrix with unit column stride")
    for name, t in (("A", A), ("B", B)):
        if t.dtype is not _F32 or not t.is_cpu or t.ndim != 3 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor [S, rows, cols]")
    ints = [("rows", rows), ("segs", segs), ("parts", parts)]
    if slot_ranks is not None:
        ints.append(("slot_ranks", slot_ranks))
        if slot_ranks.shape != (A.shape[0],):
            raise ValueError(f"slot_ranks must have one rank per slot ({A.shape[0]})")
    for name, t in ints:
        if t.dtype is not torch.int64 or not t.is_cpu or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 CPU tensor")
    S, K, W = A.shape
    T, N = y.shape
    if B.shape[:2] != (S, W) or x.shape != (T, K) or B.shape[2] != N:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"y {tuple(y.shape)}")
    if segs.ndim != 2 or segs.shape[1] != 3 or parts.ndim != 2 or parts.shape[1] != 2:
        raise ValueError("segs must be [nseg, 3] and parts [P, 2]")
    if T == 0 or segs.shape[0] == 0:
        return y
    _C.lora_sgmv(x.data_ptr(), max(x.stride(0), K), K, A.data_ptr(), B.data_ptr(), S, W, N, rows.data_ptr(),
                 rows.numel(), T, segs.data_ptr(), segs.shape[0], parts.data_ptr(), parts.shape[0], int(rank),
                 0 if slot_ranks is None else slot_ranks.data_ptr(), y.data_ptr(), max(y.stride(0), N),
                 native_threads() if num_threads is None else int(num_threads), isa or "")
    return y
