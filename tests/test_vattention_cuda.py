"""CUDA backend (cuMem* virtual memory through dlopen'ed libcuda): runs on a GPU machine,
skips with a reason elsewhere; without a driver the error is a clear Python exception."""
import pytest
import torch

import vattention_ext as va

HAS_DRIVER = va.cuda_available()
HAS_GPU = HAS_DRIVER and torch.cuda.is_available()
need_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA driver (libcuda.so.1) on this machine" if not HAS_DRIVER
                              else "libcuda present but torch sees no GPU")


@pytest.mark.skipif(HAS_DRIVER, reason="libcuda.so.1 is present: the no-driver error cannot be provoked")
def test_without_driver_raises_clear_error():
    with pytest.raises(va.CudaError, match="libcuda.so.1"):
        va.KVCache(2, 2, 64, 4, 128, device="cuda")


@need_gpu
@pytest.mark.cuda
def test_cuda_pages_map_and_hold_data():
    torch.cuda.init()
    page = 2 << 20
    cache = va.KVCache(2, 2, 64, 4, 8192, dtype=torch.float16, device="cuda:0", page_size=page,
                       kv_cache_memory=16 * 4 * page)
    tb = 2 * 64 * 2
    cache.step([4096, 0, 100, 0])
    st = cache.stats()
    expected = -(-4096 * tb // page) + -(-100 * tb // page)
    assert st["pages_mapped"] == expected * 4
    k = cache.k_cache(1)
    assert k.is_cuda and k.shape == (4, 8192, 2, 64)
    k[0, :4096] = 1.0
    k[2, :100] = 2.0
    torch.cuda.synchronize()
    assert torch.all(k[0, :4096] == 1.0).item() and torch.all(k[2, :100] == 2.0).item()
    cache.free_slot(0)
    cache.step([0, 0, 100, 300], eager_reclaim=True)
    cache.step_async([0, 0, 200, 300])
    cache.wait_async()
    cache.check_invariants()
    assert torch.all(k[2, :100] == 2.0).item()


@need_gpu
@pytest.mark.cuda
def test_cuda_page_size_must_match_granularity():
    with pytest.raises(ValueError, match="granularity"):
        va.KVCache(2, 2, 64, 4, 128, device="cuda", page_size=64 * 1024)


@need_gpu
@pytest.mark.cuda
def test_cuda_exhaustion_raises():
    page = 2 << 20
    cache = va.KVCache(1, 8, 128, 2, 4096, dtype=torch.float16, device="cuda", page_size=page,
                       kv_cache_memory=2 * 2 * page)
    with pytest.raises(va.OutOfPagesError):
        cache.step([4096, 4096])


@need_gpu
@pytest.mark.cuda
def test_cuda_shared_pages_and_copy_on_write():
    """Prefix caching on CUDA: pinned pages mapped into a second slot are the same device memory;
    the copied last page (cuMemcpyDtoD through a scratch mapping) holds the data and is private."""
    page = 2 << 20
    cache = va.KVCache(1, 2, 64, 4, 8192, dtype=torch.float16, device="cuda:0", page_size=page,
                       kv_cache_memory=16 * 2 * page)
    tpp = page // (2 * 64 * 2)                         # tokens per page: 8192
    n = tpp + 100                                       # one full page and part of a second
    cache.step([n, 0, 0, 0])
    k = cache.k_cache(0)
    k[0, :n] = torch.arange(n, device="cuda", dtype=torch.float32)[:, None, None].half()
    torch.cuda.synchronize()
    pinned = [cache.pin(0, p) for p in range(2)]
    cache.share_prefix(1, pinned[:1], copy_src=pinned[1])
    cache.step([0, n + 10, 0, 0])
    cache.check_invariants()
    assert cache.slot_blocks(1)[0] == pinned[0] and cache.slot_blocks(1)[1] != pinned[1]
    torch.cuda.synchronize()
    assert torch.equal(k[1, :n], k[0, :n])
    k[0, 5] = -1.0                                      # shared page: seen through slot 1
    k[1, tpp + 3] = -2.0                                # copied page: slot 1's own
    torch.cuda.synchronize()
    assert float(k[1, 5, 0, 0]) == -1.0 and float(k[0, tpp + 3, 0, 0]) != -2.0
    for b in pinned:
        cache.unpin(b)
    cache.free_slot(0)
    cache.free_slot(1)
    cache.check_invariants()


@need_gpu
@pytest.mark.cuda
def test_cuda_uncommitted_pool_releases_pages_behind_the_window():
    """commit_pool=False (a layer group's pool): a page takes device memory when first mapped;
    release_front unmaps pages behind a sliding window and their handles go back to the driver,
    while the pages after them keep their data."""
    torch.cuda.init()
    page = 2 << 20
    cache = va.KVCache(1, 2, 64, 2, 16384, dtype=torch.float16, device="cuda:0", page_size=page,
                       kv_cache_memory=16 * 2 * page, commit_pool=False)
    assert cache.stats()["pool_resident_bytes"] == 0
    tb = 2 * 64 * 2
    per_page = page // tb
    cache.step([4 * per_page, 0])
    assert cache.stats()["pool_resident_bytes"] == 4 * 2 * page
    k = cache.k_cache(0)
    k[0, 3 * per_page:4 * per_page] = 3.0
    torch.cuda.synchronize()
    cache.release_front(0, 3)
    st = cache.stats()
    assert st["pool_resident_bytes"] == 1 * 2 * page and st["pages_released"] == 3 * 2
    assert torch.all(k[0, 3 * per_page:4 * per_page] == 3.0).item()
    cache.check_invariants()
    cache.free_slot(0)
    assert cache.stats()["pool_resident_bytes"] == 0
