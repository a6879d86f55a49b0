"""Counting n-grams of base tokens and choosing the n-tokens of a patched vocabulary.

The corpus is one int array of base token ids in which -1 marks a barrier (a document
boundary or a special token): no n-gram spans a barrier. Counting is vectorised: every
window of n ids is viewed as one opaque byte string and `np.unique` groups equal windows.
Selection is greedy by savings, count x (n - 1), and overlap-aware: once an n-gram is
chosen, the corpus positions its occurrences cover are marked, and later candidates only
count occurrences that do not touch a covered position. Because covering only grows,
a candidate's score only falls, so a lazy max-heap gives exactly the greedy result.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

BARRIER = -1


@dataclass
class NgramCandidates:
    """All n-grams of one length n that occur at least `min_count` times."""

    n: int
    ngrams: np.ndarray  # (K, n) int64 base ids
    counts: np.ndarray  # (K,) raw occurrence counts (overlaps included)
    positions: np.ndarray  # start positions, grouped by candidate, ascending within a group
    offsets: np.ndarray  # (K + 1,) candidate k owns positions[offsets[k]:offsets[k + 1]]


@dataclass
class ChosenNgram:
    tokens: Tuple[int, ...]
    count: int  # occurrences it covers on the corpus, after earlier choices
    saved: int  # count * (n - 1)


def count_ngrams(ids: np.ndarray, n: int, min_count: int = 2) -> NgramCandidates:
    """Count the n-grams of `ids` that do not contain a barrier."""
    ids = np.asarray(ids, dtype=np.int64)
    m = len(ids) - n + 1
    if m <= 0:
        empty = np.zeros((0, n), np.int64)
        return NgramCandidates(n, empty, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64))
    # A window is valid when it holds no barrier: count barriers with a prefix sum.
    barrier_prefix = np.concatenate([[0], np.cumsum(ids == BARRIER)])
    starts = np.nonzero(barrier_prefix[n:] - barrier_prefix[:m] == 0)[0]
    if len(starts) == 0:
        empty = np.zeros((0, n), np.int64)
        return NgramCandidates(n, empty, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64))
    width = np.uint16 if ids.max() < (1 << 16) else np.uint32
    windows = np.stack([ids[starts + k] for k in range(n)], axis=1).astype(width)
    keys = np.ascontiguousarray(windows).view(np.dtype((np.void, windows.itemsize * n))).ravel()
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    keep = counts >= min_count
    # Renumber kept candidates 0..K-1 and group their start positions.
    new_index = np.cumsum(keep) - 1
    sel = keep[inverse]
    cand_of_pos = new_index[inverse[sel]]
    order = np.argsort(cand_of_pos, kind="stable")
    positions = starts[sel][order]
    kept_counts = counts[keep].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(kept_counts)])
    ngrams = windows[first[keep]].astype(np.int64)
    return NgramCandidates(n, ngrams, kept_counts, positions, offsets)


def _free_occurrences(pos: np.ndarray, n: int, covered: np.ndarray) -> np.ndarray:
    """Start positions of occurrences that touch no covered position and do not overlap each other."""
    free = ~np.logical_or.reduce([covered[pos + k] for k in range(n)])
    pos = pos[free]
    if len(pos) > 1 and np.any(np.diff(pos) < n):
        # Self-overlapping runs ("a a a" for "a a"): keep left-to-right, as the encoder does.
        keep, last_end = [], -1
        for p in pos.tolist():
            if p >= last_end:
                keep.append(p)
                last_end = p + n
        pos = np.asarray(keep, dtype=np.int64)
    return pos


def select_ngrams(
    ids: np.ndarray,
    candidates: List[NgramCandidates],
    num_ngrams: int,
    min_count: int = 2,
    show_progress: bool = True,
) -> List[ChosenNgram]:
    """Greedy overlap-aware choice of up to `num_ngrams` n-grams by tokens saved on `ids`."""
    covered = np.zeros(len(ids) + 1, dtype=bool)
    # Heap of (-score, n, k): scores are upper bounds that are refreshed when popped.
    heap = []
    for ci, c in enumerate(candidates):
        for k in range(len(c.counts)):
            heap.append((-int(c.counts[k]) * (c.n - 1), -c.n, ci, k))
    heapq.heapify(heap)
    chosen: List[ChosenNgram] = []
    bar = tqdm(total=num_ngrams, desc="selecting n-grams", unit="ngram", disable=not show_progress)
    while heap and len(chosen) < num_ngrams:
        neg_score, _, ci, k = heapq.heappop(heap)
        c = candidates[ci]
        pos = _free_occurrences(c.positions[c.offsets[k]:c.offsets[k + 1]], c.n, covered)
        score = len(pos) * (c.n - 1)
        if len(pos) < min_count:
            continue
        if heap and score < -heap[0][0]:
            heapq.heappush(heap, (-score, -c.n, ci, k))  # stale: someone else may be better now
            continue
        for j in range(c.n):
            covered[pos + j] = True
        chosen.append(ChosenNgram(tuple(int(t) for t in c.ngrams[k]), len(pos), score))
        bar.update(1)
    bar.close()
    return chosen


def corpus_array(token_lists, barrier_ids: Optional[set] = None) -> np.ndarray:
    """Concatenate token lists into one array with a barrier after each list and at special ids."""
    total = sum(len(t) for t in token_lists) + len(token_lists)
    out = np.full(total, BARRIER, dtype=np.int64)
    i = 0
    for toks in token_lists:
        out[i:i + len(toks)] = toks
        i += len(toks) + 1
    if barrier_ids:
        out[np.isin(out, np.fromiter(barrier_ids, dtype=np.int64))] = BARRIER
    return out
