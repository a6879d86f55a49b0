"""Module-level functions with the original vAttention names, over one default
`KVCache` for users who know that API. New code should use `KVCache` directly."""
from __future__ import annotations

from .cache import KVCache

_cache: KVCache | None = None


def _current() -> KVCache:
    if _cache is None:
        raise RuntimeError("no KV cache: call init_kvcache first")
    return _cache


def init_kvcache(num_layers: int, num_kv_heads: int, head_size: int, max_batch_size: int,
                 max_context_length: int, device, dtype, page_size: int | None = None,
                 megacache: bool = False) -> list:
    """Reserve the virtual K/V regions; returns 2*num_layers tensors (all K, then all V),
    each [max_batch_size, max_context_length, num_kv_heads, head_size]."""
    global _cache
    if megacache:
        raise NotImplementedError("megacache=True (one page spanning all layers) is not supported; use megacache=False")
    if _cache is not None:
        raise RuntimeError("a KV cache already exists: call cleanup() first")
    _cache = KVCache(num_layers, num_kv_heads, head_size, max_batch_size, max_context_length, dtype=dtype,
                     device=device, page_size=page_size)
    return list(_cache.tensors)


def reserve_physical_pages(nbytes: int) -> int:
    """Create the physical page pool from a byte budget; returns the page count."""
    return _current().reserve_physical_pages(nbytes)


def alloc_new_batch_idx(seqlen: int) -> int:
    """A free slot (batch index), or -1 when all slots are in use."""
    return _current().alloc_slot(seqlen)


def free_batch_idx(slot: int) -> None:
    _current().free_slot(slot)


def step(seq_lens, eager_reclaim: bool = False) -> None:
    """seq_lens has one entry per slot (0 = inactive); maps pages to cover them."""
    _current().step(seq_lens, eager_reclaim)


def step_async(seq_lens) -> None:
    _current().step_async(seq_lens)


def num_free_kvblocks() -> int:
    return _current().num_free_blocks()


def set_deferred_reclamation(on: bool) -> None:
    _current().set_deferred_reclamation(on)


def cleanup() -> None:
    """Forget the default cache (memory goes once the tensors init_kvcache returned are gone)."""
    global _cache
    if _cache is not None:
        _cache.close()
    _cache = None
