"""The KV storage seam: where each running sequence's keys and values live.

One slot per running sequence. The scheduler's torch-free `KVManager` counts
blocks (see `KVCache.layout`); a `KVCache` owns the tensors, makes room for a step
(`begin_step`), stores new K/V and runs attention over them (`attend`).

Backends: `contiguous` (a preallocated [slots, max_len] tensor per layer, here),
`vattention` (virtual memory + on-demand pages, kv_cache_vattention.py) and `paged`
(block tables over one physical tensor, kv_cache_paged.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    max_num_seqs: int
    kv_cache_memory: int          # bytes of physical KV budget
    block_size: int = 16          # paged: tokens per block
    page_size: Optional[int] = None  # vattention: bytes per page (None: the extension's default)
    async_mapping: bool = True    # vattention: map ahead on a background thread

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.elem_size


@dataclass
class StepBatch:
    """One step's sequences as attention sees them: prefill chunks first, then decodes."""

    slots: List[int]
    context_lens: List[int]       # tokens already in the cache before this step
    query_lens: List[int]         # new tokens this step
    block_tables: Optional[List[List[int]]] = None
    num_prefills: int = 0         # the first num_prefills sequences carry prefill chunks
    device: torch.device = torch.device("cpu")
    # Tensors a backend builds once per step in begin_step and reuses in every layer.
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def seq_lens(self) -> List[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self) -> torch.Tensor:
        pos = [p for c, q in zip(self.context_lens, self.query_lens) for p in range(c, c + q)]
        return torch.tensor(pos, dtype=torch.long, device=self.device)


class KVCache:
    """Base class of the KV backends."""

    name = "base"

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec

    @classmethod
    def layout(cls, spec: KVCacheSpec) -> Tuple[int, int, int]:
        """(num_blocks, block_size_tokens, num_slots) that the scheduler's KVManager counts."""
        raise NotImplementedError

    def begin_step(self, batch: StepBatch) -> None:
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: StepBatch, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def free_slot(self, slot: int) -> None:
        """A sequence left its slot (finished, aborted or preempted)."""

    def stats(self) -> Dict[str, int]:
        return {}

    def close(self) -> None:
        """Release memory early (also happens when the object is collected)."""


def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   batch: StepBatch, scale: float) -> torch.Tensor:
    """Reference attention over slot-contiguous caches [slots, max_len, Hkv, D] (torch SDPA).

    The new tokens' K/V must already be stored. Causal within each chunk; GQA.
    """
    out = torch.empty_like(q)
    start = 0
    for slot, ctx, n in zip(batch.slots, batch.context_lens, batch.query_lens):
        total = ctx + n
        qs = q[start:start + n].transpose(0, 1).unsqueeze(0)            # [1,Hq,n,D]
        ks = k_cache[slot, :total].transpose(0, 1).unsqueeze(0)         # [1,Hkv,L,D]
        vs = v_cache[slot, :total].transpose(0, 1).unsqueeze(0)
        mask = None
        if n > 1:
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=ctx)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + n] = o.squeeze(0).transpose(0, 1)
        start += n
    return out


class ContiguousKVCache(KVCache):
    """Preallocated [slots, max_model_len, Hkv, D] K and V tensors per layer.

    Each slot holds a whole max-length sequence, so the budget buys
    kv_cache_memory // (max_model_len * bytes_per_token) slots.
    """

    name = "contiguous"

    @classmethod
    def layout(cls, spec: KVCacheSpec) -> Tuple[int, int, int]:
        slots = min(spec.max_num_seqs, spec.kv_cache_memory // (spec.max_model_len * spec.bytes_per_token))
        if slots < 1:
            raise ValueError(
                f"kv_cache_memory={spec.kv_cache_memory} bytes cannot hold one sequence of "
                f"max_model_len={spec.max_model_len} ({spec.max_model_len * spec.bytes_per_token} bytes) "
                "with the contiguous backend; raise --kv-cache-memory or lower --max-model-len")
        return slots, spec.max_model_len, slots

    def __init__(self, spec: KVCacheSpec):
        super().__init__(spec)
        slots = self.layout(spec)[2]
        shape = (spec.num_layers, slots, spec.max_model_len, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=spec.device)

    def begin_step(self, batch: StepBatch) -> None:
        # Flat row of every new token in a [slots * max_len] view of one layer's cache.
        L = self.spec.max_model_len
        rows = [s * L + p for s, c, n in zip(batch.slots, batch.context_lens, batch.query_lens)
                for p in range(c, c + n)]
        batch.tensors["cache_rows"] = torch.tensor(rows, dtype=torch.long, device=batch.device)

    def attend(self, layer, q, k, v, batch, scale):
        kc, vc = self.k[layer], self.v[layer]
        rows = batch.tensors["cache_rows"]
        kc.view(-1, *kc.shape[2:]).index_copy_(0, rows, k)
        vc.view(-1, *vc.shape[2:]).index_copy_(0, rows, v)
        return slot_attention(q, kc, vc, batch, scale)

    def stats(self) -> Dict[str, int]:
        total = 2 * self.k.numel() * self.k.element_size()
        return {"kv_bytes_total": total, "kv_bytes_committed": total}

    def close(self) -> None:
        self.k = self.v = None


def kv_cache_class(backend: str) -> type:
    if backend == "contiguous":
        return ContiguousKVCache
    if backend == "vattention":
        from sarathi.model_executor.kv_cache_vattention import VAttentionKVCache
        return VAttentionKVCache
    if backend == "paged":
        from sarathi.model_executor.kv_cache_paged import PagedKVCache
        return PagedKVCache
    raise ValueError(f"unknown KV cache backend {backend!r}")
