"""Many adapters in one forward pass: each Linear carries every loaded adapter's A and B in
stacked slots, and one step's rows are multiplied by their own adapter's pair in one native
call (Punica's SGMV: rows grouped by slot, csrc/quant/lora.cpp), not a Python loop over
adapters or rows. Off the CPU (or without the native module) two grouped matmuls do it.

For the fused layers (q/k/v, gate/up) a slot holds one rank-R block per part: A's columns
[i R, (i + 1) R) and B's rows [i R, (i + 1) R) belong to part i, and B writes only to that
part's output columns, so one pair of matmuls serves all parts.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Fused Linear of our Llama -> the HF modules it stacks (in output order).
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
               "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


try:
    from sarathi.lora.kernels import lora_sgmv
except ImportError:  # the native module is not built: grouped matmuls only
    lora_sgmv = None


class LoRABatch:
    """Which rows of the current step use which slot: rows sorted by slot (`perm`), the end
    offset of each slot's group (`offs`, as grouped_mm takes them) and the non-empty groups
    as (slot, begin, end) rows of `segs` (the native kernel's). Shared by every layer."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.perm: Optional[torch.Tensor] = None
        self.offs: Optional[torch.Tensor] = None
        self.row_slots: Optional[torch.Tensor] = None
        self.segs: Optional[torch.Tensor] = None

    def set_rows(self, row_slots: torch.Tensor) -> None:
        """row_slots [T] long: the slot of each row, -1 for the base model."""
        rows = torch.nonzero(row_slots >= 0).flatten()
        if rows.numel() == 0:
            self.clear()
            return
        slots = row_slots[rows]
        order = torch.argsort(slots, stable=True)
        self.perm = rows[order]
        self.row_slots = slots[order]
        counts = torch.bincount(self.row_slots, minlength=self.num_slots)
        ends = torch.cumsum(counts, 0)
        self.offs = ends.to(torch.int32)
        used = torch.nonzero(counts).flatten()
        self.segs = torch.stack([used, ends[used] - counts[used], ends[used]], 1).contiguous()

    def clear(self) -> None:
        self.perm = self.offs = self.row_slots = self.segs = None


class LoRAStack(torch.nn.Module):
    """The adapters' weights for one Linear: A [S, in, P*R], B [S, P*R, out] (float32)."""

    def __init__(self, in_features: int, parts: Sequence[Tuple[str, int, int]], num_slots: int, rank: int,
                 batch: LoRABatch, device: torch.device):
        super().__init__()
        self.parts = list(parts)                    # (hf module name, first output column, width)
        self.rank = rank
        out_features = sum(w for _, _, w in parts)
        width = rank * len(parts)
        self.register_buffer("A", torch.zeros(num_slots, in_features, width, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(num_slots, width, out_features, device=device), persistent=False)
        self.batch = batch
        self.part_cols = torch.tensor([[col, w] for _, col, w in self.parts], dtype=torch.int64)
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int64)  # each slot's adapter rank (<= rank)
        self.native = lora_sgmv is not None and device.type == "cpu"
        # Else torch's grouped_mm, which wants 16-byte aligned strides (float32: multiples of 4)
        # and runs here on CPU; else a gather and bmm.
        self.grouped = (hasattr(F, "grouped_mm") and device.type == "cpu"
                        and in_features % 4 == 0 and out_features % 4 == 0 and width % 4 == 0)

    def set_slot(self, slot: int, weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """weights: hf module name -> (A [r, in], B [out, r] scaled); missing parts stay zero."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.slot_ranks[slot] = max((weights[name][0].shape[0] for name, _, _ in self.parts if name in weights),
                                    default=0)
        for i, (name, col, width) in enumerate(self.parts):
            if name not in weights:
                continue
            a, b = weights[name]
            r = a.shape[0]
            self.A[slot, :, i * self.rank:i * self.rank + r] = a.t().to(self.A)
            self.B[slot, i * self.rank:i * self.rank + r, col:col + width] = b.t().to(self.B)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + each row's adapter delta (rows of the base model unchanged)."""
        b = self.batch
        if b.perm is None:
            return y
        if self.native and y.dtype is torch.float32:
            return lora_sgmv(x if x.dtype is torch.float32 else x.float(), self.A, self.B, b.perm, b.segs,
                             self.part_cols, self.rank, y, slot_ranks=self.slot_ranks)
        xs = x.index_select(0, b.perm).float()
        if self.grouped:
            delta = F.grouped_mm(F.grouped_mm(xs, self.A, offs=b.offs), self.B, offs=b.offs)
        else:  # BGMV: each row gathers its slot's pair
            delta = torch.bmm(torch.bmm(xs.unsqueeze(1), self.A[b.row_slots]), self.B[b.row_slots]).squeeze(1)
        return y.index_add_(0, b.perm, delta.to(y.dtype))


def lora_reference(x: torch.Tensor, row_slots: List[int], stack: LoRAStack) -> torch.Tensor:
    """Row by row, for tests: the delta each row's slot adds."""
    out = torch.zeros(x.shape[0], stack.B.shape[2])
    for i, s in enumerate(row_slots):
        if s >= 0:
            out[i] = x[i].float() @ stack.A[s] @ stack.B[s]
    return out
