"""The C++ attention kernel against torch SDPA: decode-only, prefill-only and mixed
batches, GQA ratios 1/3/4, lengths 1, 15, 16, 17, 1000 and 4097 (fp32: max abs error
<= 1e-4), on plain tensors and on a vAttention cache."""
import pytest
import torch

import vattention_ext as va
from vattention_ext.kernel import attention, attention_reference

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
