"""Concurrency stress: random alloc / step_async / free with tensor writes and reads
while the background thread maps ahead. Invariants: no crash, every pool block owned
once, live slots never share a block, every live token keeps the value written to it."""
import random
import threading

import pytest
import torch

import vattention_ext as va

LAYERS, HKV, D, PAGE = 2, 1, 16, 4096  # 64 bytes per token: 64 tokens per page
SLOTS, MAX_CTX = 8, 512


@pytest.mark.parametrize("seed, deferred", [(0, True), (1, False), (2, True)])
def test_random_operations_keep_invariants(seed, deferred):
    rng = random.Random(seed)
    cache = va.KVCache(LAYERS, HKV, D, SLOTS, MAX_CTX, page_size=PAGE, kv_cache_memory=24 * 2 * LAYERS * PAGE,
                       map_ahead_tokens=96)
    cache.set_deferred_reclamation(deferred)
    tensors = cache.tensors
    lens = [0] * SLOTS   # live tokens per slot (0 = free)
    tags = [0.0] * SLOTS
    next_tag = 1.0
    stop = threading.Event()
    errors = []

    def observer():  # stats/num_free from another thread while the main thread steps
        try:
            while not stop.is_set():
                st = cache.stats()
                assert st["pages_mapped"] + st["pages_free"] == st["pages_total"]
                cache.num_free_blocks()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=observer)
    t.start()
    exhausted = 0
    try:
        for op in range(2500):
            r = rng.random()
            live = [s for s in range(SLOTS) if lens[s] > 0]
            if r < 0.15 and live:
                s = rng.choice(live)
                cache.free_slot(s)
                lens[s] = 0
            else:
                want = list(lens)
                for s in range(SLOTS):
                    if want[s] > 0:
                        want[s] = min(MAX_CTX, want[s] + rng.choice([1, 1, 1, 7, 40]))
                    elif rng.random() < 0.2:
                        want[s] = rng.randint(1, 200)
                try:
                    cache.step_async(want)
                except va.OutOfPagesError:
                    exhausted += 1  # what the scheduler handles by preempting: free the longest
                    victim = max(live, key=lambda s: lens[s]) if live else None
                    if victim is not None:
                        cache.free_slot(victim)
                        lens[victim] = 0
                    continue
                for s in range(SLOTS):
                    if want[s] > lens[s]:
                        if lens[s] == 0:
                            tags[s] = next_tag
                            next_tag += 1.0
                        for x in tensors:
                            x[s, lens[s]:want[s]] = tags[s]
                        lens[s] = want[s]
            if op % 25 == 0:
                cache.check_invariants()
                owned = [b for s in range(SLOTS) if lens[s] > 0 for b in cache.slot_blocks(s)]
                assert len(owned) == len(set(owned)), "a block is mapped into two live slots"
                for s in range(SLOTS):
                    if lens[s]:
                        for x in tensors:
                            assert torch.all(x[s, :lens[s]] == tags[s]), f"slot {s} lost its data"
    finally:
        stop.set()
        t.join()
    cache.wait_async()
    cache.check_invariants()
    assert not errors, errors
    assert exhausted > 0  # the pool really was contended


def test_async_maps_ahead_in_background():
    cache = va.KVCache(LAYERS, HKV, D, SLOTS, MAX_CTX, page_size=PAGE, kv_cache_memory=64 * 2 * LAYERS * PAGE,
                       map_ahead_tokens=128)
    lens = [0] * SLOTS
    lens[3] = 10
    cache.step_async(lens)
    cache.wait_async()
    assert len(cache.slot_blocks(3)) == 3  # 10 + 128 tokens -> 3 pages of 64 tokens
    # Pages mapped ahead are reclaimable: they count as free for admission.
    assert cache.num_free_blocks() == 64 - 1
    cache.step(lens)
    assert len(cache.slot_blocks(3)) == 3


def test_destroying_cache_with_pending_async_work_is_safe():
    for _ in range(20):
        cache = va.KVCache(LAYERS, HKV, D, SLOTS, MAX_CTX, page_size=PAGE, kv_cache_memory=64 * 2 * LAYERS * PAGE,
                           map_ahead_tokens=MAX_CTX)
        cache.step_async([1] * SLOTS)
        cache.close()
        del cache
