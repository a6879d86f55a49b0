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
