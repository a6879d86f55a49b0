"""What the kernel says about our memory: resident bytes of address ranges, read
from /proc/self/smaps (no allocator bookkeeping involved)."""
from __future__ import annotations


def resident_bytes(ranges: list[tuple[int, int]]) -> int:
    """Sum of the kernel's Rss over every mapping that lies inside one of `ranges`
    ((start, end) address pairs, end exclusive)."""
    total = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = any(lo >= a and hi <= b for a, b in ranges)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def mapping_count() -> int:
    """Number of mappings this process has now (lines of /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)
