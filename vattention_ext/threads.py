"""How many threads the native kernels take: the attention kernel here, and the quantized
linear and LoRA kernels of sarathi (all on a small fork-join pool, csrc/work_pool.h).

By default they follow torch.get_num_threads(). An engine whose matmuls all run on these
kernels sets its thread count here and gives torch's own (element-wise) ops one thread:
torch's OpenMP team spins after each of its regions, and on a machine with as many cores
as threads the spinning thread holds the core our pool's helper is waiting for.
"""
from __future__ import annotations

from typing import Optional

_threads: Optional[int] = None


def native_threads() -> int:
    """Threads per native kernel call: the value set by set_native_threads, else torch's."""
    if _threads is not None:
        return _threads
    import torch

    return torch.get_num_threads()


def set_native_threads(n: Optional[int]) -> None:
    """n >= 1 threads for every later native kernel call (None: follow torch again)."""
    global _threads
    if n is not None and int(n) < 1:
        raise ValueError(f"native threads must be >= 1, got {n}")
    _threads = None if n is None else int(n)
