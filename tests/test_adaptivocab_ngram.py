"""n-gram counting and overlap-aware greedy selection (no tokenizer needed)."""
from collections import Counter

import numpy as np
import pytest

from adaptivocab.ngram import BARRIER, corpus_array, count_ngrams, select_ngrams


def brute_counts(ids, n):
    c = Counter()
    for i in range(len(ids) - n + 1):
        w = tuple(ids[i:i + n])
        if BARRIER not in w:
            c[w] += 1
    return c


@pytest.mark.parametrize("n", [2, 3, 5])
def test_count_ngrams_matches_brute_force(n):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 6, size=3000)
    ids[rng.integers(0, 3000, size=40)] = BARRIER
    cand = count_ngrams(ids, n, min_count=1)
    got = {tuple(int(x) for x in g): int(c) for g, c in zip(cand.ngrams, cand.counts)}
    assert got == dict(brute_counts(ids.tolist(), n))
    # Positions are grouped per candidate and really are occurrences of it.
    for k in range(len(cand.counts)):
        pos = cand.positions[cand.offsets[k]:cand.offsets[k + 1]]
        assert len(pos) == cand.counts[k]
        assert all(tuple(ids[p:p + n]) == tuple(cand.ngrams[k]) for p in pos[:5])


def test_large_ids_use_wider_keys():
    ids = np.array([70000, 70001, 5, 70000, 70001, 5], dtype=np.int64)
    cand = count_ngrams(ids, 2, min_count=2)
    assert {tuple(g) for g in cand.ngrams.tolist()} == {(70000, 70001), (70001, 5)}


def test_selection_is_overlap_aware():
    # "1 2 3" occurs 10 times, "7 8" 8 times. Naive top-3 by count*(n-1) would take
    # (1,2,3), (1,2) and (2,3): the last two are redundant once (1,2,3) is chosen.
    seq = [1, 2, 3, BARRIER] * 10 + [7, 8, BARRIER] * 8
    ids = np.array(seq, dtype=np.int64)
    cands = [count_ngrams(ids, n, min_count=2) for n in (2, 3)]
    naive = sorted(((int(c) * (cd.n - 1), tuple(g)) for cd in cands for g, c in zip(cd.ngrams.tolist(), cd.counts)),
                   reverse=True)[:3]
    assert {g for _, g in naive} == {(1, 2, 3), (1, 2), (2, 3)}  # the trap is real
    chosen = select_ngrams(ids, cands, 3, show_progress=False)
    tokens = [c.tokens for c in chosen]
    assert tokens[0] == (1, 2, 3)
    assert (7, 8) in tokens
    assert (1, 2) not in tokens and (2, 3) not in tokens
    assert chosen[0].saved == 20


def test_self_overlapping_ngram_counts_non_overlapping_occurrences():
    ids = np.array([5, 5, 5, 5, 5, BARRIER, 5, 5], dtype=np.int64)
    chosen = select_ngrams(ids, [count_ngrams(ids, 2, min_count=1)], 1, min_count=1, show_progress=False)
    # 5 5 5 5 5 holds two disjoint "5 5" (not four); plus one after the barrier.
    assert chosen[0].tokens == (5, 5) and chosen[0].count == 3


def test_corpus_array_puts_barriers_between_documents_and_at_special_ids():
    arr = corpus_array([[4, 5], [6, 0, 7]], barrier_ids={0})
    assert arr.tolist() == [4, 5, BARRIER, 6, BARRIER, 7, BARRIER]
