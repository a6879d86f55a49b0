"""vAttention allocator: page accounting against the kernel's own numbers, slot
isolation, reclamation, errors."""
import subprocess
import sys

import pytest
import torch

import vattention_ext as va
from vattention_ext.kernel_memory import mincore_resident_bytes, resident_bytes

LAYERS, HKV, D = 2, 2, 32           # 256 bytes per token per region (fp32)
TOKEN_BYTES = HKV * D * 4
PAGE = 8192                          # 32 tokens per page
REGIONS = 2 * LAYERS
BLOCK_BYTES = PAGE * REGIONS


def make(blocks=32, slots=4, max_ctx=200, **kw):
    return va.KVCache(LAYERS, HKV, D, slots, max_ctx, page_size=PAGE, kv_cache_memory=blocks * BLOCK_BYTES, **kw)


def pages_for(tokens):
    return -(-tokens * TOKEN_BYTES // PAGE)


def fill(cache, slot, start, end, value):
    for t in cache.tensors:
        t[slot, start:end] = value


def test_step_maps_expected_pages_and_kernel_agrees():
    cache = make()
    lens = [33, 0, 100, 1]
    cache.step(lens)
    blocks = sum(pages_for(n) for n in lens)
    assert blocks == 2 + 4 + 1
    st = cache.stats()
    assert st["pages_mapped"] == blocks * REGIONS
    assert st["pages_free"] == st["pages_total"] - blocks * REGIONS
    assert st["virtual_bytes_reserved"] == REGIONS * 4 * (-(-200 * TOKEN_BYTES // PAGE) * PAGE)
    for slot, n in enumerate(lens):
        assert len(cache.slot_blocks(slot)) == pages_for(n)
        fill(cache, slot, 0, n, float(slot + 1))
    st = cache.stats()
    # What the kernel says: resident bytes of the reservations and of the memfd pool.
    assert st["rss_bytes_mapped"] == blocks * REGIONS * PAGE
    assert resident_bytes(cache.region_ranges()) == blocks * REGIONS * PAGE
    assert st["pool_resident_bytes"] == blocks * REGIONS * PAGE
    assert sum(mincore_resident_bytes(a, b - a) for a, b in cache.region_ranges()) == blocks * REGIONS * PAGE
    cache.check_invariants()


def test_growth_keeps_data_and_maps_only_new_pages():
    cache = make()
    cache.step([31, 0, 0, 0])
    fill(cache, 0, 0, 31, 7.0)
    first = cache.slot_blocks(0)
    cache.step([95, 0, 0, 0])
    assert cache.slot_blocks(0)[: len(first)] == first
    assert len(cache.slot_blocks(0)) == pages_for(95)
    for t in cache.tensors:
        assert torch.all(t[0, :31] == 7.0)
    cache.step([10, 0, 0, 0])  # never shrinks a live slot
    assert len(cache.slot_blocks(0)) == pages_for(95)


def test_slots_are_isolated():
    cache = make()
    cache.step([64, 64, 64, 64])
    for s in range(4):
        fill(cache, s, 0, 64, float(s))
    for s in range(4):
        for t in cache.tensors:
            assert torch.all(t[s, :64] == float(s))
    owned = [b for s in range(4) for b in cache.slot_blocks(s)]
    assert len(owned) == len(set(owned))


def test_free_deferred_then_eager_reclaim_returns_pages():
    cache = make()
    cache.step([64, 96, 0, 0])
    fill(cache, 1, 0, 96, 1.0)
    free_before = cache.num_free_blocks()
    cache.free_slot(1)
    st = cache.stats()
    # Deferred: still mapped (kernel agrees) but counted as reclaimable.
    assert st["blocks_reclaimable"] == pages_for(96)
    assert cache.num_free_blocks() == free_before + pages_for(96)
    assert st["rss_bytes_mapped"] == (pages_for(64) + pages_for(96)) * REGIONS * PAGE
    cache.step([64, 0, 0, 0], eager_reclaim=True)
    st = cache.stats()
    assert st["pages_mapped"] == pages_for(64) * REGIONS
    assert st["rss_bytes_mapped"] == pages_for(64) * REGIONS * PAGE
    # Reclaimed pages went back to the OS too (holes punched in the memfd).
    assert st["pool_resident_bytes"] == pages_for(64) * REGIONS * PAGE
    assert cache.slot_blocks(1) == []
    cache.check_invariants()


def test_non_deferred_free_unmaps_now():
    cache = make()
    cache.set_deferred_reclamation(False)
    cache.step([0, 0, 128, 0])
    cache.free_slot(2)
    st = cache.stats()
    assert st["pages_mapped"] == 0 and st["rss_bytes_mapped"] == 0 and st["pool_resident_bytes"] == 0
    assert st["pages_free"] == st["pages_total"]


def test_short_pool_reclaims_from_freed_slots():
    cache = make(blocks=8)
    cache.step([128, 128, 0, 0])  # 4 + 4 blocks: the pool is full
    assert cache.stats()["blocks_free"] == 0
    cache.free_slot(0)
    cache.step([0, 128, 64, 0])  # slot 2 takes 2 of slot 0's deferred pages
    assert len(cache.slot_blocks(2)) == 2 and len(cache.slot_blocks(0)) == 2
    cache.check_invariants()


def test_pool_exhaustion_raises_and_changes_nothing():
    cache = make(blocks=8)
    cache.step([128, 0, 0, 0])
    before = cache.stats()
    with pytest.raises(va.OutOfPagesError, match="exhausted"):
        cache.step([128, 96, 64, 0])  # needs 3 + 2 more blocks, only 4 are free
    after = cache.stats()
    assert before == after
    assert not cache.slot_active(1)
    assert isinstance(va.OutOfPagesError("x"), MemoryError)


def test_alloc_slot_prefers_mapped_slot_and_returns_minus_one_when_full():
    cache = make()
    cache.step([0, 0, 96, 0])
    cache.free_slot(2)
    assert cache.alloc_slot(90) == 2  # already covers 90 tokens
    assert {cache.alloc_slot(0) for _ in range(3)} == {0, 1, 3}
    assert cache.alloc_slot(10) == -1


def test_tensor_views_layout():
    cache = make(slots=3, max_ctx=50)
    k = cache.k_cache(1)
    assert k.shape == (3, 50, HKV, D) and k.dtype == torch.float32
    assert len(cache.tensors) == REGIONS
    assert cache.v_cache(0).data_ptr() == cache.tensors[LAYERS].data_ptr()
    # slot i starts at a page-aligned offset
    assert k.stride(0) * 4 % PAGE == 0


def test_bfloat16_cache():
    cache = va.KVCache(1, 2, 64, 2, 100, dtype=torch.bfloat16, page_size=4096, kv_cache_memory=1 << 20)
    cache.step([40, 1])
    cache.k_cache(0)[0, :40] = 1.5
    assert cache.k_cache(0).dtype == torch.bfloat16
    assert torch.all(cache.k_cache(0)[0, :40] == 1.5)
    assert cache.tokens_per_page == 4096 // 256


def test_tensors_keep_memory_alive_after_close():
    cache = make()
    cache.step([10, 0, 0, 0])
    k = cache.k_cache(0)
    k[0, :10] = 3.0
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.stats()
    assert torch.all(k[0, :10] == 3.0)


def test_several_caches_coexist():
    a, b = make(), make()
    a.step([10, 0, 0, 0])
    b.step([0, 50, 0, 0])
    a.k_cache(0)[0, :10] = 1.0
    b.k_cache(0)[1, :50] = 2.0
    assert a.stats()["pages_mapped"] == pages_for(10) * REGIONS
    assert b.stats()["pages_mapped"] == pages_for(50) * REGIONS
    assert torch.all(a.k_cache(0)[0, :10] == 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=5000), "multiple of the OS page"),
    (dict(page_size=4 << 20), "between 4 KiB and 2 MiB"),
    (dict(num_kv_heads=0), "num_kv_heads must be positive"),
    (dict(max_batch_size=-1), "max_batch_size must be positive"),
    (dict(dtype="int8"), "unsupported KV cache dtype"),
    (dict(device="tpu"), "unsupported device"),
    # Sizes that overflow int64 or are absurd: rejected before anything is reserved.
    (dict(num_kv_heads=2 ** 12, head_dim=2 ** 10, max_batch_size=1, max_context_len=2 ** 40 + 3, page_size=2 << 20),
     "overflows int64"),
    (dict(num_kv_heads=2 ** 62, head_dim=4), "bytes per token overflows"),
    (dict(max_context_len=2 ** 63 - 1), "overflows int64"),
    (dict(max_context_len=2 ** 40), "more than 64 TiB"),
    (dict(num_layers=2 ** 62), "num_layers"),
    (dict(max_batch_size=2 ** 40), "max_batch_size"),
    (dict(page_size=-4096), "page_size must be positive"),
    (dict(map_ahead_tokens=-1), "map_ahead_tokens"),
])
def test_bad_configuration_raises(kwargs, message):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=32, max_batch_size=4, max_context_len=100, page_size=4096)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        va.KVCache(**args)


def test_bad_calls_raise():
    cache = va.KVCache(LAYERS, HKV, D, 4, 200, page_size=PAGE)
    with pytest.raises(RuntimeError, match="reserve_physical_pages first"):
        cache.step([1, 0, 0, 0])
    with pytest.raises(ValueError, match="less than one block"):
        cache.reserve_physical_pages(100)
    cache.reserve_physical_pages(8 * BLOCK_BYTES)
    with pytest.raises(RuntimeError, match="already"):
        cache.reserve_physical_pages(8 * BLOCK_BYTES)
    with pytest.raises(ValueError, match="one entry per slot"):
        cache.step([1, 2])
    with pytest.raises(ValueError, match="max_context_length"):
        cache.step([201, 0, 0, 0])
    with pytest.raises(ValueError, match="outside"):
        cache.step([-1, 0, 0, 0])
    with pytest.raises(IndexError, match="slot 4 out of range"):
        cache.free_slot(4)
    with pytest.raises(ValueError, match="not in use"):
        cache.free_slot(0)


def test_overflowing_config_from_issue_is_rejected_not_mapped():
    """KVCache(1, 2**12, 2**10, 1, 2**40+3): max_context_len x bytes per token wraps int64 to
    48 MiB, so the slot reserved 24 pages and step([4]) mapped 32 past it."""
    with pytest.raises(ValueError, match="overflows int64"):
        va.KVCache(1, 2 ** 12, 2 ** 10, 1, 2 ** 40 + 3, page_size=2 << 20)


def test_bounds_at_the_binding():
    core = va._C.KVCacheCore
    with pytest.raises(ValueError, match="device"):
        core(1, 1, 64, 4, 1, 64, 4096, device=-2)
    with pytest.raises(ValueError, match="dtype size"):
        core(1, 1, 64, 16, 1, 64, 4096)
    with pytest.raises(TypeError):  # does not fit int64
        core(1, 1, 64, 4, 1, 2 ** 64, 4096)
    cache = va.KVCache(1, 1, 64, 2, 64, page_size=4096, kv_cache_memory=1 << 20, map_ahead_tokens=2 ** 63 - 1)
    cache.step_async([64, 1])  # seq_len + map_ahead_tokens saturates at max_context_len
    cache.wait_async()
    cache.check_invariants()
    for bad in (-1, 2, 2 ** 63 - 1, -2 ** 63):
        with pytest.raises(IndexError):
            cache.free_slot(bad)
        with pytest.raises(IndexError):
            cache.slot_blocks(bad)
    for lens in ([2 ** 62, 0], [-2 ** 63, 0], [0] * 3, []):
        with pytest.raises(ValueError):
            cache.step(lens)
    for n in (-1, 65, 2 ** 63 - 1):
        with pytest.raises(ValueError):
            cache.alloc_slot(n)
    fresh = va.KVCache(1, 1, 64, 2, 64, page_size=4096)
    for budget in (-1, 0, 2 ** 62, 2 ** 63 - 1):
        with pytest.raises(ValueError):
            fresh.reserve_physical_pages(budget)
    with pytest.raises(ValueError, match="physical memory"):
        va.KVCache(8, 1, 64, 2, 64, page_size=2 << 20).reserve_physical_pages(2 ** 50)


def test_map_count_limit_is_enforced():
    cache = va.KVCache(LAYERS, HKV, D, 64, 100_000, page_size=4096)
    with pytest.raises(ValueError, match="max_map_count"):
        cache.reserve_physical_pages(1 << 30)  # 262144 pages of 4 KiB


def test_default_page_size_is_token_aligned_and_bounded():
    tb = 3 * 64 * 4  # SmolLM2, fp32
    page = va.default_page_size(tb, 4 << 30)
    assert page % 4096 == 0 and page % tb == 0 and 64 * 1024 <= page <= 2 << 20
    assert (4 << 30) // page <= va.page_size.max_map_count() // 8
    assert va.default_page_size(tb, None, cuda=True) % (2 << 20) == 0


def test_original_function_api():
    va.cleanup()
    tensors = va.init_kvcache(2, 2, 32, 4, 100, "cpu", torch.float32, 8192)
    assert len(tensors) == 4 and tensors[0].shape == (4, 100, 2, 32)
    assert va.reserve_physical_pages(16 * 4 * 8192) == 64
    slot = va.alloc_new_batch_idx(40)
    assert 0 <= slot < 4
    lens = [0] * 4
    lens[slot] = 40
    va.step(lens)
    tensors[0][slot, :40] = 1.0
    assert va.num_free_kvblocks() == 16 - 2
    va.step_async(lens)
    va.free_batch_idx(slot)
    assert va.num_free_kvblocks() == 16
    va.set_deferred_reclamation(False)
    va.cleanup()
    with pytest.raises(RuntimeError, match="init_kvcache"):
        va.num_free_kvblocks()
    with pytest.raises(NotImplementedError, match="megacache"):
        va.init_kvcache(2, 2, 32, 4, 100, "cpu", torch.float32, 8192, megacache=True)


def test_allocator_import_does_not_need_torch():
    code = "import sys, vattention_ext as va; c = va.KVCache(1, 1, 64, 2, 64, kv_cache_memory=1 << 20); " \
           "c.step([64, 0]); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
