"""The engine's KV backends through the seam: vattention (sync and async mapping) and
paged give the same attention outputs as the contiguous reference over a run of
mixed prefill-chunk / decode steps with sequences finishing and slots being reused."""
import random

import pytest
import torch

from sarathi.core.kv_manager import KVManager
from sarathi.model_executor.kv_cache import KVCacheSpec, StepBatch, kv_backend_class

HQ, HKV, D, LAYERS = 6, 2, 32, 2


def spec(**kw):
    args = dict(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, device=torch.device("cpu"),
                max_model_len=256, max_num_seqs=4, kv_cache_memory=1 << 20, block_size=16, page_size=4096)
    args.update(kw)
    return KVCacheSpec(**args)


def script(seed=0, steps=24):
    """Steps of (seq_id, new tokens) with prefills first, and the seqs that finish after each step."""
    rng = random.Random(seed)
    live, next_id, out = {}, 0, []
    for _ in range(steps):
        while len(live) < 3:
            live[next_id] = [rng.randint(5, 70), 0]  # [prompt tokens left, cached tokens]
            next_id += 1
        prefills, decodes = [], []
        for sid, (left, cached) in live.items():
            if left > 0:
                n = min(left, 24)  # chunked prefill
                prefills.append((sid, n))
            else:
                decodes.append((sid, 1))
        batch = prefills + decodes
        for sid, n in batch:
            live[sid][0] = max(0, live[sid][0] - n)
            live[sid][1] += n
        done = [sid for sid, (left, cached) in live.items() if left == 0 and cached > 30 and rng.random() < 0.3]
        for sid in done:
            del live[sid]
        out.append((batch, len(prefills), done))
    return out


def run(backend, sp, steps, seed=1):
    cls = kv_backend_class(backend)
    num_blocks, block_size, num_slots = cls.layout(sp)
    mgr = KVManager(num_blocks, block_size, num_slots)
    cache = cls(sp)
    g = torch.Generator().manual_seed(seed)
    cached, outputs = {}, []
    for batch_seqs, num_prefills, done in steps:
        slots, ctx, qlens, tables = [], [], [], []
        for sid, n in batch_seqs:
            c = cached.get(sid, 0)
            if not mgr.holds(sid):
                mgr.admit(sid, c + n)
            else:
                mgr.grow(sid, c + n)
            slots.append(mgr.slot(sid))
            ctx.append(c)
            qlens.append(n)
            tables.append(list(mgr.block_table(sid)))
            cached[sid] = c + n
        batch = StepBatch(slots=slots, context_lens=ctx, query_lens=qlens, block_tables=tables,
                          num_prefills=num_prefills)
        step = cache.begin_step(batch)
        T = sum(qlens)
        for layer in range(LAYERS):
            q = torch.randn(T, HQ, D, generator=g)
            k = torch.randn(T, HKV, D, generator=g)
            v = torch.randn(T, HKV, D, generator=g)
            outputs.append(cache.attend(layer, q, k, v, step, D ** -0.5).clone())
        for sid in done:
            cache.free_slot(mgr.free(sid))
    return outputs, cache


@pytest.mark.parametrize("backend, extra", [("vattention", {}), ("vattention", {"async_mapping": False}),
                                            ("paged", {}), ("paged", {"block_size": 7})])
def test_backend_matches_contiguous(backend, extra):
    steps = script()
    ref, _ = run("contiguous", spec(), steps)
    got, cache = run(backend, spec(**extra), steps)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() <= 1e-4
    cache.close()


def test_vattention_layout_matches_extension_pool():
    sp = spec(kv_cache_memory=3 << 20)
    num_blocks, block_size, slots = kv_backend_class("vattention").layout(sp)
    cache = kv_backend_class("vattention")(sp)
    st = cache.cache.stats()
    assert st["blocks_total"] == num_blocks
    assert block_size == 4096 // (HKV * D * 4)
    assert slots == sp.max_num_seqs
    s = cache.stats()
    assert s["kv_bytes_total"] == num_blocks * 2 * LAYERS * 4096
    assert s["kv_bytes_committed"] == 0


def test_vattention_memory_follows_sequences():
    steps = script(seed=3, steps=10)
    _, cache = run("vattention", spec(async_mapping=False), steps)
    st = cache.stats()
    # Committed bytes as the kernel reports them equal what the allocator mapped.
    assert st["kv_bytes_committed"] == st["kv_bytes_mapped"] > 0
    assert st["kv_bytes_committed"] < st["kv_bytes_total"]


def test_vattention_default_page_size_and_bad_budgets():
    cls = kv_backend_class("vattention")
    num_blocks, block_size, _ = cls.layout(spec(page_size=None, kv_cache_memory=64 << 20))
    assert block_size >= 1 and num_blocks >= 1
    with pytest.raises(ValueError, match="less than one vAttention block"):
        cls.layout(spec(kv_cache_memory=1000))
    with pytest.raises(ValueError, match="smaller than one token"):
        cls.layout(spec(page_size=4096, head_dim=1024, num_kv_heads=2))
    with pytest.raises(ValueError, match="less than one paged block"):
        kv_backend_class("paged").layout(spec(kv_cache_memory=1000))


def test_paged_needs_block_tables():
    cache = kv_backend_class("paged")(spec())
    with pytest.raises(ValueError, match="block tables"):
        cache.begin_step(StepBatch(slots=[0], context_lens=[0], query_lens=[3]))
