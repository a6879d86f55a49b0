"""`KVCache`: the vAttention cache object. Per layer one K and one V tensor of shape
[max_batch_size, max_context_len, num_kv_heads, head_dim] viewing reserved virtual
memory; `step` maps physical pages into each slot as its sequence grows.

Only the part of a slot covered by `step` is backed by memory: touching a token
beyond a slot's mapped length faults (SIGSEGV on CPU, an illegal address on CUDA),
exactly like reading past the end of an allocation. Kernels only read [slot, :len].
"""
from __future__ import annotations

from . import _C
from .kernel_memory import smaps_totals
from .page_size import default_page_size

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_name(dtype) -> str:
    """'float32' / 'bfloat16' / 'float16' from a torch dtype or a string."""
    name = str(dtype).replace("torch.", "")
    name = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    if name not in DTYPE_SIZES:
        raise ValueError(f"unsupported KV cache dtype {dtype!r}: use float32, bfloat16 or float16")
    return name


def parse_device(device) -> int:
    """-1 for CPU, the CUDA ordinal otherwise (accepts 'cpu', 'cuda', 'cuda:1', an int, a torch.device)."""
    if isinstance(device, int) and not isinstance(device, bool):
        if device < -1:
            raise ValueError(f"bad device ordinal {device}")
        return device
    text = str(device)
    if text == "cpu":
        return -1
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda[:N]'")


class _Region:
    """Array-interface view of one reserved region; keeps the native cache alive."""

    def __init__(self, ptr: int, nbytes: int, owner, cuda: bool):
        self.owner = owner
        desc = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}
        if cuda:
            desc["strides"] = None
            self.__cuda_array_interface__ = desc
        else:
            self.__array_interface__ = desc


class KVCache:
    """One vAttention KV cache (no global state; several may coexist).

    kv_cache_memory: physical budget in bytes; if given, the pool is created now,
    otherwise call `reserve_physical_pages` before the first `step`.
    map_ahead_tokens: how far `step_async` maps beyond each sequence in the background.
    commit_pool: on CUDA, create every pool page now (True) or each when first mapped, giving
    it back to the driver when freed (False; CPU pages always commit on first touch).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_batch_size: int,
                 max_context_len: int, dtype="float32", device="cpu", page_size: int | None = None,
                 kv_cache_memory: int | None = None, map_ahead_tokens: int | None = None,
                 commit_pool: bool = True):
        self.dtype_name = dtype_name(dtype)
        elem = DTYPE_SIZES[self.dtype_name]
        self.device_index = parse_device(device)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_batch_size, self.max_context_len = max_batch_size, max_context_len
        token_bytes = num_kv_heads * head_dim * elem
        if page_size is None:
            page_size = default_page_size(token_bytes, kv_cache_memory, cuda=self.device_index >= 0)
        if map_ahead_tokens is None:  # about one page ahead
            map_ahead_tokens = max(1, page_size // max(1, token_bytes))
        self._core = _C.KVCacheCore(num_layers, num_kv_heads, head_dim, elem, max_batch_size, max_context_len,
                                    page_size, self.device_index, map_ahead_tokens, bool(commit_pool))
        self.page_size = page_size
        self.bytes_per_token_per_layer = token_bytes
        self.tokens_per_page = page_size // token_bytes
        self._tensors = None
        if kv_cache_memory is not None:
            self.reserve_physical_pages(kv_cache_memory)

    # -- allocator -----------------------------------------------------------
    @property
    def core(self):
        if self._core is None:
            raise RuntimeError("this KVCache was closed")
        return self._core

    def reserve_physical_pages(self, nbytes: int) -> int:
        """Create the physical pool from a byte budget; returns the number of pages."""
        return self.core.reserve_physical_pages(int(nbytes))

    def alloc_slot(self, seqlen: int = 0) -> int:
        """A free slot (preferring one whose pages already cover seqlen), or -1."""
        return self.core.alloc_slot(int(seqlen))

    def free_slot(self, slot: int) -> None:
        """Release a slot; its pages are reclaimed later (deferred) or now."""
        self.core.free_slot(int(slot))

    def slot_active(self, slot: int) -> bool:
        return self.core.slot_active(int(slot))

    def step(self, seq_lens, eager_reclaim: bool = False) -> None:
        """Map pages so slot i covers seq_lens[i] tokens (0 = leave the slot alone).
        Raises OutOfPagesError, changing nothing, when the pool is short."""
        self.core.step([int(x) for x in seq_lens], bool(eager_reclaim))

    def step_async(self, seq_lens) -> None:
        """step() for these lengths now, then map ahead on the background thread."""
        self.core.step_async([int(x) for x in seq_lens])

    def wait_async(self) -> None:
        """Wait until the background mapping thread is idle."""
        self.core.wait_async()

    def set_deferred_reclamation(self, on: bool) -> None:
        self.core.set_deferred_reclamation(bool(on))

    def num_free_blocks(self) -> int:
        """Free plus reclaimable blocks (one block = one page in every K and V region)."""
        return self.core.num_free_blocks()

    def slot_blocks(self, slot: int) -> list[int]:
        return self.core.slot_blocks(int(slot))

    def share_prefix(self, slot: int, blocks, copy_src: int = -1) -> None:
        """Start a sequence in free slot `slot` with pinned `blocks` mapped at its first pages
        (the same physical pages other slots map), then a private copy of pinned block
        `copy_src` at the next page (copy on write), if one is given."""
        self.core.share_prefix(int(slot), [int(b) for b in blocks], int(copy_src))

    def release_front(self, slot: int, pages: int) -> None:
        """Unmap the first `pages` pages of an active slot: every layer's sliding window has
        passed them. Their blocks go back to the pool unless shared or pinned; the tokens
        there must never be read again (the memory behind them is gone)."""
        self.core.release_front(int(slot), int(pages))

    def pin(self, slot: int, page: int) -> int:
        """Keep the block at a live page of an active slot after the slot lets go; returns it."""
        return self.core.pin(int(slot), int(page))

    def unpin(self, block: int) -> None:
        """Drop a pin; the block is freed once no slot maps it."""
        self.core.unpin(int(block))

    def check_invariants(self) -> None:
        """Raise RuntimeError unless every block's reference count is its mappings plus
        pins, free blocks have none, and shared blocks sit only at live pages."""
        self.core.check_invariants()

    # -- memory figures --------------------------------------------------------
    def stats(self) -> dict:
        """Allocator figures plus, on CPU, the kernel's: `rss_bytes_mapped` (Rss of the
        reservations in /proc/self/smaps) and `pool_resident_bytes` (memfd blocks)."""
        st = self.core.stats()
        st["tokens_per_page"] = self.tokens_per_page
        st["device"] = "cpu" if self.device_index < 0 else f"cuda:{self.device_index}"
        if self.device_index < 0:
            mem = smaps_totals(self.region_ranges())
            st["rss_bytes_mapped"], st["pss_bytes_mapped"] = mem["Rss"], mem["Pss"]
        return st

    def region_ranges(self) -> list[tuple[int, int]]:
        size = self.core.slot_bytes * self.max_batch_size
        return [(p, p + size) for p in self.core.region_ptrs()]

    # -- tensors ---------------------------------------------------------------
    @property
    def tensors(self) -> list:
        """All K tensors, then all V tensors: each [max_batch, max_ctx, num_kv_heads, head_dim]."""
        if self._tensors is None:
            self._tensors = [self._region_tensor(p) for p in self.core.region_ptrs()]
        return self._tensors

    def k_cache(self, layer: int):
        return self.tensors[layer]

    def v_cache(self, layer: int):
        return self.tensors[self.num_layers + layer]

    def _region_tensor(self, ptr: int):
        import torch

        core = self.core
        nbytes = core.slot_bytes * self.max_batch_size
        region = _Region(ptr, nbytes, core, cuda=self.device_index >= 0)
        if self.device_index >= 0:
            raw = torch.as_tensor(region, device=f"cuda:{self.device_index}")
        else:
            import numpy as np

            raw = torch.from_numpy(np.asarray(region))
        typed = raw.view(getattr(torch, self.dtype_name))
        elem = DTYPE_SIZES[self.dtype_name]
        hd = self.head_dim
        shape = (self.max_batch_size, self.max_context_len, self.num_kv_heads, hd)
        strides = (core.slot_bytes // elem, self.num_kv_heads * hd, hd, 1)
        return typed.as_strided(shape, strides)

    def close(self) -> None:
        """Drop this object's hold on the native cache. Memory is released when the last
        tensor viewing it is gone too (so no live tensor ever points at unmapped memory)."""
        self._tensors = None
        self._core = None
