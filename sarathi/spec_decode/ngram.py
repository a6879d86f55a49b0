"""Prompt lookup decoding: the draft is what followed the most recent earlier occurrence of
the context's last n tokens (n from prompt_lookup_max down to prompt_lookup_min)."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> List[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens, for the
    longest n in [min_n, max_n] that matches; [] when none does.

    One vectorised comparison of the whole context finds where the last token occurred
    before; each longer n then keeps those of the candidates whose preceding token matches
    too (max_n small steps over the candidates, no loop over the context).

    A match that ends p tokens before the end says the text repeats with period p: when the
    draft runs past the end of the context it goes on with its own first tokens (a list or
    a phrase said again and again drafts k tokens, not only the p that are there)."""
    a = np.asarray(tokens, dtype=np.int64)
    total = a.shape[0]
    if total < 2 or k <= 0:
        return []
    ends = np.flatnonzero(a[:total - 1] == a[total - 1])   # the last 1 tokens matched, ending at each
    end, n = -1, 1
    while ends.size:
        if n >= min_n:
            end = int(ends[-1])
        if n == max_n:
            break
        ends = ends[ends >= n]                                # room for one more token before
        ends = ends[a[ends - n] == a[total - 1 - n]]
        n += 1
    if end < 0:
        return []
    period = total - 1 - end
    draft = a[end + 1:total]
    if k > period:
        draft = np.resize(draft, k)                           # repeated in order
    return draft[:k].tolist()
