"""The `paged` KV backend (the baseline vAttention is measured against): one physical
tensor of fixed-size blocks per layer, block tables from the scheduler's KVManager.

Attention gathers each sequence's blocks into a contiguous scratch tensor and runs
the same C++ kernel (CPU fp32/bf16) or the torch reference over it: the gather is the
cost of paging that vAttention avoids.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vattention_ext.kernel import KERNEL_DTYPES, AttentionPlan, attention_reference

from .base import KVBackend, KVCacheSpec, StepBatch


@dataclass
class PagedStep:
    rows: torch.Tensor            # flat cache row of every new token
    gather: torch.Tensor          # flat cache row of every position [seqs * max_len] (padding reads row 0)
    max_len: int
    slots: torch.Tensor           # 0..seqs-1: the gathered copy's own "slots"
    context_lens: torch.Tensor
    query_lens: torch.Tensor
    plan: Optional[AttentionPlan] = None  # C++ kernel over the gathered copy (CPU fp32/bf16)


class PagedBackend(KVBackend):
    name = "paged"
    needs_block_tables = True
    releases_behind_window = True   # a freed block is simply reused; the table holds RELEASED

    @classmethod
    def layout(cls, spec: KVCacheSpec) -> Tuple[int, int, int]:
        if spec.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {spec.block_size}")
        num_blocks = spec.kv_cache_memory // (spec.block_size * spec.bytes_per_token)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={spec.kv_cache_memory} bytes is less than one paged block "
                             f"({spec.block_size * spec.bytes_per_token} bytes)")
        return num_blocks, spec.block_size, spec.max_num_seqs

    @classmethod
    def mirror(cls, main: KVCacheSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCacheSpec:
        """The main model's block tables index the mirror's blocks: the same count of the same size."""
        spec = dataclasses.replace(main, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        num_blocks, block_size, _ = cls.layout(main)
        spec.kv_cache_memory = num_blocks * block_size * spec.bytes_per_token
        return spec

    def __init__(self, spec: KVCacheSpec):
        super().__init__(spec)
        self.num_blocks, self.block_size, _ = self.layout(spec)
        shape = (spec.num_layers, self.num_blocks * self.block_size, spec.num_kv_heads, spec.head_dim)
        # Committed up front, as a GPU allocation would be (zeros touches every page on CPU).
        self.k = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self._scratch = None

    # Prefix caching as vLLM does it: block tables name shared blocks; a handle is the block.
    supports_prefix_caching = True

    def retain(self, slot: int, page: int, block: int) -> int:
        return block

    def release(self, handles) -> None:
        pass

    def share_prefix(self, slot, table, handles, copy_src) -> None:
        if copy_src is None:
            return
        bs = self.block_size
        dst, src = table[len(handles)] * bs, copy_src * bs
        for cache in (self.k, self.v):   # every layer at once: [layers, rows, Hkv, D]
            cache[:, dst:dst + bs] = cache[:, src:src + bs]

    def begin_step(self, batch: StepBatch) -> PagedStep:
        if batch.block_tables is None:
            raise ValueError("the paged KV backend needs block tables in the step batch")
        bs, dev = self.block_size, batch.device
        seq_lens = batch.seq_lens
        max_len = max(seq_lens) if seq_lens else 0
        for table, n in zip(batch.block_tables, seq_lens):
            if len(table) * bs < n:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {n} tokens")
        width = -(-max_len // bs)
        # A released block (behind every window, -1) is read as block 0: attention masks it out.
        tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in batch.block_tables],
                              dtype=torch.long).reshape(len(seq_lens), width).clamp_(min=0)
        pos = torch.arange(max_len)
        gather = tables[:, pos // bs] * bs + pos % bs
        rows = torch.cat([gather[i, c:c + n] for i, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens))])
        # Scratch for the gathered K and V, allocated once per step and reused by every layer.
        rows_needed = len(seq_lens) * max_len
        if self._scratch is None or self._scratch[0].shape[0] < rows_needed:
            shape = (max(rows_needed, 1), *self.k.shape[2:])
            self._scratch = (torch.empty(shape, dtype=self.k.dtype, device=self.k.device),
                             torch.empty(shape, dtype=self.k.dtype, device=self.k.device))
        _, context_lens, query_lens = batch.index_tensors()
        step = PagedStep(rows.to(dev), gather.reshape(-1).to(dev), max_len,
                         torch.arange(len(seq_lens), dtype=torch.int64), context_lens, query_lens)
        if self.k.device.type == "cpu" and self.k.dtype in KERNEL_DTYPES:
            # Every layer's gathered K and V is a view of the same scratch: one geometry.
            kg = self._scratch[0][: rows_needed].view(len(seq_lens), max_len, *self.k.shape[2:])
            step.plan = AttentionPlan(kg, range(len(seq_lens)), batch.context_lens, batch.query_lens)
        return step

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: PagedStep) -> None:
        self.k[layer].index_copy_(0, step.rows, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, step.rows, v.to(self.v.dtype))

    def gather(self, layer: int, step: PagedStep) -> Tuple[torch.Tensor, torch.Tensor]:
        """This step's sequences' K and V copied out of their blocks: [seqs, max_len, Hkv, D]."""
        n, L = len(step.slots), step.max_len
        ks, vs = (x[: n * L] for x in self._scratch)
        torch.index_select(self.k[layer], 0, step.gather, out=ks)
        torch.index_select(self.v[layer], 0, step.gather, out=vs)
        return ks.view(n, L, *self.k.shape[2:]), vs.view(n, L, *self.v.shape[2:])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: PagedStep,
               scale: float) -> torch.Tensor:
        self.store(layer, k, v, step)
        kg, vg = self.gather(layer, step)
        window, cap = self.spec.window(layer), self.spec.attn_softcap
        if step.plan is not None and q.dtype == kg.dtype:
            return step.plan.run(q, None, None, kg, vg, scale, window=window, softcap=cap)
        return attention_reference(q, kg, vg, step.slots, step.context_lens, step.query_lens, scale, window, cap)

    def close(self) -> None:
        super().close()
        self._scratch = None
