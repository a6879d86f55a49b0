"""vAttention KV cache: virtually contiguous per-request K/V slots backed on demand by
physical pages (memfd on CPU, CUDA virtual memory management on GPU), and a CPU
attention kernel over those slots. Native code lives in csrc/ (vattention_ext._C).

The allocator (`KVCache` without tensors, the original-name functions) does not
import torch; `KVCache.tensors` and `attention` do, on first use.
"""
from . import _C
from ._C import CudaError, NativeOSError, OutOfPagesError
from .cache import KVCache
from .original_api import (alloc_new_batch_idx, cleanup, free_batch_idx, init_kvcache, num_free_kvblocks,
                           reserve_physical_pages, set_deferred_reclamation, step, step_async)
from .page_size import default_page_size


def attention(*args, **kwargs):
    """See vattention_ext.kernel.attention (imported lazily: it needs torch)."""
    from .kernel import attention as _attention

    return _attention(*args, **kwargs)


def cuda_available() -> bool:
    """True when libcuda.so.1 can be loaded (the CUDA backend's only requirement)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


__all__ = ["KVCache", "OutOfPagesError", "CudaError", "NativeOSError", "attention", "default_page_size",
           "init_kvcache", "reserve_physical_pages", "alloc_new_batch_idx", "free_batch_idx", "step", "step_async",
           "num_free_kvblocks", "set_deferred_reclamation", "cleanup", "cuda_available"]
