"""The C++ attention kernel against torch SDPA: decode-only, prefill-only and mixed
batches, GQA ratios 1/3/4 (and 5/16/48 on the blocked path), lengths 1, 15, 16, 17,
1000 and 4097 (fp32: max abs error <= 1e-4), on plain tensors and on a vAttention cache; a
token's output bit for bit the same whatever its batch; AttentionPlan rejecting bad input."""
import pytest
import torch

import vattention_ext as va
from vattention_ext.kernel import AttentionPlan, attention, attention_reference

LENGTHS = [1, 15, 16, 17, 1000, 4097]


def caches(slots, max_ctx, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, max_ctx, hkv, d, generator=g, dtype=dtype),
            torch.randn(slots, max_ctx, hkv, d, generator=g, dtype=dtype))


def check(q, kc, vc, slots, ctx, qlens, scale, k_new=None, v_new=None):
    out = attention(q, kc, vc, slots, ctx, qlens, scale, k_new=k_new, v_new=v_new)
    ref = attention_reference(q, kc, vc, slots, ctx, qlens, scale)
    err = (out - ref).abs().max().item()
    assert err <= 1e-4, f"max abs error {err}"
    return out


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("length", LENGTHS)
def test_decode_only(ratio, length):
    hkv, d = 2, 64
    kc, vc = caches(4, 4100, hkv, d)
    slots = [2, 0, 3]
    ctx = [length - 1, max(0, length - 2), length // 2]
    q = torch.randn(3, hkv * ratio, d)
    check(q, kc, vc, slots, ctx, [1, 1, 1], d ** -0.5)


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 1000])
def test_prefill_only(ratio, length):
    hkv, d = 1, 32
    kc, vc = caches(3, 1100, hkv, d, seed=1)
    qlens = [length, 17]
    ctx = [0, 40]  # the second is a later chunk of a longer prompt
    q = torch.randn(sum(qlens), hkv * ratio, d)
    check(q, kc, vc, [1, 2], ctx, qlens, 0.17)


def test_prefill_4097_tokens():
    hkv, d = 1, 32
    kc, vc = caches(1, 4097, hkv, d, seed=2)
    q = torch.randn(4097, 4, d)
    check(q, kc, vc, [0], [0], [4097], d ** -0.5)


@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_mixed_batch_with_new_kv_stored(ratio):
    hkv, d = 3, 64
    kc, vc = caches(6, 4200, hkv, d, seed=3)
    # prefill chunks first (one from scratch, one continuing), then decodes
    slots, ctx, qlens = [4, 1, 0, 5, 2], [0, 1000, 4096, 16, 15], [16, 17, 1, 1, 1]
    T = sum(qlens)
    q = torch.randn(T, hkv * ratio, d)
    k_new, v_new = torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    check(q, kc, vc, slots, ctx, qlens, d ** -0.5, k_new, v_new)
    start = 0
    for s, c, n in zip(slots, ctx, qlens):
        assert torch.equal(kc[s, c:c + n], k_new[start:start + n])
        assert torch.equal(vc[s, c:c + n], v_new[start:start + n])
        start += n


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [1, 3, 5, 16, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_row_prefill_path(d, ratio, dtype):
    """Prefill rows go through the blocked kernel several at a time (causal limits per row):
    chunks of 2, 5, 16, 17 and 300 rows, from scratch and after 130 cached keys (a key block
    boundary inside the chunk), and a decode."""
    hkv = 2
    kc, vc = caches(6, 520, hkv, d, dtype=dtype, seed=6)
    slots, ctx, qlens = [0, 1, 2, 3, 4, 5], [0, 130, 7, 130, 0, 200], [2, 5, 16, 17, 300, 1]
    q = torch.randn(sum(qlens), hkv * ratio, d).to(dtype)
    out = attention(q, kc, vc, slots, ctx, qlens, d ** -0.5)
    ref = attention_reference(q.float(), kc.float(), vc.float(), slots, ctx, qlens, d ** -0.5)
    err = (out.float() - ref).abs().max().item()
    assert err <= (1e-4 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("d, ratio", [(64, 3), (128, 1), (64, 7), (32, 16), (40, 2), (24, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_whatever_the_batch(d, ratio, dtype):
    """A token's output is bit for bit the same whether it is computed in one long prefill
    chunk, in chunks split anywhere (inside a key block, across one), as a decode alone or
    next to other sequences: the engine's greedy text must not depend on chunking, prefix
    cache hits or what else is running. Head sizes 24 and 40 take the blocked kernel's
    8-element tail and the one-row kernel."""
    hkv, n = 2, 300
    kc, vc = caches(3, n + 8, hkv, d, dtype=dtype, seed=11)
    q = torch.randn(n, hkv * ratio, d).to(dtype)
    scale = d ** -0.5
    whole = attention(q, kc, vc, [1], [0], [n], scale)
    for cuts in ([0, 100, 177, 178, 179, n], [0, 1, 2, 129, 256, n], [0, 5, 261, n]):
        for a, b in zip(cuts, cuts[1:]):
            # the same sequence's chunk next to another sequence's chunk and a decode
            other = torch.randn(7 + 1, hkv * ratio, d).to(dtype)
            qq = torch.cat([q[a:b], other]) if b - a > 1 else torch.cat([other[:7], other[7:], q[a:b]])
            if b - a > 1:
                out = attention(qq, kc, vc, [1, 0, 2], [a, 33, 250], [b - a, 7, 1], scale)[:b - a]
            else:
                out = attention(qq, kc, vc, [0, 2, 1], [33, 250, a], [7, 1, 1], scale)[8:]
            assert torch.equal(out, whole[a:b]), (cuts, a, b)
    for t in (0, 1, 127, 128, 129, 299):  # every row as a decode alone
        assert torch.equal(attention(q[t:t + 1], kc, vc, [1], [t], [1], scale), whole[t:t + 1]), t


def test_odd_head_dim_runtime_path():
    kc, vc = caches(2, 300, 2, 40, seed=4)
    q = torch.randn(21, 6, 40)
    check(q, kc, vc, [1, 0], [100, 250], [20, 1], 0.2)


def test_bfloat16():
    kc, vc = caches(2, 600, 3, 64, dtype=torch.bfloat16, seed=5)
    q = torch.randn(18, 9, 64).bfloat16()
    out = attention(q, kc, vc, [0, 1], [500, 100], [17, 1], 0.125)
    ref = attention_reference(q.float(), kc.float(), vc.float(), [0, 1], [500, 100], [17, 1], 0.125)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 2e-2  # bf16 output rounding


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_half_cache_under_float32_queries(kv_dtype):
    """--kv-cache-dtype: float32 queries over a float16 / bfloat16 cache. New keys and values are
    stored rounded as torch rounds them, attention equals the reference over those values, a
    token's bits do not depend on its batch, and mismatched tensors are refused."""
    g = torch.Generator().manual_seed(3)
    kc = torch.randn(3, 300, 2, 64, generator=g).to(kv_dtype)
    vc = torch.randn(3, 300, 2, 64, generator=g).to(kv_dtype)
    slots, ctx, qlens = [1, 0, 2], [0, 130, 250], [40, 1, 1]
    q = torch.randn(42, 6, 64, generator=g)
    kn, vn = torch.randn(42, 2, 64, generator=g) * 300, torch.randn(42, 2, 64, generator=g) * 1e-6
    out = attention(q, kc, vc, slots, ctx, qlens, 0.125, k_new=kn, v_new=vn)
    assert out.dtype == torch.float32
    assert torch.equal(kc[1, :40], kn[:40].to(kv_dtype)) and torch.equal(vc[2, 250], vn[41].to(kv_dtype))
    ref = attention_reference(q, kc, vc, slots, ctx, qlens, 0.125)
    assert (out - ref).abs().max().item() < 1e-4
    alone = attention(q[40:41], kc, vc, [0], [130], [1], 0.125)   # the decode alone: the same bits
    assert torch.equal(alone, out[40:41])
    plan = AttentionPlan(kc, [0], [5], [1], q_dtype=torch.float32)
    with pytest.raises(ValueError, match="k_new"):
        plan.run(q[:1], kn[:1].to(kv_dtype), vn[:1].to(kv_dtype), kc, vc, 0.125)   # new K/V come in q's type
    with pytest.raises(ValueError, match="v_cache"):
        plan.run(q[:1], kn[:1], vn[:1], kc, vc.float(), 0.125)
    with pytest.raises(ValueError, match="not supported"):
        AttentionPlan(kc, [0], [5], [1], q_dtype=torch.bfloat16 if kv_dtype == torch.float16 else torch.float16)


def test_over_vattention_cache():
    cache = va.KVCache(1, 3, 64, 4, 2048, page_size=4096 * 3, kv_cache_memory=64 << 20)
    slots, ctx, qlens = [3, 1], [0, 1500], [33, 1]
    lens = [0] * 4
    for s, c, n in zip(slots, ctx, qlens):
        lens[s] = c + n
    cache.step(lens)
    kc, vc = cache.k_cache(0), cache.v_cache(0)
    kc[1, :1500] = torch.randn(1500, 3, 64)
    vc[1, :1500] = torch.randn(1500, 3, 64)
    q = torch.randn(34, 9, 64)
    check(q, kc, vc, slots, ctx, qlens, 0.125, torch.randn(34, 3, 64), torch.randn(34, 3, 64))


def test_bad_input_raises():
    kc, vc = caches(2, 64, 2, 16)
    q = torch.randn(3, 4, 16)
    with pytest.raises(ValueError, match="sum to 4 but q has 3"):
        attention(q, kc, vc, [0], [0], [4], 1.0)
    with pytest.raises(ValueError, match="slot 2 outside"):
        attention(q, kc, vc, [2], [0], [3], 1.0)
    with pytest.raises(ValueError, match="exceeds the cache's max context"):
        attention(q, kc, vc, [0], [62], [3], 1.0)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        attention(torch.randn(3, 3, 16), kc, vc, [0], [0], [3], 1.0)
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        attention(q.double(), kc, vc, [0], [0], [3], 1.0)
    with pytest.raises(ValueError, match="head_dim must match"):
        attention(torch.randn(3, 4, 8), kc, vc, [0], [0], [3], 1.0)
    with pytest.raises(ValueError, match="same length"):
        attention(q, kc, vc, [0, 1], [0], [3], 1.0)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        attention(q, kc, vc, [0], [0], [3], 1.0, k_new=torch.randn(3, 2, 16))


def test_plan_built_once_runs_every_layer():
    """One plan per step from layer 0's cache, run over several layers' caches."""
    hkv, d, layers = 2, 64, 3
    ks, vs = zip(*(caches(3, 300, hkv, d, seed=10 + i) for i in range(layers)))
    slots, ctx, qlens = [2, 0], [100, 250], [20, 1]
    plan = AttentionPlan(ks[0], slots, ctx, qlens)
    assert plan.num_tokens == 21 and plan.num_seqs == 2
    for layer in range(layers):
        q = torch.randn(21, 6, d)
        k_new, v_new = torch.randn(21, hkv, d), torch.randn(21, hkv, d)
        out = torch.empty_like(q)
        assert plan.run(q, k_new, v_new, ks[layer], vs[layer], 0.2, out=out) is out
        assert torch.equal(ks[layer][2, 100:120], k_new[:20])
        ref = attention_reference(q, ks[layer], vs[layer], slots, ctx, qlens, 0.2)
        assert (out - ref).abs().max().item() <= 1e-4


def test_plan_accepts_index_tensors_and_empty_batch():
    kc, vc = caches(2, 64, 2, 16)
    plan = AttentionPlan(kc, torch.tensor([1]), torch.tensor([3]), torch.tensor([2]))
    q = torch.randn(2, 4, 16)
    check(q, kc, vc, [1], [3], [2], 0.3)
    assert plan.run(q, None, None, kc, vc, 0.3).shape == q.shape
    empty = AttentionPlan(kc, [], [], [])
    assert empty.run(torch.empty(0, 4, 16), None, None, kc, vc, 1.0).shape == (0, 4, 16)


@pytest.mark.parametrize("slots, ctx, qlens, exc, message", [
    ([2], [0], [1], ValueError, "slot 2 outside"),
    ([-1], [0], [1], ValueError, "slot -1 outside"),
    ([0], [-1], [1], ValueError, "context_len must be >= 0"),
    ([0], [0], [0], ValueError, "query_len >= 1"),
    ([0], [0], [-5], ValueError, "query_len >= 1"),
    ([0], [2 ** 63 - 1], [1], ValueError, "exceeds the cache's max context"),  # c + n would wrap
    ([0], [1], [2 ** 63 - 1], ValueError, "exceeds the cache's max context"),
    ([0], [64], [1], ValueError, "exceeds the cache's max context"),
    ([0], [2 ** 64], [1], ValueError, "fit in int64"),
    ([0, 1], [0], [1], ValueError, "same length"),
    ([0], [0], [1.5], ValueError, "list of ints"),
])
def test_plan_rejects_bad_batch(slots, ctx, qlens, exc, message):
    kc, _ = caches(2, 64, 2, 16)
    with pytest.raises(exc, match=message):
        AttentionPlan(kc, slots, ctx, qlens)


def test_native_plan_checks_sizes_without_overflow():
    """The C++ plan on its own (no tensors): sums and cache extents that overflow int64."""
    from vattention_ext import _C

    def plan(**kw):
        args = dict(num_slots=2, max_ctx=2 ** 62, num_kv_heads=1, head_dim=8, stride_slot=0, stride_token=0,
                    stride_head=0, dtype=_C.DType.F32, slots=[0, 1], context_lens=[0, 0], query_lens=[1, 1],
                    num_threads=1)
        args.update(kw)
        return _C.AttentionPlan(**args)

    assert plan().num_tokens == 2
    with pytest.raises(ValueError, match="sum of query_lens overflows"):
        plan(query_lens=[2 ** 62, 2 ** 62])
    with pytest.raises(ValueError, match="cache extent"):
        plan(stride_slot=2 ** 62, num_slots=3, slots=[0], context_lens=[0], query_lens=[1])
    with pytest.raises(ValueError, match="cache strides"):
        plan(stride_token=-1)
    with pytest.raises(ValueError, match="head_dim"):
        plan(head_dim=513)
    with pytest.raises(ValueError, match="num_threads"):
        plan(num_threads=0)
    with pytest.raises(ValueError, match="num_threads"):
        plan(num_threads=2 ** 40)
    p = plan(max_ctx=8, num_kv_heads=2, slots=[0], context_lens=[0], query_lens=[8])
    with pytest.raises(ValueError, match="num_heads must be positive"):
        p.run(0, 0, 0, 0, 0, 0, 0, 1.0)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        p.run(0, 0, 0, 0, 0, 0, 3, 1.0)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        p.run(1, 1, 0, 1, 1, 1, 2, 1.0)
    with pytest.raises(ValueError, match="null pointer"):
        p.run(0, 0, 0, 0, 0, 0, 2, 1.0)
    with pytest.raises(ValueError, match="q size overflows"):
        plan(max_ctx=2 ** 62, slots=[0], context_lens=[0], query_lens=[2 ** 61]).run(1, 0, 0, 1, 1, 1, 64, 1.0)


def test_plan_run_rejects_mismatched_tensors():
    kc, vc = caches(2, 64, 2, 16)
    plan = AttentionPlan(kc, [0, 1], [3, 0], [1, 2])
    q, kn = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    bad = [
        (dict(q=q.double()), "q must be"),
        (dict(q=torch.randn(4, 4, 16)), "query_lens sum to 3 but q has 4"),
        (dict(q=torch.randn(3, 4, 8)), "q must be"),
        (dict(q=torch.randn(3, 3, 16)), "not a multiple of num_kv_heads"),
        (dict(q=torch.randn(3, 4 * 65, 16)), "more than 64"),
        (dict(k_cache=torch.randn(3, 64, 2, 16)), "k_cache must be"),
        (dict(v_cache=torch.randn(2, 65, 2, 16)), "v_cache must be"),
        (dict(v_cache=vc.bfloat16()), "v_cache must be"),
        (dict(v_cache=torch.randn(2, 64, 16, 2).transpose(2, 3)), "v_cache must be"),  # other strides
        (dict(k_cache=torch.randn(2, 128, 2, 16)[:, :64]), "k_cache must be"),           # same shape, other strides
        (dict(k_new=torch.randn(2, 2, 16)), "k_new must be"),
        (dict(v_new=torch.randn(3, 2, 16).bfloat16()), "v_new must be"),
        (dict(v_new=None), "both k_new and v_new"),
        (dict(out=torch.empty(3, 4, 8)), "out must be"),
        (dict(out=torch.empty(4, 3, 16).transpose(0, 1)), "out must be"),
        (dict(q="not a tensor"), "q must be"),
    ]
    for change, message in bad:
        args = dict(q=q, k_new=kn, v_new=kn, k_cache=kc, v_cache=vc, scale=1.0, out=None)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            plan.run(**args)
    with pytest.raises(ValueError, match="4-D CPU tensor"):
        AttentionPlan(kc[0], [0], [0], [1])
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        AttentionPlan(kc.double(), [0], [0], [1])
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        AttentionPlan(kc.transpose(2, 3), [0], [0], [1])
