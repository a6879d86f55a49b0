"""Prompt lookup decoding: the draft is what followed the most recent earlier occurrence of
the context's last n tokens (n from prompt_lookup_max down to prompt_lookup_min)."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> List[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens, for the
    longest n in [min_n, max_n] that matches; [] when none does. One vectorised comparison
    of every window per n, no loop over the context."""
    a = np.asarray(tokens, dtype=np.int64)
    total = a.shape[0]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # windows starting at 0 .. total - n - 1: each has at least one token after it
        windows = sliding_window_view(a[:total - 1], n)
        hits = np.flatnonzero((windows == a[total - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return a[start:start + k].tolist()
    return []
