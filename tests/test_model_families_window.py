"""Sliding-window pages released on models that mix sliding and full-attention layers.

Gemma 3 (two sliding layers, one global, a 16-token window) on the vattention backend: the
sliding layers' pages behind the window go back to their pool while the global layer keeps
its own, as the kernel counts them (`kv_bytes_mapped_sliding` / `_global`), and the scheduler
counts what was given back (its KVManager's units). Tokens are transformers', and the same
with release on and off through chunked prefill, preemption under a tight budget and
prefix-cache hits.
"""
from __future__ import annotations

import pytest

from sarathi import LLM, SamplingParams
from sarathi.model_executor.kv_cache.vattention import VAttentionBackend
from test_model_families import PROMPTS, WINDOW, assert_matches, family, run  # noqa: F401 - fixture

PAGE = 4096   # 16 tokens of one layer's K (2 KV heads x 32 dims x fp32)


def _llm(d, **kw):
    args = dict(kv_cache_backend="vattention", chunk_size=16, max_model_len=256, max_num_seqs=4,
                kv_cache_memory="4MiB", page_size=PAGE, async_kv_mapping=False)
    return LLM(model=str(d), **{**args, **kw})


def test_sliding_pages_stop_growing_past_the_window(family):
    d, refs = family("gemma3")
    llm = _llm(d, max_num_seqs=2, enable_prefix_caching=False)
    eng = llm.engine
    assert eng.kv.window == WINDOW and eng.kv.mixed and (eng.kv.sliding_layers, eng.kv.layers) == (2, 3)
    prompt = list(range(300, 480))   # 180 tokens: 12 pages of 16
    eng.add_request("long", None, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
                    prompt_token_ids=prompt)
    sliding, glob, free = [], [], []
    while eng.has_unfinished_requests():
        eng.step()
        st = eng.runner.kv_stats()
        sliding.append(st["kv_bytes_mapped_sliding"])
        glob.append(st["kv_bytes_mapped_global"])
        free.append(eng.kv.num_free_blocks)
        eng.kv.check_invariants()
        eng.runner.kv_backend.check_invariants()
    steps = len(sliding)
    assert steps == 12 + 59
    # Two sliding layers' K and V: 4 regions. Past the window, at most the window's page, the
    # page being written and one page of slack are mapped; the global layer (2 regions) holds
    # every page of the sequence (240 tokens: 15 pages) at the end.
    assert max(sliding[2:-1]) <= 3 * 4 * PAGE
    assert glob[-2] == 15 * 2 * PAGE and glob[-2] > glob[20] > glob[5]
    assert eng.kv.num_free_blocks == eng.kv.num_blocks   # all of it back once the sequence finished
    # The scheduler sees what was given back: more whole blocks free than without release.
    assert free[30] > eng.kv.num_blocks - 15
    assert_matches(run(llm, PROMPTS), refs)


def _workload(llm):
    """Long generations beside each other: prompt chunks of 16, a tight budget (preemption),
    and prompts repeated so later ones hit the prefix cache."""
    base = list(range(1000, 1100))
    prompts = [base, list(range(300, 370)), base + [7, 8, 9], base[:60], list(range(2000, 2090))]
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("caching, blocks", [(False, 40), (True, 28)])
def test_same_tokens_with_release_on_and_off(family, monkeypatch, caching, blocks):
    d, _ = family("gemma3")
    budget = blocks * PAGE * 2 * 3   # blocks of a page in every layer (16 tokens) for 5 sequences of ~190
    on = _llm(d, kv_cache_memory=budget, enable_prefix_caching=caching)
    assert on.engine.kv.mixed
    got = _workload(on)
    eng = on.engine
    eng.kv.check_invariants()
    eng.runner.kv_backend.check_invariants()
    preempted_on = eng.scheduler.num_preemptions
    if caching:
        assert eng.kv.num_hit_tokens > 0
    with monkeypatch.context() as m:
        m.setattr(VAttentionBackend, "releases_per_group", False)
        off = _llm(d, kv_cache_memory=budget, enable_prefix_caching=caching)
        assert not off.engine.kv.mixed and off.engine.kv.window == 0
        want = _workload(off)
        preempted_off = off.engine.scheduler.num_preemptions
    assert got == want
    assert preempted_off > 0   # the budget is tight without release
    assert preempted_on < preempted_off   # and released pages admit more work


def test_kv_manager_counts_layer_pages():
    """The KVManager alone (no torch): 10 blocks of 3 layers, 2 sliding with a 16-token window."""
    from sarathi.core.kv_manager import KVManager, ReleaseBlocks, ReleaseFront

    kv = KVManager(10, 16, 2, watermark=0.0, window=16, window_layers=(2, 3), enable_prefix_caching=True)
    assert kv.mixed and kv.num_ids == 30   # every block without its sliding part: 30 units / 1 full layer
    tokens = list(range(160))
    kv.admit(0, 160)
    assert kv.num_free_blocks == 0
    kv.slide(0, 160)   # the next query reads from 145 on: blocks 0..8 lose their sliding part
    assert kv.take_ops() == [ReleaseFront(0, 9)]
    assert kv.num_free_blocks == (30 - 9 * 1 - 3) // 3 == 6
    kv.check_invariants()
    kv.cache_blocks(0, tokens, 160)   # only the block that still has its sliding part is cached
    assert kv.num_cached_blocks == 1
    kv.admit(1, 96)
    kv.check_invariants()
    assert kv.num_free_blocks == 0 and not kv.can_grow(1, 97)
    kv.free(1)
    kv.free(0)
    kv.check_invariants()
    assert kv.num_free_blocks == 10
    # A later request with that prefix shares all 10 blocks' full part and the cached one's both.
    hit = kv.match(2, tokens + [1], "")
    assert hit.num_cached_tokens == 0   # blocks 0..8 are not cached: nothing to start on
    kv.take_ops()
    # Cached blocks whose sliding part nobody reads count free and are evicted when needed.
    kv.uncache(next(iter(kv._evictable)))   # (seq 0's last block: leave only what follows)
    kv.admit(3, 48)
    kv.cache_blocks(3, tokens, 48)
    kv.slide(3, 48)                 # blocks 0 and 1 behind the window: cached, sliding parts idle
    assert kv.num_free_blocks == (30 - 2 * 1 - 3) // 3 == 8
    kv.take_ops()
    kv.admit(4, 16 * 8)             # 7 blocks are physically free: the 8th takes both idle parts
    ops = kv.take_ops()             # (2 units each), and their blocks leave the cache
    assert sum(isinstance(op, ReleaseBlocks) for op in ops) == 2 and kv.num_cached_blocks == 1
    assert kv.num_free_blocks == 0
    kv.check_invariants()
