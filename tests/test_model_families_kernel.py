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
