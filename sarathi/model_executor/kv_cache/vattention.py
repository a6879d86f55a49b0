"""The `vattention` KV backend: one virtually contiguous slot per sequence per layer,
physical pages mapped in by vattention_ext as sequences grow (mapping for the next
tokens overlaps the forward pass when async_mapping is on).

Attention: the C++ kernel over the slot-contiguous cache on CPU (fp32, bf16 or fp16 K/V;
fp32 or bf16 queries);
flash_attn_with_kvcache(cache_batch_idx=...) for decodes on CUDA when flash-attn is
importable; the torch reference (SDPA) otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from vattention_ext.kernel import QUERY_DTYPES, AttentionPlan, attention_reference

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


FLASH_KEY_TILE = 256   # the widest key tile of flash-attn 2's kernels


def _mixed(spec: KVCacheSpec) -> bool:
    """Some layers slide and some attend to everything (Gemma 2/3, Qwen2's max_window_layers)."""
    return any(spec.sliding_windows) and not all(spec.sliding_windows)


class VAttentionBackend(KVBackend):
    name = "vattention"
    releases_behind_window = True
    # A model mixing sliding and full layers gets a cache (region set and page pool) per
    # layer group: the sliding group's pages behind the window are unmapped while the full
    # group keeps its own. Each pool can take the whole budget in its own blocks; the
    # scheduler's KVManager keeps their sum within it (it counts layer pages), and both pools
    # commit memory only as pages are mapped (memfd holes on CPU).
    releases_per_group = True

    @classmethod
    def release_window(cls, spec: KVCacheSpec) -> int:
        # On CPU both attention paths read only the window. On CUDA, flash-attn's decode reads
        # whole key tiles (kBlockN <= 256 keys), the first starting up to 255 keys before the
        # window's first key (masked, but read): those pages stay mapped too.
        w = super().release_window(spec)
        return w + FLASH_KEY_TILE if w and spec.device.type == "cuda" else w

    @staticmethod
    def group_budgets(spec: KVCacheSpec) -> Tuple[int, int]:
        """Bytes of the full layers' pool and of the sliding layers' pool (mixed models): the
        full one holds every block the KVManager may count (its ids), the sliding one the
        budget's whole blocks."""
        num_blocks = VAttentionBackend.layout(spec)[0]
        page, layers = _page_size(spec), spec.num_layers
        sliding = sum(1 for w in spec.sliding_windows if w)
        ids = num_blocks * layers // (layers - sliding)   # KVManager's mixed_block_ids
        return ids * page * 2 * (layers - sliding), num_blocks * page * 2 * sliding

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
        def cache(layers: int, budget: int, commit: bool = True):
            return vattention_ext.KVCache(
                layers, spec.num_kv_heads, spec.head_dim, spec.max_num_seqs, spec.max_model_len,
                dtype=spec.dtype, device=device, page_size=_page_size(spec), kv_cache_memory=budget,
                commit_pool=commit)

        self.sliding = None   # mixed models: the sliding layers' cache (self.cache holds the full ones)
        if _mixed(spec) and type(self).release_window(spec):
            full_layers = [i for i, w in enumerate(spec.sliding_windows) if not w]
            sliding_layers = [i for i, w in enumerate(spec.sliding_windows) if w]
            full_budget, sliding_budget = self.group_budgets(spec)
            # Together the pools could exceed the budget: on CUDA too, pages take memory only
            # while mapped (the KVManager keeps the mapped ones within the budget).
            self.cache = cache(len(full_layers), full_budget, commit=False)
            self.sliding = cache(len(sliding_layers), sliding_budget, commit=False)
            where = {layer: (self.cache, j) for j, layer in enumerate(full_layers)}
            where.update({layer: (self.sliding, j) for j, layer in enumerate(sliding_layers)})
            # Mapped pages are exactly the live ones (what the KVManager counts): no pages kept
            # by freed slots, no mapping ahead.
            for c in (self.cache, self.sliding):
                c.set_deferred_reclamation(False)
        else:
            self.cache = cache(spec.num_layers, spec.kv_cache_memory)
            where = {layer: (self.cache, layer) for layer in range(spec.num_layers)}
        self.caches = [c for c in (self.cache, self.sliding) if c is not None]
        self.k = [where[i][0].k_cache(where[i][1]) for i in range(spec.num_layers)]
        self.v = [where[i][0].v_cache(where[i][1]) for i in range(spec.num_layers)]
        self._seq_lens = [0] * spec.max_num_seqs
        self._native = spec.device.type == "cpu" and spec.dtype in QUERY_DTYPES.get(spec.query_dtype, ())
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
        if self.sliding is not None:
            for c in self.caches:
                c.step(lens)
        elif self.spec.async_mapping:
            self.cache.step_async(lens)  # maps this step's pages, then maps ahead in the background
        else:
            self.cache.step(lens)
        step = VAttentionStep(batch)
        if self._native:  # every layer's K and V cache shares layer 0's geometry
            step.plan = AttentionPlan(self.k[0], batch.slots, batch.context_lens, batch.query_lens,
                                      q_dtype=self.spec.query_dtype)
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

    # Mixed models: a handle is the pair of blocks pinned in both caches at the same page.
    def retain(self, slot: int, page: int, block: int):
        if self.sliding is None:
            return self.cache.pin(slot, page)
        full = self.cache.pin(slot, page)
        try:
            return full, self.sliding.pin(slot, page)
        except Exception:
            self.cache.unpin(full)
            raise

    def release(self, handles) -> None:
        for h in handles:
            for c, b in zip(self.caches, h if self.sliding is not None else (h,)):
                c.unpin(b)

    def share_prefix(self, slot, table, handles, copy_src) -> None:
        if self.sliding is None:
            self.cache.share_prefix(slot, handles, -1 if copy_src is None else copy_src)
            return
        for g, c in enumerate(self.caches):
            c.share_prefix(slot, [h[g] for h in handles], -1 if copy_src is None else copy_src[g])

    def release_front(self, slot: int, pages: int) -> None:
        # Every layer slides, or (mixed) the sliding layers' cache; a mirror (optimal sampling's
        # adapter target) holds only the sequences that use it.
        cache = self.sliding or self.cache
        if cache.slot_active(slot):
            cache.release_front(slot, pages)

    def free_slot(self, slot: int) -> None:
        # The scheduler may free a slot this cache never saw (aborted before its first step).
        for c in self.caches:
            if c.slot_active(slot):
                c.free_slot(slot)

    def check_invariants(self) -> None:
        """The native caches' own checks (tests)."""
        for c in self.caches:
            c.check_invariants()

    def stats(self) -> Dict[str, int]:
        sts = [c.stats() for c in self.caches]
        st = {k: sum(x[k] for x in sts) if isinstance(v, int) else v for k, v in sts[0].items()}
        page = st["page_size"] = sts[0]["page_size"]
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
        if self.sliding is not None:   # the two layer groups' pools, as the kernel counts them
            # Each pool could take the whole budget; the budget is what the KVManager shares out.
            out["kv_bytes_total"] = self.layout(self.spec)[0] * page * 2 * self.spec.num_layers
            out["kv_bytes_free"] = out["kv_bytes_total"] - out["kv_bytes_mapped"]
            out["kv_bytes_mapped_global"] = sts[0]["pages_mapped"] * page
            out["kv_bytes_mapped_sliding"] = sts[1]["pages_mapped"] * page
        return out

    def close(self) -> None:
        super().close()
        for c in self.caches:
            c.close()
