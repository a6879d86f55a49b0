"""The `paged` KV backend (the baseline vAttention is measured against): one physical
tensor of fixed-size blocks per layer, block tables from the scheduler's KVManager.

Attention gathers each sequence's blocks into a contiguous scratch tensor and runs
the same C++ kernel (CPU fp32/bf16) or torch SDPA over it: the gather is the cost
of paging that vAttention avoids.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from sarathi.model_executor.kv_cache import KVCache, KVCacheSpec, StepBatch, slot_attention

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class PagedKVCache(KVCache):
    name = "paged"

    @classmethod
    def layout(cls, spec: KVCacheSpec) -> Tuple[int, int, int]:
        if spec.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {spec.block_size}")
        num_blocks = spec.kv_cache_memory // (spec.block_size * spec.bytes_per_token)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={spec.kv_cache_memory} bytes is less than one paged block "
                             f"({spec.block_size * spec.bytes_per_token} bytes)")
        return num_blocks, spec.block_size, spec.max_num_seqs

    def __init__(self, spec: KVCacheSpec):
        super().__init__(spec)
        self.num_blocks, self.block_size, _ = self.layout(spec)
        shape = (spec.num_layers, self.num_blocks * self.block_size, spec.num_kv_heads, spec.head_dim)
        # Committed up front, as a GPU allocation would be (zeros touches every page on CPU).
        self.k = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self._scratch = None

    def begin_step(self, batch: StepBatch) -> None:
        if batch.block_tables is None:
            raise ValueError("the paged KV backend needs block tables in the step batch")
        bs, dev = self.block_size, batch.device
        seq_lens = batch.seq_lens
        max_len = max(seq_lens) if seq_lens else 0
        for table, n in zip(batch.block_tables, seq_lens):
            if len(table) * bs < n:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {n} tokens")
        width = -(-max_len // bs)
        tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in batch.block_tables],
                              dtype=torch.long).reshape(len(seq_lens), width)
        pos = torch.arange(max_len)
        # Flat cache row of every token position of every sequence (padding reads row 0, unused).
        gather = tables[:, pos // bs] * bs + pos % bs
        rows = torch.cat([gather[i, c:c + n] for i, (c, n) in enumerate(zip(batch.context_lens, batch.query_lens))])
        t = batch.tensors
        t["paged_rows"] = rows.to(dev)
        t["paged_gather"] = gather.reshape(-1).to(dev)
        t["paged_max_len"] = torch.tensor(max_len)
        t["paged_slots"] = torch.arange(len(seq_lens), dtype=torch.int64)
        t["paged_context_lens"] = torch.tensor(batch.context_lens, dtype=torch.int64)
        t["paged_query_lens"] = torch.tensor(batch.query_lens, dtype=torch.int64)
        # Scratch for the gathered K and V, allocated once per step and reused by every layer.
        rows_needed = len(seq_lens) * max_len
        if self._scratch is None or self._scratch[0].shape[0] < rows_needed:
            shape = (max(rows_needed, 1), *self.k.shape[2:])
            self._scratch = (torch.empty(shape, dtype=self.k.dtype, device=self.k.device),
                             torch.empty(shape, dtype=self.k.dtype, device=self.k.device))

    def gather(self, layer: int, batch: StepBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """This step's sequences' K and V copied out of their blocks: [seqs, max_len, Hkv, D]."""
        t = batch.tensors
        n, L = len(batch.slots), int(t["paged_max_len"])
        idx = t["paged_gather"]
        ks, vs = (x[: n * L] for x in self._scratch)
        torch.index_select(self.k[layer], 0, idx, out=ks)
        torch.index_select(self.v[layer], 0, idx, out=vs)
        return ks.view(n, L, *self.k.shape[2:]), vs.view(n, L, *self.v.shape[2:])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch,
               scale: float) -> torch.Tensor:
        t = batch.tensors
        self.k[layer].index_copy_(0, t["paged_rows"], k.to(self.k.dtype))
        self.v[layer].index_copy_(0, t["paged_rows"], v.to(self.v.dtype))
        kg, vg = self.gather(layer, batch)
        if q.device.type == "cpu" and q.dtype in _KERNEL_DTYPES and q.dtype == kg.dtype:
            from vattention_ext.kernel import attention
            return attention(q, kg, vg, t["paged_slots"], t["paged_context_lens"], t["paged_query_lens"], scale)
        local = StepBatch(slots=list(range(len(batch.slots))), context_lens=batch.context_lens,
                          query_lens=batch.query_lens, device=batch.device)
        return slot_attention(q, kg, vg, local, scale)

    def stats(self) -> Dict[str, int]:
        total = 2 * self.k.numel() * self.k.element_size()
        return {"kv_bytes_total": total, "kv_bytes_committed": total}

    def close(self) -> None:
        self.k = self.v = self._scratch = None
