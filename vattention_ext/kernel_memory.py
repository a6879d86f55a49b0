"""What the kernel says about our memory: resident bytes of address ranges, read
from /proc/self/smaps (no allocator bookkeeping involved)."""
from __future__ import annotations

import ctypes
import os


def smaps_totals(ranges: list[tuple[int, int]], fields=("Rss", "Pss")) -> dict:
    """Sums of /proc/self/smaps fields (bytes) over every mapping that overlaps one of
    `ranges` ((start, end) address pairs, end exclusive). Our reservations are whole
    mappings; for a torch tensor the mapping that holds it may also hold an allocator
    header. A page mapped at n places counts fully in each one's Rss and 1/n in each
    one's Pss (smaps rounds each mapping's Pss down to whole KiB)."""
    totals = dict.fromkeys(fields, 0)
    keys = {f + ":": f for f in fields}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = any(lo < b and hi > a for a, b in ranges)
            elif inside and head in keys:
                totals[keys[head]] += int(line.split()[1]) * 1024
    return totals


def resident_bytes(ranges: list[tuple[int, int]]) -> int:
    """The kernel's Rss over the mappings overlapping `ranges` (see smaps_totals)."""
    return smaps_totals(ranges, ("Rss",))["Rss"]


def mapping_count() -> int:
    """Number of mappings this process has now (lines of /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def mincore_resident_bytes(addr: int, length: int) -> int:
    """Bytes of [addr, addr + length) the kernel has resident, by mincore(2), page exact."""
    import numpy as np

    page = os.sysconf("SC_PAGESIZE")
    start = addr // page * page
    end = -(-(addr + length) // page) * page
    vec = (ctypes.c_ubyte * ((end - start) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
