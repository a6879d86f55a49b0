"""Prefix caching below the engine: the KVManager's block identities, reference counts
and LRU eviction (torch-free), and the vAttention cache's page aliasing, pins and copy
on write, with the kernel's own figures for shared pages (Rss counts a page once per
mapping, Pss splits it)."""
from __future__ import annotations

import random

import pytest

from sarathi.core.kv_manager import KVManager, PrefixHit, ReleaseBlocks, SharePrefix


class MirrorBackend:
    """What a KV backend sees of the manager's memory operations, with the checks a real one
    relies on: a page is retained from a live slot, only retained blocks are shared or
    released, a slot is freed once and shared into only after that."""

    def __init__(self):
        self.retained, self.live_slots = set(), set()

    def apply(self, ops):
        for op in ops:
            op.apply(self)

    def retain_block(self, slot, page, block):
        assert block not in self.retained
        self.retained.add(block)

    def release_blocks(self, blocks):
        for b in blocks:
            assert b in self.retained, f"released block {b} was never retained"
            self.retained.discard(b)

    def share_blocks(self, slot, blocks, copy_src, table):
        assert slot not in self.live_slots, f"slot {slot} shared into while in use"
        assert set(blocks) <= self.retained and (copy_src is None or copy_src in self.retained)
        self.live_slots.add(slot)

    def free_slot(self, slot):
        self.live_slots.discard(slot)

    def check(self, kv):
        assert self.retained == set(kv._cached), "the backend retains other blocks than the cache holds"


def manager(blocks=16, block_size=4, slots=8, **kw):
    kv = KVManager(blocks, block_size, slots, watermark=0.0, enable_prefix_caching=True, **kw)
    kv.watermark_blocks = 0
    return kv


def run(kv, seq_id, tokens, salt="", computed=None):
    """Admit with whatever hits, then compute everything and cache it."""
    hit = kv.match(seq_id, tokens, salt)
    kv.admit(seq_id, len(tokens), hit)
    kv.copies_done()
    kv.cache_blocks(seq_id, tokens, len(tokens) if computed is None else computed, salt)
    kv.check_invariants()
    return hit


def test_hit_shares_full_blocks_and_leaves_the_last_token():
    kv = manager()
    a = list(range(100, 110))                       # 2 full blocks + 2 tokens
    assert run(kv, 0, a).num_cached_tokens == 0
    hit = kv.match(1, a + [7, 8, 9])
    assert hit.num_cached_tokens == 8 and hit.shared == kv.block_table(0)[:2] and hit.copy_src is None
    # The very same prompt: all of it is cached but the last token must run -> copy its block.
    same = kv.match(2, list(a[:8]))
    assert same.num_cached_tokens == 7 and same.shared == kv.block_table(0)[:1]
    assert same.copy_src == kv.block_table(0)[1]


def test_salt_and_namespace_isolate():
    kv = manager()
    a = list(range(50, 70))
    run(kv, 0, a, salt="tenant-a")
    assert kv.match(1, a, "tenant-b").num_cached_tokens == 0
    assert kv.match(2, a, "tenant-a").num_cached_tokens == 19
    other = manager(namespace=b"another model")
    assert other.root("tenant-a") != kv.root("tenant-a")


def test_references_eviction_lru_and_tail_first():
    kv = manager(blocks=8)
    a, b = list(range(1, 13)), list(range(201, 209))    # 3 blocks and 2 blocks
    run(kv, 0, a)
    run(kv, 1, b)
    kv.free(0)
    kv.free(1)
    kv.check_invariants()
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 5
    # A new sequence sharing a's head holds those blocks and takes one free block
    # (2 free + 3 evictable left: a's tail, then b's tail, then b's head).
    run(kv, 2, a[:8] + [999, 998])
    assert kv.num_free_blocks == 5
    # 4 more blocks: the 2 free ones, then the least recently used unheld blocks, each
    # prefix's tail before its head: a's tail (freed first), then b's tail.
    run(kv, 3, list(range(600, 600 + 4 * 4)))
    assert set(kv.block_table(3)).isdisjoint(kv.block_table(2))
    assert kv.match(9, a).num_cached_tokens == 8            # a's head is held by sequence 2
    assert kv.match(10, b).num_cached_tokens == 4           # b's head survived its tail
    run(kv, 4, [5, 6, 7])
    assert kv.match(11, b).num_cached_tokens == 0
    kv.check_invariants()


def test_partial_block_copy_on_write_and_diverging_inside_a_block():
    kv = manager(blocks=32)
    a = list(range(10, 24))                          # blocks: 4 + 4 + 4 + 2 tokens
    run(kv, 0, a)
    kv.cache_blocks(0, a, len(a), partial=True)      # the head of the last block too
    diverge = a[:10] + [77, 78, 79]                  # diverges inside block 2
    hit = kv.match(1, diverge)
    assert hit.num_cached_tokens == 10 and len(hit.shared) == 2 and hit.copy_src == kv.block_table(0)[2]
    kv.take_ops()
    kv.admit(1, len(diverge), hit)
    share = [op for op in kv.take_ops() if isinstance(op, SharePrefix)][0]
    assert list(share.blocks) == kv.block_table(0)[:2] and share.copy_src == kv.block_table(0)[2]
    assert share.table[2] != kv.block_table(0)[2]    # a private copy, not the shared block
    kv.check_invariants()                            # the copy source is held until copied
    kv.copies_done()
    kv.check_invariants()
    longer = a + [5]                                 # the partial last block matches its 2 tokens
    assert kv.match(2, longer).num_cached_tokens == 14


def test_pages_that_split_a_token():
    # 10-byte pages, 4-byte tokens: page 0 holds tokens 0, 1 and half of token 2.
    kv = manager(blocks=64, block_size=2, page_bytes=10, token_bytes=4)
    assert kv.span(0) == (0, 3) and kv.span(1) == (2, 5) and kv.blocks_for(5) == 2
    a = list(range(300, 320))
    run(kv, 0, a)
    t = kv.block_table(0)
    # Diverging at token 3: block 0 (tokens 0..2) matches; block 1 (2..4) only in token 2,
    # which straddles pages 0 and 1. Tokens 0..2 are cached; token 3 is written into page 1,
    # so page 0 is shared and page 1 copied (it holds token 2's second half).
    hit = kv.match(1, a[:3] + [1, 2, 3])
    assert (hit.num_cached_tokens, hit.shared, hit.copy_src) == (3, t[:1], t[1])
    # Diverging at token 7 (straddling pages 2 and 3): tokens 0..6 cached, page 2 copied.
    hit = kv.match(2, a[:7] + [1, 2, 3])
    assert (hit.num_cached_tokens, hit.shared, hit.copy_src) == (7, t[:2], t[2])
    # Diverging at token 5, which starts page 2: pages 0 and 1 shared, nothing to copy.
    hit = kv.match(3, a[:5] + [1, 2, 3])
    assert (hit.num_cached_tokens, hit.shared, hit.copy_src) == (5, t[:2], None)


def test_reset_forgets_everything_and_keeps_tables():
    kv = manager()
    a = list(range(1, 17))
    run(kv, 0, a)
    assert kv.reset_prefix_cache() == 4 and kv.num_cached_blocks == 0
    released = [b for op in kv.take_ops() if isinstance(op, ReleaseBlocks) for b in op.blocks]
    assert sorted(released) == sorted(kv.block_table(0))
    assert kv.match(1, a).num_cached_tokens == 0
    kv.free(0)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks


def test_random_workload_keeps_the_books():
    rng = random.Random(5)
    kv = manager(blocks=40, block_size=4, slots=6)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 30))] for _ in range(4)]
    live, next_id = {}, 0
    backend = MirrorBackend()
    for _ in range(600):
        if live and (rng.random() < 0.4 or not kv.num_free_slots):
            sid = rng.choice(list(live))
            if rng.random() < 0.5:
                kv.cache_blocks(sid, live[sid], rng.randrange(len(live[sid]) + 1), partial=True)
            kv.free(sid)
            del live[sid]
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 20))]
            hit = kv.match(next_id, tokens)
            if kv.can_admit(len(tokens), hit=hit):
                kv.admit(next_id, len(tokens), hit)
                backend.apply(kv.take_ops())
                kv.copies_done()
                kv.cache_blocks(next_id, tokens, len(tokens))
                live[next_id] = tokens
            else:
                kv.forget(next_id)
            next_id += 1
        if rng.random() < 0.02:
            kv.reset_prefix_cache()
        backend.apply(kv.take_ops())
        backend.check(kv)
        kv.check_invariants()
    for sid in list(live):
        kv.free(sid)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and kv.num_queried_tokens == 0  # counted by the scheduler only


def test_scheduler_spends_the_budget_on_the_uncached_rest():
    from sarathi.core.scheduler import SarathiScheduler, StepResult
    from sarathi.core.sequence import Sequence

    kv = manager(blocks=64, block_size=4)
    sched = SarathiScheduler(kv, max_num_seqs=4, max_model_len=200, chunk_size=8)
    backend = MirrorBackend()
    a = Sequence(0, "a", 0, list(range(1, 21)), 0.0, 4)
    sched.add(a)
    while a.num_computed_tokens < 20:
        out = sched.schedule()
        backend.apply(out.kv_ops)
        sched.update_from_output(out, StepResult({0: 5} if out.prefills[0].samples else {}))
    b = Sequence(1, "b", 0, list(range(1, 17)) + [90, 91, 92], 1.0, 4)
    sched.add(b)
    out = sched.schedule()
    item = [p for p in out.prefills if p.seq is b][0]
    assert b.num_computed_tokens == 16 and b.num_cached_tokens == 16 and item.num_scheduled_tokens == 3
    shares = [op for op in out.kv_ops if isinstance(op, SharePrefix)]
    assert len(shares) == 1 and list(shares[0].blocks) == kv.block_table(0)[:4]
    assert kv.num_queried_tokens == 39 and kv.num_hit_tokens == 16
    backend.apply(out.kv_ops)      # the runner retains a's blocks before it shares them with b
    sched.update_from_output(out, StepResult())
    backend.apply(kv.take_ops())   # what the next step applies first: b's newly cached blocks
    backend.check(kv)
    kv.check_invariants()



def test_samples_of_one_request_count_once_against_the_prefill_limit():
    """n = 3 with one prompt per step: samples 2 and 3 wait for the first to compute the
    prompt, then start together in one step (one request), ahead of the next request."""
    from sarathi.core.scheduler import SarathiScheduler, StepResult
    from sarathi.core.sequence import Sequence

    kv = manager(blocks=64, block_size=4)
    backend = MirrorBackend()
    sched = SarathiScheduler(kv, max_num_seqs=8, max_model_len=200, chunk_size=64, max_prefills=1)
    lead = Sequence(0, "a", 0, list(range(1, 19)), 0.0, 4)
    samples = [Sequence(i, "a", i, list(range(1, 19)), 0.0, 4) for i in (1, 2)]
    for s in samples:
        s.prefix_leader = lead
    other = Sequence(3, "b", 0, list(range(50, 60)), 1.0, 4)
    for s in [lead, *samples, other]:
        sched.add(s)
    steps = []
    for _ in range(3):
        out = sched.schedule()
        backend.apply(out.kv_ops)
        steps.append(sorted(p.seq.seq_id for p in out.prefills))
        sched.update_from_output(out, StepResult({p.seq.seq_id: 5 for p in out.scheduled if p.samples}))
    assert steps == [[0], [1, 2], [3]]
    # Each sample computes only the prompt's last token (for its own logits).
    assert samples[0].num_cached_tokens == 17 and samples[1].num_cached_tokens == 17
    kv.check_invariants()


# ---------------------------------------------------------------- the vAttention cache

LAYERS, HKV, D = 2, 2, 32           # 256 bytes per token per region (fp32)
PAGE = 8192                          # 32 tokens per page
REGIONS = 2 * LAYERS


def vcache(blocks=40, slots=16, max_ctx=256):
    import vattention_ext as va

    return va.KVCache(LAYERS, HKV, D, slots, max_ctx, page_size=PAGE, kv_cache_memory=blocks * PAGE * REGIONS)


def test_aliased_pages_are_the_same_memory_and_copies_are_private():
    torch = pytest.importorskip("torch")
    c = vcache()
    c.step([70] + [0] * 15)                           # slot 0: 3 pages
    for i, t in enumerate(c.tensors):
        t[0, :70] = torch.arange(70, dtype=torch.float32)[:, None, None] + 1000 * i
    pinned = [c.pin(0, p) for p in range(3)]
    c.share_prefix(1, pinned[:2], copy_src=pinned[2])  # pages 0, 1 shared, page 2 copied
    c.step([0, 80] + [0] * 14)
    c.check_invariants()
    assert c.slot_blocks(1)[:2] == pinned[:2] and c.slot_blocks(1)[2] != pinned[2]
    for t in c.tensors:
        assert torch.equal(t[1, :70], t[0, :70])
    c.tensors[0][0, 10] = -1.0                         # a write through slot 0 is seen by slot 1 (shared)
    assert float(c.tensors[0][1, 10, 0, 0]) == -1.0
    c.tensors[0][1, 70] = -2.0                         # slot 1's copied page is its own
    assert float(c.tensors[0][0, 70, 0, 0]) != -2.0
    c.tensors[0][1, 65] = -3.0
    assert float(c.tensors[0][0, 65, 0, 0]) == 65.0
    st = c.stats()
    assert st["blocks_pinned"] == 3 and st["block_mappings_shared"] == 2
    # Slot 0 goes: its shared pages stay for slot 1 and the pins, nothing is lost.
    c.free_slot(0)
    c.check_invariants()
    assert c.slot_blocks(0) == []                     # shared pages are never kept for deferred reuse
    for b in pinned:
        c.unpin(b)
    c.check_invariants()
    c.free_slot(1)
    c.set_deferred_reclamation(False)
    c.check_invariants()
    assert c.stats()["blocks_free"] == 40 and c.stats()["pool_resident_bytes"] == 0


def test_sharing_errors_change_nothing():
    import vattention_ext as va

    c = vcache()
    c.step([40] + [0] * 15)
    with pytest.raises(ValueError, match="not pinned"):
        c.share_prefix(1, c.slot_blocks(0))
    b = c.pin(0, 0)
    with pytest.raises(ValueError, match="in use"):
        c.share_prefix(0, [b])
    with pytest.raises(ValueError, match="no live tokens"):
        c.pin(0, 5)
    with pytest.raises(ValueError, match="not pinned"):
        c.unpin(b + 1)
    with pytest.raises(IndexError):
        c.share_prefix(99, [b])
    c.check_invariants()
    c.unpin(b)
    with pytest.raises(ValueError, match="not pinned"):
        c.unpin(b)
    assert isinstance(va.OutOfPagesError(), MemoryError)
    c.check_invariants()


def test_sixteen_slots_hold_a_shared_prefix_once_says_the_kernel():
    """2,000 tokens in 16 slots: the memfd holds the prefix's pages once; every mapping's
    Rss counts them, their Pss splits them 16 ways."""
    c = vcache(blocks=300, slots=16, max_ctx=2048)
    prefix = 2000
    lens = [prefix] + [0] * 15
    c.step(lens)
    for t in c.tensors:
        t[0, :prefix] = 1.0
    full = prefix * HKV * D * 4 // PAGE               # 62 full pages; the 63rd is partial
    pinned = [c.pin(0, p) for p in range(full + 1)]
    for s in range(1, 16):
        c.share_prefix(s, pinned[:full], copy_src=pinned[full])
    c.step([prefix + 1] * 16)
    c.check_invariants()
    st = c.stats()
    page_bytes = PAGE * REGIONS
    assert st["pool_resident_bytes"] == (full + 16) * page_bytes         # prefix once + 16 private pages
    assert st["rss_bytes_mapped"] == 16 * (full + 1) * page_bytes        # each slot maps all its pages
    # Pss charges each mapping 1/16 of a shared page; smaps rounds each mapping's Pss down
    # to whole KiB, so the sum can only fall short of what exists, never exceed it.
    assert st["pss_bytes_mapped"] <= (full + 16) * page_bytes < st["rss_bytes_mapped"] / 8
    for b in pinned:
        c.unpin(b)
    for s in range(16):
        c.free_slot(s)
    c.set_deferred_reclamation(False)
    c.check_invariants()
    assert c.stats()["pool_resident_bytes"] == 0


def test_two_mappings_halve_pss():
    c = vcache()
    c.step([32] + [0] * 15)                            # exactly one page per region
    for t in c.tensors:
        t[0, :32] = 2.0
    pss_alone = c.stats()["pss_bytes_mapped"]
    c.share_prefix(1, [c.pin(0, 0)])
    st = c.stats()
    assert pss_alone == PAGE * REGIONS
    assert st["rss_bytes_mapped"] == 2 * PAGE * REGIONS and st["pss_bytes_mapped"] == PAGE * REGIONS
    # Per mapping: each of the two slots is charged half a page.
    assert st["pool_resident_bytes"] == PAGE * REGIONS


def test_prefix_hit_is_a_plain_value():
    assert PrefixHit().num_cached_tokens == 0 and PrefixHit().blocks_reused == 0
