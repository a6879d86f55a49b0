"""The C++ attention kernel's sliding window and score soft-cap (Mistral, Qwen, Gemma, Phi-3)
against the torch reference, and a token's output bit for bit the same whatever its batch."""
import pytest
import torch

from vattention_ext.kernel import attention, attention_reference


def caches(slots, max_ctx, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, max_ctx, hkv, d, generator=g), torch.randn(slots, max_ctx, hkv, d, generator=g))


def dense_reference(q, k, v, window, softcap, scale):
    """One sequence from position 0, written out with explicit masks: the oracle's oracle."""
    n, hq, _ = q.shape
    kr, vr = (x.repeat_interleave(hq // k.shape[1], 1) for x in (k[:n], v[:n]))
    s = torch.einsum("qhd,khd->hqk", q, kr) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), vr)


@pytest.mark.parametrize("d, ratio", [(64, 2), (32, 4), (40, 3)])  # blocked kernel, blocked tail, one-row kernel
@pytest.mark.parametrize("window, softcap", [(5, 0.0), (16, 0.0), (130, 0.0), (0, 2.0), (16, 3.0)])
def test_window_and_softcap_match_reference(d, ratio, window, softcap):
    hkv, n = 2, 300
    kc, vc = caches(2, n, hkv, d, seed=3)
    q = torch.randn(n, hkv * ratio, d)
    scale = d ** -0.5
    want = dense_reference(q, kc[1], vc[1], window, softcap, scale)
    ref = attention_reference(q, kc, vc, [1], [0], [n], scale, window, softcap)
    assert (ref - want).abs().max().item() < 1e-5
    # prefill chunks and decodes of two sequences in one batch
    out = attention(torch.cat([q[:150], q[200:201], q[150:200]]), kc, vc, [1, 1, 0], [0, 200, 150],
                    [150, 1, 50], scale, window=window, softcap=softcap)
    assert (out[:150] - want[:150]).abs().max().item() < 1e-4
    assert (out[150:151] - want[200:201]).abs().max().item() < 1e-4
    other = dense_reference(q[:200], kc[0], vc[0], window, softcap, scale)[150:200]
    assert (out[151:] - other).abs().max().item() < 1e-4


@pytest.mark.parametrize("d", [64, 40])
def test_window_same_bits_whatever_the_batch(d):
    hkv, ratio, n, window = 2, 3, 300, 37
    kc, vc = caches(2, n + 8, hkv, d, seed=7)
    q = torch.randn(n, hkv * ratio, d)
    scale = d ** -0.5
    whole = attention(q, kc, vc, [1], [0], [n], scale, window=window, softcap=4.0)
    for cuts in ([0, 20, 37, 38, 200, n], [0, 1, 129, 256, n]):
        for a, b in zip(cuts, cuts[1:]):
            other = torch.randn(5, hkv * ratio, d)
            out = attention(torch.cat([q[a:b], other]), kc, vc, [1, 0], [a, 100], [b - a, 5], scale,
                            window=window, softcap=4.0)[:b - a]
            assert torch.equal(out, whole[a:b]), (cuts, a, b)
    for t in (0, 36, 37, 38, 299):
        assert torch.equal(attention(q[t:t + 1], kc, vc, [1], [t], [1], scale, window=window, softcap=4.0),
                           whole[t:t + 1]), t


def test_bad_window_and_softcap_are_refused():
    kc, vc = caches(1, 8, 1, 16)
    q = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="window"):
        attention(q, kc, vc, [0], [0], [1], 1.0, window=-1)
    with pytest.raises(ValueError, match="softcap"):
        attention(q, kc, vc, [0], [0], [1], 1.0, softcap=float("inf"))


def test_release_front_returns_pages_to_the_pool():
    """The native cache's own accounting: pages behind the window leave the slot and its
    blocks go back to the pool (a pinned one stays until unpinned); nothing else changes."""
    import vattention_ext

    c = vattention_ext.KVCache(2, 1, 16, 2, 512, dtype="float32", page_size=4096, kv_cache_memory=4096 * 4 * 16)
    assert c.tokens_per_page == 64
    c.step([300, 100])
    c.k_cache(1)[0, 299] = 7.0
    mapped = c.stats()["pages_mapped"]
    pinned = c.pin(0, 1)
    c.release_front(0, 3)
    st = c.stats()
    assert st["pages_released"] == 3 * 4 and st["pages_mapped"] == mapped - 2 * 4  # the pinned block stays
    assert c.slot_blocks(0)[:3] == [-1, -1, -1] and bool((c.k_cache(1)[0, 299] == 7.0).all())
    c.check_invariants()
    with pytest.raises(ValueError, match="no live tokens"):
        c.pin(0, 2)
    with pytest.raises(ValueError, match="cannot release"):
        c.release_front(0, 6)
    c.step([400, 100])  # grows past the holes
    c.unpin(pinned)
    assert c.stats()["pages_mapped"] == mapped - 3 * 4 + 2 * 4
    c.free_slot(0)  # a slot with holes gives back every page at once
    assert c.stats()["pages_released"] == 0 and c.slot_blocks(0) == []
    c.check_invariants()


def test_kv_manager_slides_blocks_out():
    from sarathi.core.kv_manager import RELEASED, KVManager, ReleaseFront

    kv = KVManager(16, 4, 2, enable_prefix_caching=True, window=6)
    tokens = list(range(100, 130))
    kv.admit(1, 30)
    kv.take_ops()
    kv.cache_blocks(1, tokens, 30)
    kv.slide(1, 30)  # the next query (position 30) reads 25..30: blocks 0..5 (tokens 0..23) are behind
    assert kv.block_table(1)[:6] == [RELEASED] * 6 and RELEASED not in kv.block_table(1)[6:]
    assert [op for op in kv.take_ops() if isinstance(op, ReleaseFront)] == [ReleaseFront(0, 6)]
    assert kv.num_free_blocks == 16 - 2  # released blocks stay cached, but count as free
    kv.slide(1, 31)  # nothing new behind
    assert not kv.take_ops()
    kv.check_invariants()
    hit = kv.match(2, tokens[:20])  # a later request still finds the cached prefix
    assert hit.num_cached_tokens == 19
    kv.free(1)
    kv.check_invariants()
    assert kv.num_free_blocks == 16
