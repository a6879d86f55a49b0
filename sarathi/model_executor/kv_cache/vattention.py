"""The `vattention` KV backend: one virtually contiguous slot per sequence per layer,
physical pages mapped in by vattention_ext as sequences grow (mapping for the next
tokens overlaps the forward pass when async_mapping is on).

Attention: the C++ kernel over the slot-contiguous cache on CPU (fp32/bf16);
flash_attn_with_kvcache(cache_batch_idx=...) for decodes on CUDA when flash-attn is
importable; the torch reference (SDPA) otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from vattention_ext.kernel import KERNEL_DTYPES, AttentionPlan, attention_reference

from .base import KVBackend, KVCacheSpec, StepBatch


@dataclass
class VAttentionStep:
    batch: StepBatch
    plan: Optional[AttentionPlan] = None       # C++ kernel path: the step's sequences, validated once
    store_slot: Optional[torch.Tensor] = None  # torch paths: (slot, position) of every new token
    store_pos: Optional[torch.Tensor] = None


def _page_size(spec: KVCacheSpec) -> int:
    from vattention_ext import default_page_size

    token_bytes = spec.num_kv_heads * spec.head_dim * spec.elem_size
    if spec.page_size is not None:
        return spec.page_size
    return default_page_size(token_bytes, spec.kv_cache_memory, cuda=spec.device.type == "cuda")


class VAttentionBackend(KVBackend):
    name = "vattention"
    releases_behind_window = True

    @classmethod
    def release_window(cls, spec: KVCacheSpec) -> int:
        # On CPU both attention paths read only the window; flash-attn on CUDA is not checked
        # to leave the unmapped pages before it alone, so CUDA keeps them.
        return super().release_window(spec) if spec.device.type == "cpu" else 0

    @classmethod
    def layout(cls, spec: KVCacheSpec) -> Tuple[int, int, int]:
        """One block = one page in every layer's K and V region; block_size = whole tokens per page."""
        page = _page_size(spec)
        token_bytes = spec.num_kv_heads * spec.head_dim * spec.elem_size
        tokens_per_page = page // token_bytes
        if tokens_per_page < 1:
            raise ValueError(f"page size {page} bytes is smaller than one token's K (or V) in one layer "
                             f"({token_bytes} bytes); use a larger --page-size")
        num_blocks = spec.kv_cache_memory // (page * 2 * spec.num_layers)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={spec.kv_cache_memory} bytes is less than one vAttention block "
                             f"({page * 2 * spec.num_layers} bytes = page {page} x 2 x {spec.num_layers} layers)")
        return num_blocks, tokens_per_page, spec.max_num_seqs

    @classmethod
    def block_bytes(cls, spec: KVCacheSpec) -> Tuple[int, int]:
        return _page_size(spec), spec.num_kv_heads * spec.head_dim * spec.elem_size

    @classmethod
    def mirror(cls, main: KVCacheSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCacheSpec:
        """Pages of the main model's size: every slot rounds up to whole pages, so the mirror
        needs at most one extra page per slot beyond the main model's tokens."""
        page = _page_size(main)
        spec = dataclasses.replace(main, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                   page_size=page)
        token_bytes = num_kv_heads * head_dim * spec.elem_size
        if page // token_bytes < 1:
            raise ValueError(f"the page size {page} is smaller than one token's K of the second model "
                             f"({token_bytes} bytes)")
        num_blocks, block_size, slots = cls.layout(main)
        pages = -(-num_blocks * block_size // (page // token_bytes)) + slots
        spec.kv_cache_memory = pages * page * 2 * num_layers
        return spec

    def __init__(self, spec: KVCacheSpec):
        super().__init__(spec)
        import vattention_ext

        self.layout(spec)  # validates before reserving anything
        device = "cpu" if spec.device.type == "cpu" else f"cuda:{spec.device.index or 0}"
        self.cache = vattention_ext.KVCache(
            spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_num_seqs, spec.max_model_len,
            dtype=spec.dtype, device=device, page_size=_page_size(spec), kv_cache_memory=spec.kv_cache_memory)
        self.k = [self.cache.k_cache(i) for i in range(spec.num_layers)]
        self.v = [self.cache.v_cache(i) for i in range(spec.num_layers)]
        self._seq_lens = [0] * spec.max_num_seqs
        self._native = spec.device.type == "cpu" and spec.dtype in KERNEL_DTYPES
        self._flash = None
        if spec.device.type == "cuda":
            try:
                from flash_attn import flash_attn_with_kvcache
                self._flash = flash_attn_with_kvcache
            except ImportError:
                pass

    def begin_step(self, batch: StepBatch) -> VAttentionStep:
        lens = self._seq_lens
        for i in range(len(lens)):
            lens[i] = 0
        for slot, n in zip(batch.slots, batch.seq_lens):
            lens[slot] = n
        if self.spec.async_mapping:
            self.cache.step_async(lens)  # maps this step's pages, then maps ahead in the background
        else:
            self.cache.step(lens)
        step = VAttentionStep(batch)
        if self._native:  # every layer's K and V cache shares layer 0's geometry
            step.plan = AttentionPlan(self.k[0], batch.slots, batch.context_lens, batch.query_lens)
        else:
            pos = [(s, p) for s, c, n in zip(batch.slots, batch.context_lens, batch.query_lens)
                   for p in range(c, c + n)]
            step.store_slot = torch.tensor([s for s, _ in pos], dtype=torch.long, device=batch.device)
            step.store_pos = torch.tensor([p for _, p in pos], dtype=torch.long, device=batch.device)
        return step

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: VAttentionStep,
               scale: float) -> torch.Tensor:
        kc, vc = self.k[layer], self.v[layer]
        window, cap = self.spec.window(layer), self.spec.attn_softcap
        plan = step.plan
        if plan is not None:
            if q.dtype == plan.dtype and k.dtype == plan.dtype and v.dtype == plan.dtype:
                return plan.run(q, k, v, kc, vc, scale, window=window, softcap=cap)
            dt = plan.dtype
            return plan.run(q.to(dt), k.to(dt), v.to(dt), kc, vc, scale, window=window, softcap=cap).to(q.dtype)
        kc[step.store_slot, step.store_pos] = k.to(kc.dtype)
        vc[step.store_slot, step.store_pos] = v.to(vc.dtype)
        b = step.batch
        if self._flash is not None and b.num_prefills == 0:
            return self._flash_decode(q, kc, vc, b, scale, window, cap)
        return attention_reference(q, kc, vc, b.slots, b.context_lens, b.query_lens, scale, window, cap)

    def _flash_decode(self, q, kc, vc, batch: StepBatch, scale, window: int, softcap: float):
        dev = q.device
        seqlens = torch.tensor(batch.seq_lens, dtype=torch.int32, device=dev)
        idx = torch.tensor(batch.slots, dtype=torch.int32, device=dev)
        # flash-attn's left window counts the keys before the query's own: window - 1.
        out = self._flash(q.unsqueeze(1), kc, vc, cache_seqlens=seqlens, cache_batch_idx=idx, softmax_scale=scale,
                          window_size=(window - 1 if window else -1, 0), softcap=softcap)
        return out.squeeze(1)

    # Prefix caching: the same physical pages mapped at the same offsets of several slots (on
    # CUDA the same cuMemCreate handle at several addresses); a handle is the pool block the
    # cache pins; the partly filled last page is copied (memfd pread/pwrite, cuMemcpyDtoD).
    supports_prefix_caching = True

    def retain(self, slot: int, page: int, block: int) -> int:
        return self.cache.pin(slot, page)

    def release(self, handles) -> None:
        for h in handles:
            self.cache.unpin(h)

    def share_prefix(self, slot, table, handles, copy_src) -> None:
        self.cache.share_prefix(slot, handles, -1 if copy_src is None else copy_src)

    def release_front(self, slot: int, pages: int) -> None:
        # A mirror (optimal sampling's adapter target) holds only the sequences that use it.
        if self.cache.slot_active(slot):
            self.cache.release_front(slot, pages)

    def free_slot(self, slot: int) -> None:
        # The scheduler may free a slot this cache never saw (aborted before its first step).
        if self.cache.slot_active(slot):
            self.cache.free_slot(slot)

    def stats(self) -> Dict[str, int]:
        st = self.cache.stats()
        page = st["page_size"]
        out = {
            "kv_bytes_total": st["physical_bytes_pool"],
            "kv_bytes_mapped": st["pages_mapped"] * page,
            "kv_bytes_free": (st["pages_free"] + st["pages_reclaimable"]) * page,
            "kv_bytes_reserved_virtual": st["virtual_bytes_reserved"],
            "kv_page_size": page,
            "kv_blocks_pinned": st["blocks_pinned"],
            "kv_bytes_released": st["pages_released"] * page,
            "kv_block_mappings_shared": st["block_mappings_shared"],
        }
        # Committed = the pool's physical pages as the kernel counts them (memfd blocks, each
        # page once however many slots map it, as prefix sharing does); on CUDA the driver
        # committed every pool page at cuMemCreate. Rss of our mappings counts a shared page
        # once per mapping.
        out["kv_bytes_committed"] = st["pool_resident_bytes"]
        if "rss_bytes_mapped" in st:
            out["kv_bytes_rss_mapped"] = st["rss_bytes_mapped"]
        return out

    def close(self) -> None:
        super().close()
        self.cache.close()
