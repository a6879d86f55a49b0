"""Choosing a page size: token aligned, a multiple of the OS page, and large enough
that the pool stays far below the kernel's per-process mapping limit."""
from __future__ import annotations

import math
import os

KIB = 1024
MIB = 1024 * KIB
MIN_PAGE = 4 * KIB
MAX_CPU_PAGE = 2 * MIB
CUDA_GRANULARITY = 2 * MIB  # cuMemGetAllocationGranularity on stock drivers


def max_map_count() -> int:
    """vm.max_map_count: how many mappings one process may have (65530 by default)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 65530


def default_page_size(bytes_per_token_per_layer: int, kv_budget_bytes: int | None, cuda: bool = False) -> int:
    """Page size in bytes for a cache whose K (or V) region holds `bytes_per_token_per_layer`
    bytes per token.

    CPU: a multiple of both the OS page and the token size (so a page holds whole tokens),
    at least 64 KiB, and big enough that the whole budget needs at most max_map_count/8 pages
    (each mapped page may be its own kernel mapping). CUDA: a multiple of the 2 MiB driver
    granularity, token aligned when that costs at most 16x.
    """
    if bytes_per_token_per_layer <= 0:
        raise ValueError(f"bytes_per_token_per_layer must be positive, got {bytes_per_token_per_layer}")
    if cuda:
        unit = math.lcm(bytes_per_token_per_layer, CUDA_GRANULARITY)
        return unit if unit <= 16 * CUDA_GRANULARITY else CUDA_GRANULARITY
    os_page = os.sysconf("SC_PAGESIZE")
    unit = math.lcm(bytes_per_token_per_layer, os_page)
    if unit > MAX_CPU_PAGE:  # huge tokens: give up on alignment, stay within 2 MiB
        unit = os_page
    want = 64 * KIB
    if kv_budget_bytes:
        want = max(want, -(-kv_budget_bytes * 8 // max_map_count()))
    page = -(-want // unit) * unit
    if page > MAX_CPU_PAGE:
        page = max(unit, MAX_CPU_PAGE // unit * unit)
    return page
