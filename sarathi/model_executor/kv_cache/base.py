"""The KV storage seam: where each running sequence's keys and values live.

One slot per running sequence. A `KVBackend` owns the K/V memory, makes room for a
step (`begin_step`, which returns the backend's own typed per-step state) and, per
layer, stores the step's new K/V and runs attention over the cache (`attend`).

A *block* means one thing everywhere: the unit the scheduler's torch-free
`KVManager` counts, `block_size` tokens of K and V in every layer. What backs it
differs: a paged block of each layer's tensor (`paged`), one page in each layer's K
and V region (`vattention`), a whole max-length slot (`contiguous`).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

logger = logging.getLogger("sarathi")


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
    sliding_windows: Tuple[int, ...] = ()  # per layer: the keys a query sees (0 = all); () = no window
    attn_softcap: float = 0.0     # attention scores -> cap * tanh(scores / cap) (Gemma 2); 0 = off
    act_dtype: Optional[torch.dtype] = None  # the queries' (activations') dtype when not `dtype` (a half KV cache)

    def window(self, layer: int) -> int:
        return self.sliding_windows[layer] if self.sliding_windows else 0

    @property
    def query_dtype(self) -> torch.dtype:
        return self.act_dtype or self.dtype

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
    block_tables: Optional[List[List[int]]] = None  # backends with needs_block_tables only
    num_prefills: int = 0         # the first num_prefills sequences carry prefill chunks
    device: torch.device = torch.device("cpu")

    @property
    def seq_lens(self) -> List[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self) -> torch.Tensor:
        pos = [p for c, q in zip(self.context_lens, self.query_lens) for p in range(c, c + q)]
        return torch.tensor(pos, dtype=torch.long, device=self.device)

    def index_tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, context_lens, query_lens) as int64 CPU tensors, the attention kernels' input."""
        return tuple(torch.tensor(x, dtype=torch.int64) for x in (self.slots, self.context_lens, self.query_lens))


class KVBackend:
    """Base class of the KV backends. Subclasses set `name` and implement the four methods."""

    name = "base"
    needs_block_tables = False    # True: StepBatch.block_tables must come from the KVManager

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        self.k = self.v = None    # subclasses: per-layer K and V storage
        self._handles: Dict[int, int] = {}   # prefix cache: the scheduler's block id -> our handle
        self.retain_failed: List[int] = []   # blocks that could not be retained (the cache forgets them)

    @classmethod
    def layout(cls, spec: KVCacheSpec) -> Tuple[int, int, int]:
        """(num_blocks, block_size_tokens, num_slots) that the scheduler's KVManager counts."""
        raise NotImplementedError

    @classmethod
    def block_bytes(cls, spec: KVCacheSpec) -> Tuple[int, int]:
        """(bytes of one block, bytes of one token) in one layer's K: how tokens fall into
        blocks. Default: block_size whole tokens per block."""
        return cls.layout(spec)[1], 1

    @classmethod
    def mirror(cls, main: KVCacheSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCacheSpec:
        """The spec of a second model's KV in the same slots (optimal sampling's target, a
        draft model): sized so that whatever the scheduler admits for `main` fits it too.
        Default: room for every slot at full length."""
        spec = dataclasses.replace(main, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        spec.kv_cache_memory = main.max_num_seqs * main.max_model_len * spec.bytes_per_token
        return spec

    # Sliding windows: when every layer slides, the blocks all windows have passed are never
    # read again; the KVManager frees them (its table keeps RELEASED in their place) and
    # `release_front` lets the backend drop the memory at those pages. A backend with a pool
    # per layer group (`releases_per_group`) also releases the sliding layers' pages of models
    # that mix them with full-attention layers; the KVManager then counts both pools.
    releases_behind_window = False
    releases_per_group = False

    @classmethod
    def release_window(cls, spec: KVCacheSpec) -> int:
        """The window (tokens) behind which the KVManager may free a sequence's blocks (or, mixed,
        their sliding layers' part): the largest window, so no layer loses a key it reads; 0 =
        never. Second KVs of the same spec (an adapter target's) release with it; the engine
        releases nothing beside a second model of its own (its pages fall elsewhere)."""
        w = spec.sliding_windows
        if not cls.releases_behind_window or not any(w):
            return 0
        return max(w) if all(w) or cls.releases_per_group else 0

    @classmethod
    def window_layers(cls, spec: KVCacheSpec) -> Tuple[int, int]:
        """(sliding layers, layers) for the KVManager's accounting when `release_window` > 0."""
        return sum(1 for x in spec.sliding_windows if x), spec.num_layers

    def release_front(self, slot: int, pages: int) -> None:
        """The first `pages` pages of `slot` are behind every sliding layer's window. Default:
        nothing to do (a paged backend's freed blocks are just reused; the table names them no more)."""

    # Prefix caching: blocks shared by several sequences. `retain` keeps the block at a
    # computed page of a slot for the cache and returns the backend's handle for it;
    # `release` lets handles go; `share_prefix` starts a sequence on cached blocks.
    supports_prefix_caching = False

    def retain(self, slot: int, page: int, block: int) -> int:
        raise NotImplementedError

    def release(self, handles: List[int]) -> None:
        raise NotImplementedError

    def share_prefix(self, slot: int, table: List[int], handles: List[int], copy_src: Optional[int]) -> None:
        """Give the sequence in `slot` (block table `table`) the cached blocks `handles` as its
        first pages and a copy of `copy_src` as the next one."""
        raise NotImplementedError

    # The scheduler's memory operations (core/kv_manager.py) call these, in order.
    def retain_block(self, slot: int, page: int, block: int) -> None:
        try:
            self._handles[block] = self.retain(slot, page, block)
        except Exception:  # noqa: BLE001 - the block just is not cached
            logger.exception("could not retain a prefix-cache block")
            self.retain_failed.append(block)

    def release_blocks(self, blocks: Iterable[int]) -> None:
        handles = [self._handles.pop(b) for b in blocks if b in self._handles]
        if handles:
            self.release(handles)

    def share_blocks(self, slot: int, blocks: Iterable[int], copy_src: Optional[int], table: List[int]) -> None:
        handles = [self._handles[b] for b in blocks]
        self.share_prefix(slot, table, handles, None if copy_src is None else self._handles[copy_src])

    def begin_step(self, batch: StepBatch):
        """Make room for the step; returns the state `attend` needs in every layer."""
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step, scale: float) -> torch.Tensor:
        """Store this layer's new K/V [T, Hkv, D], then causal GQA attention for q [T, Hq, D]."""
        raise NotImplementedError

    def free_slot(self, slot: int) -> None:
        """A sequence left its slot (finished, aborted or preempted)."""

    def stats(self) -> Dict[str, int]:
        """Bytes of KV memory; backends with preallocated tensors commit all of it up front."""
        if not isinstance(self.k, torch.Tensor):
            return {}
        total = 2 * self.k.numel() * self.k.element_size()
        return {"kv_bytes_total": total, "kv_bytes_committed": total}

    def close(self) -> None:
        """Release memory early (also happens when the object is collected)."""
        self.k = self.v = None
