"""Torch-free accounting of KV memory for the scheduler, with automatic prefix caching.

Memory is counted in blocks (a paged block; for vAttention one page in every layer's K
and V region; for the contiguous backend a whole slot). A block spans `page_bytes` bytes
of each layer's K (and V) where one token takes `token_bytes`: paged blocks hold
`block_size` whole tokens (page_bytes = block_size, token_bytes = 1), a vAttention page
need not end on a token boundary. Every running sequence also holds one slot.

Prefix caching (vLLM's design, on our blocks): a block whose tokens are all computed
gets an identity, the SHA-256 of its parent's identity and the ids of every token with
bytes in it; the root of the chain is the cache's namespace (model, tokenizer) plus the
sequence's salt (tenant, adapter). A global table maps identities to blocks; blocks
carry reference counts (how many sequences' tables hold them). A cached block that no
sequence holds is free memory kept on an LRU list and evicted only when a block is
needed, oldest first and, among blocks freed together, the tail of the longer prefix
first, so caching never costs a preemption. A new sequence starts with the longest
chain of cached blocks it matches (shared, counted once), plus possibly the block after
them, partially matched: that one is copied (copy on write) because the sequence will
write into it.

This file decides; the runner's KV backend makes it real (the same physical page mapped
in several slots, or several block tables naming one block). What the backend must do
to memory leaves here as typed operations, in order (`take_ops`), and travels to the
runner in the scheduler's output: `RetainBlock` (the cache keeps a computed page),
`ReleaseBlocks` (it lets go of evicted ones), `SharePrefix` (a new sequence starts on
cached pages) and `FreeSlot` (a sequence left its slot). The order matters and is kept:
a page is retained before its slot is freed, a slot is freed before a new sequence
shares pages into it.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union


@dataclass
class CachedBlock:
    block: int
    index: int                 # position of the block in its sequences
    parent: bytes              # identity of the chain before it (a root for index 0)
    tokens: Tuple[int, ...]    # tokens with computed bytes here (the whole span once full)
    hash: Optional[bytes] = None   # set once the block is full


@dataclass
class PrefixHit:
    """What a waiting sequence would reuse if admitted now."""

    num_cached_tokens: int = 0
    shared: List[int] = field(default_factory=list)   # blocks aliased at the head of its table
    copy_src: Optional[int] = None                    # cached block copied into table[len(shared)]
    num_evictable: int = 0     # of shared + copy_src, blocks that today count as free

    @property
    def blocks_reused(self) -> int:
        return len(self.shared)


# Each operation applies itself to a KV backend (model_executor/kv_cache/base.py), so the
# runner needs no import of this torch-free layer. `mirror` applies what concerns second
# models (which mirror the slots, not the cache): a freed slot, pages behind the window.

@dataclass(frozen=True)
class RetainBlock:
    """Keep the memory at page `page` of `slot` alive as cached block `block`."""

    slot: int
    page: int
    block: int

    def apply(self, kv) -> None:
        kv.retain_block(self.slot, self.page, self.block)

    def mirror(self, model) -> None:
        pass


@dataclass(frozen=True)
class ReleaseBlocks:
    """The cache no longer holds these blocks (evicted or reset)."""

    blocks: Tuple[int, ...]

    def apply(self, kv) -> None:
        kv.release_blocks(self.blocks)

    def mirror(self, model) -> None:
        pass


@dataclass(frozen=True)
class SharePrefix:
    """A sequence in `slot` starts on cached `blocks` (its first pages), then a copy of block
    `copy_src` as the next one; `table` is its block table (paged backends write into it)."""

    slot: int
    blocks: Tuple[int, ...]
    copy_src: Optional[int]
    table: List[int]

    def apply(self, kv) -> None:
        kv.share_blocks(self.slot, self.blocks, self.copy_src, self.table)

    def mirror(self, model) -> None:
        pass


@dataclass(frozen=True)
class ReleaseFront:
    """Every layer's sliding window has passed the first `pages` pages of `slot`."""

    slot: int
    pages: int

    def apply(self, kv) -> None:
        kv.release_front(self.slot, self.pages)

    def mirror(self, model) -> None:
        model.release_front(self.slot, self.pages)


@dataclass(frozen=True)
class FreeSlot:
    """The sequence in `slot` finished, was aborted or preempted."""

    slot: int

    def apply(self, kv) -> None:
        kv.free_slot(self.slot)

    def mirror(self, model) -> None:
        model.free_slot(self.slot)


KVOp = Union[RetainBlock, ReleaseBlocks, SharePrefix, ReleaseFront, FreeSlot]
RELEASED = -1   # a block-table entry behind every layer's sliding window: freed, never read
# Models that mix sliding and full-attention layers (Gemma 2/3, Qwen2 with max_window_layers)
# count memory in units of one layer's page (K and V): a block costs one unit per layer while
# its sliding layers' part is held, one per full layer after that part was released.


def mixed_block_ids(num_blocks: int, sliding: int, layers: int) -> int:
    """Block ids a mixed-window budget of num_blocks whole blocks can need: every block may
    have let go of its sliding layers' part, costing only the full layers' units."""
    return num_blocks * layers // (layers - sliding)


def _digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int, watermark: float = 0.01,
                 page_bytes: Optional[int] = None, token_bytes: int = 1, enable_prefix_caching: bool = False,
                 namespace: bytes = b"", window: int = 0, window_layers: Tuple[int, int] = (0, 0)):
        """window > 0: sliding layers attend to the last `window` tokens only, and the backend
        can drop memory behind them: `slide` frees what all queries have left behind.
        window_layers = (sliding, total) layers: when some layers do not slide, a block is a
        page in every layer (`num_blocks` of them fit the budget) but only its sliding layers'
        part is let go behind the window, so the budget is counted in layer pages (units): two
        pools in one, the full layers' and the sliding layers'. Default: every layer slides and
        whole blocks are freed (their table entries become RELEASED)."""
        if num_blocks < 1 or block_size < 1 or num_slots < 1:
            raise ValueError(f"KV layout needs at least one block and slot, got num_blocks={num_blocks}, "
                             f"block_size={block_size}, num_slots={num_slots}")
        self.num_blocks = num_blocks
        self.block_size = block_size          # whole tokens per block (for growth headroom)
        self.page_bytes = page_bytes if page_bytes is not None else block_size * token_bytes
        self.token_bytes = token_bytes
        if self.page_bytes < self.token_bytes * block_size:
            raise ValueError(f"a block of {self.page_bytes} bytes cannot hold {block_size} tokens")
        self.num_slots = num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.namespace = namespace
        self.window = window
        self.watermark_blocks = max(1, int(watermark * num_blocks)) if num_blocks > 1 else 0
        sliding, layers = window_layers
        if window and 0 < sliding < layers:
            self.mixed = True
            self.layers, self.sliding_layers = layers, sliding
            self.num_ids = mixed_block_ids(num_blocks, sliding, layers)
        else:
            self.mixed = False
            self.layers, self.sliding_layers = 1, 0
            self.num_ids = num_blocks
        self._units_total = num_blocks * self.layers
        self._held_units = 0                  # units of blocks some table holds
        self._idle_units = 0                  # units cached but free to evict (counted free)
        self._contrib: Dict[int, Tuple[int, int]] = {}        # block -> (held, idle) units it adds
        self._sref: List[int] = [0] * self.num_ids            # mixed: tables holding the sliding part
        self._behind: Dict[int, int] = {}                     # mixed: seq -> entries whose sliding part it let go
        self._slide_idle: "OrderedDict[int, None]" = OrderedDict()  # mixed: held, cached, sliding part unread
        self._free_blocks: List[int] = list(range(self.num_ids - 1, -1, -1))  # pop() gives 0 first
        self._free_slots: List[int] = list(range(num_slots - 1, -1, -1))
        self._tables: Dict[int, List[int]] = {}
        self._slots: Dict[int, int] = {}
        self._ref: List[int] = [0] * self.num_ids
        self._evictable: "OrderedDict[int, None]" = OrderedDict()  # cached, unreferenced; first = next victim
        self._cached: Dict[int, CachedBlock] = {}
        self._by_hash: Dict[bytes, int] = {}
        self._children: Dict[bytes, Dict[int, None]] = {}        # parent identity -> cached blocks after it
        self._chains: Dict[int, Tuple[bytes, List[bytes]]] = {}  # seq -> (root, identities of its full blocks)
        self._copy_refs: List[int] = []       # copy sources held until the backend has copied them
        self._ops: List[KVOp] = []            # what the backend must do next, in order
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- geometry ------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens * self.token_bytes // self.page_bytes)

    def span(self, index: int) -> Tuple[int, int]:
        """Tokens with bytes in block `index`: [first, end)."""
        p, t = self.page_bytes, self.token_bytes
        return index * p // t, -(-(index + 1) * p // t)

    def whole_tokens_before(self, num_blocks: int) -> int:
        """Tokens whose bytes all lie in the first num_blocks blocks."""
        return num_blocks * self.page_bytes // self.token_bytes

    # ---- counts --------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Free blocks, counting cached blocks no sequence holds (they are evicted on demand).
        Mixed windows: whole blocks (a page in every layer) the free units make."""
        if self.mixed:
            return (self._units_total - self._held_units) // self.layers
        return len(self._free_blocks) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def fits(self, num_tokens: int) -> bool:
        """Could a sequence of num_tokens ever be held (it is alone in the cache)?"""
        return self.blocks_for(num_tokens) <= self.num_blocks

    def can_admit(self, num_tokens: int, extra_blocks: int = 0, hit: Optional[PrefixHit] = None) -> bool:
        """A free slot and room for num_tokens, keeping the watermark plus extra_blocks free."""
        need = self.blocks_for(num_tokens) + self.watermark_blocks + extra_blocks
        if hit is not None:
            need += hit.num_evictable - len(hit.shared)
        return bool(self._free_slots) and need <= self.num_free_blocks

    # ---- sequences -----------------------------------------------------------
    def admit(self, seq_id: int, num_tokens: int, hit: Optional[PrefixHit] = None) -> int:
        """Take a slot and blocks for num_tokens (the hit's blocks first); returns the slot."""
        if seq_id in self._slots:
            raise ValueError(f"sequence {seq_id} already holds slot {self._slots[seq_id]}")
        hit = hit or PrefixHit()
        need = self.blocks_for(num_tokens) - len(hit.shared) + hit.num_evictable
        if not self._free_slots or need > self.num_free_blocks:
            raise RuntimeError(f"no room to admit sequence {seq_id} ({num_tokens} tokens)")
        slot = self._free_slots.pop()
        self._slots[seq_id] = slot
        for b in hit.shared:
            self._take_ref(b, sliding=True)
        if hit.copy_src is not None:
            self._take_ref(hit.copy_src)
            self._copy_refs.append(hit.copy_src)
        self._tables[seq_id] = list(hit.shared)
        self.grow(seq_id, num_tokens)
        if hit.num_cached_tokens:
            self._ops.append(SharePrefix(slot, tuple(hit.shared), hit.copy_src, self._tables[seq_id]))
        return slot

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self._tables[seq_id]) <= self.num_free_blocks

    def grow(self, seq_id: int, num_tokens: int) -> None:
        table = self._tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks growing sequence {seq_id} to {num_tokens} tokens")
        for _ in range(need):
            b = self._allocate()
            self._ref[b] = 1
            if self.mixed:
                self._sref[b] = 1
                self._reindex(b)
            table.append(b)

    def slide(self, seq_id: int, num_computed: int) -> None:
        """Sliding window: the next query (position num_computed) and every later one read
        keys from num_computed - window + 1 on; free the blocks wholly before that. A cached
        block stays cached (evictable) like any other the sequence lets go."""
        if not self.window:
            return
        table = self._tables[seq_id]
        first_read = max(0, num_computed - self.window + 1)
        behind = min(first_read * self.token_bytes // self.page_bytes, len(table))
        if self.mixed:   # the full layers still read these blocks: only their sliding part goes
            done = self._behind.get(seq_id, 0)
            if behind <= done:
                return
            for i in range(done, behind):
                self._sref[table[i]] -= 1
                self._reindex(table[i])
            self._behind[seq_id] = behind
            self._ops.append(ReleaseFront(self._slots[seq_id], behind))
            return
        done = next((i for i, b in enumerate(table) if b != RELEASED), len(table))
        if behind <= done:
            return
        for i in range(done, behind):
            self._drop_ref(table[i])
            table[i] = RELEASED
        self._ops.append(ReleaseFront(self._slots[seq_id], behind))

    def free(self, seq_id: int) -> int:
        """Drop a sequence's references and its slot (cached blocks stay, evictable); returns the slot."""
        # Tail first: among blocks freed together, the longer prefix's tail is evicted first.
        table, behind = self._tables.pop(seq_id), self._behind.pop(seq_id, 0)
        for i in range(len(table) - 1, -1, -1):
            b = table[i]
            if b != RELEASED:
                if self.mixed and i >= behind:
                    self._sref[b] -= 1
                self._drop_ref(b)
        self._chains.pop(seq_id, None)
        slot = self._slots.pop(seq_id)
        self._free_slots.append(slot)
        self._ops.append(FreeSlot(slot))
        return slot

    def forget(self, seq_id: int) -> None:
        """A sequence left the scheduler: forget its cached chain of identities."""
        self._chains.pop(seq_id, None)

    def slot(self, seq_id: int) -> int:
        return self._slots[seq_id]

    def block_table(self, seq_id: int) -> List[int]:
        return self._tables[seq_id]

    def blocks_held(self, seq_id: int) -> int:
        return len(self._tables[seq_id])

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._slots

    def occupancy(self, seqs) -> List[dict]:
        """Slot, computed tokens and blocks of each sequence holding one, by slot (the web UI's
        heat map). Read from another thread while a step runs: a sequence freed meanwhile is skipped."""
        rows = []
        for seq in list(seqs):
            slot, table = self._slots.get(seq.seq_id), self._tables.get(seq.seq_id)
            if slot is not None and table is not None:
                held = sum(b != RELEASED for b in table)   # blocks behind a sliding window are freed
                rows.append({"slot": slot, "tokens": seq.num_computed_tokens, "blocks": held})
        return sorted(rows, key=lambda r: r["slot"])

    # ---- block pool ----------------------------------------------------------
    def _allocate(self) -> int:
        if self.mixed:
            # Evict (oldest first) until a whole block's units are physically free: cached
            # blocks nobody holds, then the sliding part of cached blocks behind every window
            # (the block leaves the cache; its full layers' part stays with its holders).
            while self._units_total - self._held_units - self._idle_units < self.layers:
                idle = self._evictable or self._slide_idle
                b, _ = idle.popitem(last=False)
                self._uncache(b)
                if self._ref[b] == 0:
                    self._free_blocks.append(b)
                self._reindex(b)
            return self._free_blocks.pop()
        if self._free_blocks:
            return self._free_blocks.pop()
        b, _ = self._evictable.popitem(last=False)
        self._uncache(b)
        return b

    def _take_ref(self, b: int, sliding: bool = False) -> None:
        if self._ref[b] == 0:
            del self._evictable[b]
        self._ref[b] += 1
        if self.mixed:
            self._sref[b] += sliding
            self._reindex(b)

    def _drop_ref(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if b in self._cached:
                self._evictable[b] = None
            else:
                self._free_blocks.append(b)
        self._reindex(b)

    def _units(self, b: int) -> Tuple[int, int]:
        """(held, idle) units block b adds (mixed windows): its full layers' part while held,
        its sliding part while read or cached; cached parts nobody reads count idle (free)."""
        full, sliding = self.layers - self.sliding_layers, self.sliding_layers
        cached = b in self._cached
        if self._ref[b] > 0:
            if self._sref[b] > 0:
                return full + sliding, 0
            return full, sliding if cached else 0
        return 0, self.layers if cached else 0

    def _reindex(self, b: int) -> None:
        """Recount block b's units after its references or cache state changed (mixed windows)."""
        if not self.mixed:
            return
        old_held, old_idle = self._contrib.get(b, (0, 0))
        held, idle = self._units(b)
        self._held_units += held - old_held
        self._idle_units += idle - old_idle
        if held or idle:
            self._contrib[b] = (held, idle)
        else:
            self._contrib.pop(b, None)
        if self._ref[b] > 0 and self._sref[b] == 0 and b in self._cached:
            self._slide_idle.setdefault(b, None)
        else:
            self._slide_idle.pop(b, None)

    def _uncache(self, b: int) -> None:
        e = self._cached.pop(b)
        self._slide_idle.pop(b, None)
        if e.hash is not None and self._by_hash.get(e.hash) == b:
            del self._by_hash[e.hash]
        siblings = self._children.get(e.parent)
        if siblings is not None:
            siblings.pop(b, None)
            if not siblings:
                del self._children[e.parent]
        self._ops.append(ReleaseBlocks((b,)))

    # ---- prefix caching --------------------------------------------------------
    def root(self, salt: str) -> bytes:
        return _digest(hashlib.sha256(self.namespace + b"\0" + salt.encode()).digest(), ())

    def _chain(self, seq_id: int, tokens: Sequence[int], salt: str) -> List[bytes]:
        """Identities of every full block of tokens (extended incrementally, per sequence)."""
        root, chain = self._chains.get(seq_id) or (self.root(salt), [])
        self._chains[seq_id] = (root, chain)
        while True:
            first, end = self.span(len(chain))
            if end > len(tokens):
                return chain
            chain.append(_digest(chain[-1] if chain else root, tokens[first:end]))

    def match(self, seq_id: int, tokens: Sequence[int], salt: str = "") -> PrefixHit:
        """The longest cached prefix of tokens, leaving at least the last token to compute."""
        if not self.enable_prefix_caching or len(tokens) < 2:
            return PrefixHit()
        chain = self._chain(seq_id, tokens, salt)
        matched: List[int] = []
        for h in chain:
            b = self._by_hash.get(h)
            if b is None:
                break
            matched.append(b)
        k = len(matched)
        cached = self.whole_tokens_before(k)
        # The next block may match partly: any cached block after the same parent.
        parent = chain[k - 1] if k else self._chains[seq_id][0]
        first, _ = self.span(k)
        best, best_len = None, 0
        for b in self._children.get(parent, ()):
            e = self._cached[b]
            n = 0
            for x, y in zip(e.tokens, tokens[first:]):
                if x != y:
                    break
                n += 1
            if n > best_len:
                best, best_len = b, n
        if best is not None:
            cached = max(cached, min(first + best_len, self.whole_tokens_before(k + 1)))
            matched.append(best)
        cached = min(cached, len(tokens) - 1)
        if cached <= 0:
            return PrefixHit()
        write_block = cached * self.token_bytes // self.page_bytes   # where the next token's bytes start
        shared = matched[:write_block]
        copy_src = matched[write_block] if write_block < len(matched) else None
        # (Mixed windows: a held block whose sliding part is idle costs that part again.)
        evictable = sum(1 for b in shared if self._ref[b] == 0 or b in self._slide_idle)
        if copy_src is not None and self._ref[copy_src] == 0:
            evictable += 1
        return PrefixHit(cached, shared, copy_src, evictable)

    def count_query(self, num_tokens: int, hit: PrefixHit) -> None:
        """vLLM's counters: tokens looked up and tokens found, once per admission."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += hit.num_cached_tokens

    def copies_done(self) -> None:
        """The backend copied every pending copy-on-write source: drop their temporary holds."""
        refs, self._copy_refs = self._copy_refs, []
        for b in refs:
            self._drop_ref(b)

    def cache_blocks(self, seq_id: int, tokens: Sequence[int], num_computed: int, salt: str = "",
                     partial: bool = False) -> List[Tuple[int, int]]:
        """Register the sequence's computed full blocks (and, with partial, the computed head
        of the block after them). Returns (index, block) of blocks newly cached; a
        `RetainBlock` for each goes to the backend."""
        if not self.enable_prefix_caching or seq_id not in self._tables:
            return []
        table = self._tables[seq_id]
        chain = self._chain(seq_id, tokens[:num_computed], salt)
        root = self._chains[seq_id][0]
        new: List[Tuple[int, int]] = []
        full = 0
        while full < len(chain) and self.span(full)[1] <= num_computed and full < len(table):
            b, h = table[full], chain[full]
            if b == RELEASED or full < self._behind.get(seq_id, 0):
                # Behind the window: already let go (and cached then, if it could be); a mixed
                # model's block without its sliding layers' part cannot start a later request.
                full += 1
                continue
            parent = chain[full - 1] if full else root
            e = self._cached.get(b)
            if e is None and h not in self._by_hash:
                self._register(CachedBlock(b, full, parent, tuple(tokens[slice(*self.span(full))]), h))
                new.append((full, b))
            elif e is not None and e.hash is None and h not in self._by_hash:  # a partial entry filled up
                e.hash, e.tokens = h, tuple(tokens[slice(*self.span(full))])
                self._by_hash[h] = b
            full += 1
        if partial and full < len(table) and table[full] != RELEASED and full >= self._behind.get(seq_id, 0):
            first, _ = self.span(full)
            if num_computed > first:
                b, parent = table[full], chain[full - 1] if full else root
                e = self._cached.get(b)
                head = tuple(tokens[first:num_computed])
                if e is None:
                    self._register(CachedBlock(b, full, parent, head))
                    new.append((full, b))
                elif e.hash is None and e.parent == parent and len(head) > len(e.tokens):
                    e.tokens = head
        slot = self._slots[seq_id]
        self._ops.extend(RetainBlock(slot, index, b) for index, b in new)
        return new

    def _register(self, e: CachedBlock) -> None:
        self._cached[e.block] = e
        self._reindex(e.block)
        if e.hash is not None:
            self._by_hash[e.hash] = e.block
        self._children.setdefault(e.parent, {})[e.block] = None

    def uncache(self, block: int) -> None:
        """Forget a cached block (the backend could not retain it, or a reset)."""
        if block in self._cached:
            self._uncache(block)
            if self._ref[block] == 0:
                del self._evictable[block]
                self._free_blocks.append(block)
            self._reindex(block)

    def take_ops(self) -> List[KVOp]:
        """What the backend must do to memory since the last call, in order."""
        out, self._ops = self._ops, []
        return out

    @property
    def has_ops(self) -> bool:
        return bool(self._ops)

    @property
    def pending_ops(self) -> Tuple[KVOp, ...]:
        """The operations the next step will apply (for checks)."""
        return tuple(self._ops)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (held ones stay in their tables, uncached); returns how many."""
        n = len(self._cached)
        for b in list(self._cached):
            self.uncache(b)
        self._chains.clear()
        return n

    # ---- checks ---------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is free, evictable or referenced exactly
        as the tables say, and the cache's indexes agree with each other."""
        refs, srefs = [0] * self.num_ids, [0] * self.num_ids
        for seq_id, table in self._tables.items():
            for i, b in enumerate(table):
                if b != RELEASED:
                    refs[b] += 1
                    srefs[b] += self.mixed and i >= self._behind.get(seq_id, 0)
        for b in self._copy_refs:
            refs[b] += 1
        assert refs == self._ref, "reference counts disagree with the block tables"
        if self.mixed:
            assert srefs == self._sref, "sliding-part references disagree with the block tables"
            units = [self._units(b) for b in range(self.num_ids)]
            assert sum(h for h, _ in units) == self._held_units, "held units disagree with the blocks"
            assert sum(i for _, i in units) == self._idle_units, "idle units disagree with the blocks"
            assert self._held_units + self._idle_units <= self._units_total, "more units in use than exist"
        free = set(self._free_blocks)
        assert len(free) == len(self._free_blocks), "a block is free twice"
        assert not free & set(self._evictable), "a block is both free and evictable"
        for b in range(self.num_ids):
            where = (b in free) + (b in self._evictable) + (refs[b] > 0)
            assert where == 1, f"block {b} is free={b in free} evictable={b in self._evictable} refs={refs[b]}"
            assert (b in self._evictable) <= (b in self._cached), f"evictable block {b} is not cached"
            assert not (b in free and b in self._cached), f"free block {b} is still cached"
        for h, b in self._by_hash.items():
            assert self._cached[b].hash == h, f"hash table points block {b} at the wrong identity"
        for parent, blocks in self._children.items():
            for b in blocks:
                assert self._cached[b].parent == parent, f"block {b} listed under the wrong parent"
        for b, e in self._cached.items():
            assert b in self._children.get(e.parent, {}), f"cached block {b} missing from its parent's list"
        assert len(self._slots) + len(self._free_slots) == self.num_slots, "a slot was lost"
