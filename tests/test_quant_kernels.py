"""Quantized linear kernels (sarathi.model_executor.quantization.kernels) against the
dequantised float reference, on every ISA path this CPU has, every weight format, odd
shapes, thread counts, and bad inputs.

The error bound tested (derived in kernels.py's docstring): activations are rounded per
block to d * int8 with d = max|x| / 127, so each x moves by at most d / 2 and

    |y - x @ W.T| <= sum_b (max_{k in b} |x_k| / 254) * sum_{k in b} |W[n, k]|  + fp32 rounding.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

kernels = pytest.importorskip("sarathi.model_executor.quantization.kernels")

ISAS = kernels.available_isas()
FORMATS = [(bits, has_min, block) for bits in (4, 8) for has_min in (False, True) for block in (32, 16)]
MS = (1, 7, 32, 64)
NS = (1, 3, 100)
KS = (32, 96, 100, 576)
EPS32 = 2.0 ** -24


def make_weight(N, K, bits, has_min, block, gen, half=False):
    nb = -(-K // block)
    if bits == 4:
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    else:
        q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    scale = torch.rand(N, nb, generator=gen) * 0.02 + 0.001
    mn = torch.randn(N, nb, generator=gen) * 0.05 if has_min else None
    if half:  # GGUF-style: every scale / min is an fp16 number
        scale = scale.half().float()
        mn = None if mn is None else mn.half().float()
    return q, scale, mn


def block_amax(x, block):
    M, K = x.shape
    nb = -(-K // block)
    xp = torch.zeros(M, nb * block, dtype=torch.float64)
    xp[:, :K] = x.double().abs()
    return xp.view(M, nb, block).amax(dim=2)  # [M, nb]


def block_abs_sum(w, block):
    N, K = w.shape
    nb = -(-K // block)
    wp = torch.zeros(N, nb * block, dtype=torch.float64)
    wp[:, :K] = w.double().abs()
    return wp.view(N, nb, block).sum(dim=2)  # [N, nb]


def bounds(x, q, scale, mn, block):
    """(quantization bound, fp32 rounding bound), each [M, N] float64."""
    K = x.shape[1]
    nb = scale.shape[1]
    s = scale.double().repeat_interleave(block, dim=1)[:, :K]
    w_abs = (s * q.double()).abs()
    if mn is not None:
        w_abs = w_abs + mn.double().abs().repeat_interleave(block, dim=1)[:, :K]
    w = s * q.double() + (0 if mn is None else mn.double().repeat_interleave(block, dim=1)[:, :K])
    amax = block_amax(x, block)
    quant = (amax / 254.0) @ block_abs_sum(w, block).T
    rounding = (nb + 8) * EPS32 * (amax * (1 + 1 / 254)) @ block_abs_sum(w_abs, block).T
    return quant, rounding


def reference(x, wq, q, scale, mn, block, bias=None, exact=False):
    """(x @ W.T (+ bias) in float64, the allowed |error| per output)."""
    ref = x.double() @ wq.dequantize().double().T
    if bias is not None:
        ref = ref + bias.double()
    quant, rounding = bounds(x, q, scale, mn, block)
    tol = rounding + 1e-30 + (0 if exact else quant)
    if bias is not None:
        tol = tol + 2 * EPS32 * ref.abs()
    return ref, tol


def within(y, ref_tol):
    ref, tol = ref_tol
    err = (y.double() - ref).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds bound by x{worst:.3g}"
    return worst


def check(y, x, wq, q, scale, mn, block, bias=None, exact=False):
    return within(y, reference(x, wq, q, scale, mn, block, bias, exact))


@pytest.mark.parametrize("bits,has_min,block", FORMATS)
def test_formats_shapes_isas(bits, has_min, block):
    gen = torch.Generator().manual_seed(bits * 100 + has_min * 10 + block)
    for N in NS:
        for K in KS:
            q, scale, mn = make_weight(N, K, bits, has_min, block, gen, half=(N == 3))
            wq = kernels.pack(q, scale, mn, bits, block)
            assert (wq.out_features, wq.in_features, wq.bits, wq.block, wq.has_min) == (N, K, bits, block, has_min)
            assert wq.half_scales == (N == 3)
            W = scale.repeat_interleave(block, 1)[:, :K] * q.float()
            if mn is not None:
                W = W + mn.repeat_interleave(block, 1)[:, :K]
            assert torch.equal(wq.dequantize(), W)
            for M in MS:
                x = torch.randn(M, K, generator=gen)
                rt = reference(x, wq, q, scale, mn, block)
                ys = {}
                for isa in ISAS:
                    for threads in (1, 2):
                        y = kernels.qlinear(x, wq, num_threads=threads, isa=isa)
                        assert y.shape == (M, N) and y.dtype == torch.float32
                        within(y, rt)
                        ys[isa, threads] = y
                for isa in ISAS:  # each output is computed by one thread in a fixed order
                    assert torch.equal(ys[isa, 1], ys[isa, 2])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,has_min,block", FORMATS)
def test_exactly_representable_activations(isa, bits, has_min, block):
    """x = d_b * integers with a power-of-two d_b and max |integer| = 127 per block: the int8
    quantization is lossless, so only fp32 rounding separates the result from x @ W.T."""
    gen = torch.Generator().manual_seed(7)
    for M, N, K in ((1, 100, 576), (7, 37, 100), (64, 48, 96)):
        q, scale, mn = make_weight(N, K, bits, has_min, block, gen)
        wq = kernels.pack(q, scale, mn, bits, block)
        nb = -(-K // block)
        ints = torch.randint(-127, 128, (M, nb * block), generator=gen).double()
        # Each block's first element (inside K even for a partial last block) is +-127.
        ints.view(M, nb, block)[:, :, 0] = torch.where(torch.rand(M, nb, generator=gen) < 0.5, -127.0, 127.0).double()
        d = 2.0 ** torch.randint(-12, 2, (M, nb), generator=gen).double()
        x = (ints.view(M, nb, block) * d[:, :, None]).view(M, -1)[:, :K].float()
        assert torch.equal(x.double(), (ints.view(M, nb, block) * d[:, :, None]).view(M, -1)[:, :K])
        y = kernels.qlinear(x, wq, isa=isa)
        check(y, x, wq, q, scale, mn, block, exact=True)


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 21), N=st.integers(1, 40), K=st.integers(1, 300), fmt=st.sampled_from(FORMATS),
       isa=st.sampled_from(ISAS), threads=st.integers(1, 3), half=st.booleans(), seed=st.integers(0, 2**31))
def test_fuzz_random_shapes(M, N, K, fmt, isa, threads, half, seed):
    bits, has_min, block = fmt
    gen = torch.Generator().manual_seed(seed)
    q, scale, mn = make_weight(N, K, bits, has_min, block, gen, half=half)
    wq = kernels.pack(q, scale, mn, bits, block)
    x = torch.randn(M, K, generator=gen) * float(torch.rand(1, generator=gen)) * 10
    y = kernels.qlinear(x, wq, num_threads=threads, isa=isa)
    check(y, x, wq, q, scale, mn, block)


def test_error_bound_is_tight_enough_to_matter():
    """The bound must be meaningful: typical errors are a sizeable fraction of it, and the
    quantized result is far closer to x @ W.T than a random perturbation of that size."""
    gen = torch.Generator().manual_seed(3)
    q, scale, mn = make_weight(256, 576, 4, True, 32, gen)
    wq = kernels.pack(q, scale, mn, 4, 32)
    x = torch.randn(16, 576, generator=gen)
    worst = check(kernels.qlinear(x, wq), x, wq, q, scale, mn, 32)
    assert 0.005 < worst <= 1.0
    ref = x.double() @ wq.dequantize().double().T
    rel = ((kernels.qlinear(x, wq).double() - ref).norm() / ref.norm()).item()
    assert rel < 0.01


@pytest.mark.parametrize("isa", ISAS)
def test_bias_out_threads_and_strides(isa):
    gen = torch.Generator().manual_seed(11)
    N, K, M = 1000, 576, 33
    for bits, has_min in ((4, True), (8, False)):
        q, scale, mn = make_weight(N, K, bits, has_min, 32, gen)
        wq = kernels.pack(q, scale, mn, bits)
        x = torch.randn(M, K, generator=gen)
        bias = torch.randn(N, generator=gen)
        y1 = kernels.qlinear(x, wq, bias, num_threads=1, isa=isa)
        check(y1, x, wq, q, scale, mn, 32, bias=bias)
        y2 = kernels.qlinear(x, wq, bias, num_threads=2, isa=isa)
        y3 = kernels.qlinear(x, wq, bias, num_threads=3, isa=isa)
        assert torch.equal(y1, y2) and torch.equal(y1, y3)
        # out=: a column slice of a wider buffer (row stride 1010), untouched around it.
        buf = torch.full((M, N + 10), 7.0)
        r = kernels.qlinear(x, wq, bias, out=buf[:, 5:5 + N], isa=isa)
        assert r.data_ptr() == buf[:, 5:].data_ptr()
        assert torch.equal(buf[:, 5:5 + N], y1)
        assert bool((buf[:, :5] == 7).all()) and bool((buf[:, 5 + N:] == 7).all())
        # Non-contiguous x: a transposed view and a column slice.
        xt = x.t().contiguous().t()
        assert not xt.is_contiguous()
        assert torch.equal(kernels.qlinear(xt, wq, bias, isa=isa), y1)
        wide = torch.randn(M, K + 64, generator=gen)
        wide[:, 32:32 + K] = x
        assert torch.equal(kernels.qlinear(wide[:, 32:32 + K], wq, bias, isa=isa), y1)
        # One row of a batch alone gives the same numbers as inside the batch.
        assert torch.equal(kernels.qlinear(x[5:6], wq, bias, isa=isa), y1[5:6])


def test_out_may_alias_x():
    gen = torch.Generator().manual_seed(5)
    q, scale, mn = make_weight(64, 64, 4, True, 32, gen)
    wq = kernels.pack(q, scale, mn, 4)
    x = torch.randn(9, 64, generator=gen)
    want = kernels.qlinear(x, wq)
    kernels.qlinear(x, wq, out=x)
    assert torch.equal(x, want)


def test_isas_agree():
    gen = torch.Generator().manual_seed(13)
    for bits, has_min, block in FORMATS:
        q, scale, mn = make_weight(70, 200, bits, has_min, block, gen)
        wq = kernels.pack(q, scale, mn, bits, block)
        x = torch.randn(13, 200, generator=gen)
        ys = [kernels.qlinear(x, wq, isa=isa).double() for isa in ISAS]
        scale_ref = (x.double().abs() @ wq.dequantize().double().abs().T)
        for y in ys[1:]:
            assert ((y - ys[0]).abs() <= 1e-5 * scale_ref + 1e-30).all()


@pytest.mark.parametrize("isa", ISAS)
def test_row_bits_do_not_depend_on_the_batch(isa):
    """Decode batches (M <= 8: one panel streamed for all rows) and larger ones (register tiles)
    give every row the same bits as computing it alone, for every format, with and without bias."""
    gen = torch.Generator().manual_seed(29)
    for bits, has_min, block in FORMATS:
        for half in (False, True):
            q, scale, mn = make_weight(83, 4 * block + 7, bits, has_min, block, gen, half=half)
            wq = kernels.pack(q, scale, mn, bits, block)
            bias = torch.randn(83, generator=gen)
            x = torch.randn(40, q.shape[1], generator=gen)
            alone = torch.cat([kernels.qlinear(x[i:i + 1], wq, bias, isa=isa) for i in range(40)])
            for M in (2, 3, 5, 8, 9, 13, 40):
                for threads in (1, 2):
                    assert torch.equal(kernels.qlinear(x[:M], wq, bias, num_threads=threads, isa=isa), alone[:M]), \
                        (bits, has_min, block, half, M, threads)


def test_q4_0_min_is_implied_not_stored():
    """A 4-bit weight whose min is exactly -8 x scale (GGUF Q4_0) streams no mins (4.5 bits per weight at
    fp16 scales instead of 5) and gives the bits of the same weight with its mins stored."""
    gen = torch.Generator().manual_seed(31)
    N, K = 70, 200
    for block in (32, 16):
        for half in (True, False):
            q, scale, _ = make_weight(N, K, 4, False, block, gen, half=half)
            wq = kernels.pack(q, scale, scale * -8.0, 4, block)
            assert wq.implied_min and wq.has_min and wq.half_scales == half
            nb, P = -(-K // block), -(-N // 16)
            assert wq.nbytes() == P * nb * (16 * block // 2 + 16 * (2 if half else 4))
            q2, s2, m2 = wq.unpack()
            assert torch.equal(q2, q) and torch.equal(s2, scale) and torch.equal(m2, scale * -8.0)
            # The same weight with the mins stored in each record (the layout before implied mins).
            sb = 2 if half else 4
            qb = 16 * block // 2
            d = wq.data
            mins = (d[:, :, qb:qb + 16 * sb].contiguous().view(torch.float16 if half else torch.float32) * -8.0)
            stored = kernels.PackedWeight(torch.cat([d, mins.view(torch.uint8)], dim=2).contiguous(), 4, block, N, K,
                                          True, half)
            assert not stored.int_min and stored.min_kind == 0
            assert torch.equal(stored.dequantize(), wq.dequantize())
            bias = torch.randn(N, generator=gen)
            for M in (1, 5, 40):
                x = torch.randn(M, K, generator=gen)
                for isa in ISAS:
                    assert torch.equal(kernels.qlinear(x, wq, bias, isa=isa), kernels.qlinear(x, stored, bias, isa=isa))
    q, scale, _ = make_weight(8, 64, 8, False, 32, gen)
    assert not kernels.pack(q, scale, scale * -8.0, 8, 32).implied_min  # bits 8: an ordinary stored min


def _with_float_mins(wq, scale, mn):
    """The same weight as a PackedWeight with fp32 scales and its mins stored as fp32 (the layout
    without implied or int8 mins)."""
    qb = 16 * wq.block * wq.bits // 8
    P, nb, _ = wq.data.shape
    parts = [wq.data[:, :, :qb]]
    for t in (scale, mn):
        pad = torch.zeros(P * 16, nb)
        pad[:wq.out_features] = t
        parts.append(pad.view(P, 16, nb).permute(0, 2, 1).contiguous().view(torch.uint8))
    data = torch.cat(parts, dim=2).contiguous()
    return kernels.PackedWeight(data, wq.bits, wq.block, wq.out_features, wq.in_features, True, False)


def test_zero_point_mins_stream_as_int8():
    """GPTQ / AWQ mins, -(scale x integer zero point), are stored as one int8 per column and block
    (8-bit g32 at fp16 scales: 8.75 bits per weight instead of 10 with fp32 mins) and give the bits of
    the same weight with float mins; mins that are not such multiples stay floats."""
    gen = torch.Generator().manual_seed(37)
    N, K = 70, 200
    for bits in (4, 8):
        for block in (32, 16):
            for half in (True, False):
                q, scale, _ = make_weight(N, K, bits, False, block, gen, half=half)
                zmax = 15 if bits == 4 else 127
                zero = torch.randint(-128 if bits == 8 else 0, zmax + 1, scale.shape, generator=gen).float()
                mn = -(scale * zero)
                wq = kernels.pack(q, scale, mn, bits, block)
                assert wq.int_min and wq.min_kind == 2 and wq.half_scales == half
                nb, P = -(-K // block), -(-N // 16)
                assert wq.nbytes() == P * nb * (16 * block * bits // 8 + 16 * (2 if half else 4) + 16)
                q2, s2, m2 = wq.unpack()
                assert torch.equal(q2, q) and torch.equal(s2, scale) and torch.equal(m2, mn)
                stored = _with_float_mins(wq, scale, mn)
                assert torch.equal(stored.dequantize(), wq.dequantize())
                bias = torch.randn(N, generator=gen)
                for M in (1, 5, 40):
                    x = torch.randn(M, K, generator=gen)
                    for isa in ISAS:
                        assert torch.equal(kernels.qlinear(x, wq, bias, isa=isa),
                                           kernels.qlinear(x, stored, bias, isa=isa)), (bits, block, half, M, isa)
    q, scale, mn = make_weight(N, K, 4, True, 32, gen)
    assert not kernels.pack(q, scale, mn, 4, 32).int_min  # arbitrary float mins


def test_nonfinite_and_degenerate_activations():
    gen = torch.Generator().manual_seed(17)
    q, scale, mn = make_weight(20, 100, 8, False, 32, gen)
    wq = kernels.pack(q, scale, mn, 8)
    x = torch.randn(4, 100, generator=gen)
    x[1, 50] = float("nan")
    x[2, 99] = float("inf")
    x[3] = 0.0
    for isa in ISAS:
        y = kernels.qlinear(x, wq, isa=isa)
        assert bool(torch.isnan(y[1]).all()) and bool(torch.isnan(y[2]).all())
        assert bool(torch.isfinite(y[0]).all()) and bool((y[3] == 0).all())
    assert kernels.qlinear(torch.empty(0, 100), wq).shape == (0, 20)


def test_pickle_and_unpack_roundtrip():
    gen = torch.Generator().manual_seed(19)
    for bits, has_min, block in FORMATS:
        q, scale, mn = make_weight(33, 70, bits, has_min, block, gen)
        wq = kernels.pack(q, scale, mn, bits, block)
        q2, s2, m2 = wq.unpack()
        assert torch.equal(q2, q) and torch.equal(s2, scale)
        assert (m2 is None) == (mn is None) and (mn is None or torch.equal(m2, mn))
        w2 = pickle.loads(pickle.dumps(wq))
        x = torch.randn(3, 70, generator=gen)
        assert torch.equal(kernels.qlinear(x, w2), kernels.qlinear(x, wq))
        assert wq.nbytes() == wq.data.numel() > 0


def test_nbytes_matches_the_format():
    q, scale, mn = make_weight(576, 576, 4, True, 32, torch.Generator().manual_seed(0), half=True)
    wq = kernels.pack(q, scale, mn, 4)
    assert wq.half_scales and wq.nbytes() == 576 * 576 // 2 + 576 * 18 * 4  # Q4_1 size: 5 bits / weight
    wq = kernels.pack(q, scale + 1e-7, mn, 4)
    assert not wq.half_scales and wq.nbytes() == 576 * 576 // 2 + 576 * 18 * 8


def test_bad_inputs():
    gen = torch.Generator().manual_seed(23)
    q4, s, m = make_weight(8, 64, 4, True, 32, gen)
    q8 = torch.randint(-128, 128, (8, 64), dtype=torch.int8, generator=gen)
    bad_pack = [
        dict(q=q4, scale=s, min=m, bits=3),
        dict(q=q4, scale=s, min=m, bits=4, block=64),
        dict(q=q4.float(), scale=s, min=m, bits=4),
        dict(q=q8, scale=s, min=m, bits=4),                          # int8 for bits 4
        dict(q=q4, scale=s, min=m, bits=8),                          # uint8 for bits 8
        dict(q=q4 + 1, scale=s, min=m, bits=4) if int(q4.max()) == 15 else dict(q=q4 * 0 + 16, scale=s, min=m, bits=4),
        dict(q=q4, scale=s[:, :1], min=m, bits=4),
        dict(q=q4, scale=s.double(), min=m, bits=4),
        dict(q=q4, scale=s, min=m[:4], bits=4),
        dict(q=q4, scale=s * float("nan"), min=m, bits=4),
        dict(q=q4, scale=s, min=m * float("inf"), bits=4),
        dict(q=q4[0], scale=s, min=m, bits=4),
        dict(q=q4[:, :0], scale=s[:, :0], min=None, bits=4),
        dict(q=q4.numpy(), scale=s, min=m, bits=4),
    ]
    for kw in bad_pack:
        with pytest.raises(ValueError):
            kernels.pack(**kw)
    wq = kernels.pack(q4, s, m, 4)
    x = torch.randn(3, 64)
    bad_call = [
        dict(x=x.double()), dict(x=x[:, :32]), dict(x=x[None]), dict(x=x.to(torch.bfloat16)),
        dict(x=x, bias=torch.zeros(7)), dict(x=x, bias=torch.zeros(8, dtype=torch.float64)),
        dict(x=x, out=torch.empty(3, 9)), dict(x=x, out=torch.empty(3, 8, dtype=torch.float64)),
        dict(x=x, out=torch.empty(8, 3).t()), dict(x=x, isa="sse9"), dict(x="x"),
    ]
    for kw in bad_call:
        with pytest.raises(ValueError):
            kernels.qlinear(w=wq, **kw)
    with pytest.raises(ValueError):
        kernels.qlinear(x, q4)
    broken = pickle.loads(pickle.dumps(wq))
    broken.data = broken.data[:-1].contiguous()  # one panel short: the native size check
    with pytest.raises(ValueError, match="bytes"):
        kernels.qlinear(x, broken)
    broken.data = wq.data.view(-1)[:-5].view(1, -1)
    with pytest.raises(ValueError):
        kernels.qlinear(x, broken)


def test_isa_environment_variable(monkeypatch):
    """SARATHI_QUANT_ISA caps the path (read at every call); an unknown name is a ValueError."""
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    w = kernels.pack(q, torch.rand(16, 2), None, 4)
    x = torch.randn(2, 64)
    want = kernels.qlinear(x, w, isa=ISAS[0])
    for isa in ISAS:
        monkeypatch.setenv("SARATHI_QUANT_ISA", isa)
        assert kernels.kernel_isa() == isa
        y = kernels.qlinear(x, w)
        assert ((y - want).abs() <= 1e-5 * (y.abs() + 1)).all()
    monkeypatch.setenv("SARATHI_QUANT_ISA", "sse9")
    with pytest.raises(ValueError, match="sse9"):
        kernels.kernel_isa()
    with pytest.raises(ValueError, match="sse9"):
        kernels.qlinear(x, w)
    monkeypatch.delenv("SARATHI_QUANT_ISA")
    assert kernels.kernel_isa() == ISAS[-1]


def test_isa_environment_variable_in_a_fresh_process():
    env = dict(os.environ, SARATHI_QUANT_ISA="scalar")
    code = "from sarathi.model_executor.quantization import kernels as k; print(k.kernel_isa())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "scalar"


def test_int8_peak_is_measured():
    for isa in ISAS:
        assert kernels.int8_peak_gops(isa, 0.02) > 0
