"""KV backends: `vattention` (default), `paged` (the baseline) and `contiguous` (the oracle).

See base.py for the seam every backend implements.
"""
from .base import KVBackend, KVCacheSpec, StepBatch

from sarathi.config import KV_BACKENDS


def kv_backend_class(name: str) -> type:
    """The backend class for a --kv-cache-backend name (imported on demand)."""
    if name == "contiguous":
        from .contiguous import ContiguousBackend
        return ContiguousBackend
    if name == "vattention":
        from .vattention import VAttentionBackend
        return VAttentionBackend
    if name == "paged":
        from .paged import PagedBackend
        return PagedBackend
    raise ValueError(f"unknown KV cache backend {name!r}; choose one of {', '.join(KV_BACKENDS)}")


__all__ = ["KVBackend", "KVCacheSpec", "StepBatch", "KV_BACKENDS", "kv_backend_class"]
