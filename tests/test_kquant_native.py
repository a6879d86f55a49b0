"""GGUF's 5- / 6-bit blocks and K-quant super-blocks in the kernels at the file's size.

Q6_K, Q4_K and Q5_K are packed with their integer sub-scales under the fp16 super-scales, Q5_0
as 5-bit blocks; the packed bytes must dequantise to exactly what the gguf package decodes, and
every kernel path (AVX-512 decode from the packed bits, the panel expansion for prefill, AVX2
and scalar) must give the same bits as the same weight loaded as int8 / 4-bit blocks (the
previous layout), on every batch size, within the activation-rounding bound of the float result.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from test_quant_formats import random_blocks
from test_quant_kernels import check

from sarathi.model_executor.layers.linear import QuantLinear
from sarathi.model_executor.quantization import formats
from sarathi.model_executor.quantization import kernels

ISAS = kernels.available_isas()
NATIVE = {"Q6_K": 6.5625, "Q5_0": 5.5, "Q4_K": 4.625, "Q5_K": 5.625}  # packed bits/weight at N % 16 == 0
MS = (1, 2, 5, 8, 17, 64)
NATIVE_BY_DEFAULT = kernels.kernel_isa() == "avx512vnni"  # pack's default layout choice


def gguf_tensor(kind, N, K, seed=0):
    qtype = gguf.GGMLQuantizationType[kind]
    elems, _ = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(kind, N * K // elems, np.random.default_rng(seed)).reshape(N, -1)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(N, K).astype(np.float32))
    return formats.from_gguf(raw, kind, (N, K), f"test {kind}"), want


def pack_native(qt, native=True):
    return kernels.pack(qt.q, qt.scale, qt.min, qt.bits, qt.block, super_scale=qt.super_scale,
                        super_min=qt.super_min, native=native)


def pack_expanded(qt):
    """The layout these types had before: int8 blocks for the 5- / 6-bit ones, fp32 Q4_K scales."""
    return kernels.pack(qt.q, qt.scale, qt.min, 8 if qt.bits in (5, 6) else qt.bits, qt.block)


@pytest.mark.parametrize("kind", NATIVE)
@pytest.mark.parametrize("N", [32, 37])
def test_packed_at_the_files_size_and_exact(kind, N):
    K = 512
    qt, want = gguf_tensor(kind, N, K)
    w = pack_native(qt)
    assert torch.equal(w.dequantize(), want)  # the gguf package's dequantisation, bit for bit
    assert w.k_super == (kind != "Q5_0") and w.bits == {"Q6_K": 6, "Q5_0": 5, "Q4_K": 4, "Q5_K": 5}[kind]
    padded_n = -(-N // 16) * 16
    assert 8 * w.nbytes() / (padded_n * K) == NATIVE[kind]
    assert w.nbytes() < pack_expanded(qt).nbytes()
    q, scale, mn = w.unpack()
    assert torch.equal(q, qt.q) and torch.equal(scale, qt.scale)
    assert (mn is None) == (qt.min is None) and (mn is None or torch.equal(mn, qt.min))


@pytest.mark.parametrize("kind", NATIVE)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_gives_the_expanded_layouts_bits(kind, isa):
    N, K = 53, 768
    qt, _ = gguf_tensor(kind, N, K, seed=1)
    w, old = pack_native(qt), pack_expanded(qt)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(N, generator=gen)
    for M in MS:
        x = torch.randn(M, K, generator=gen)
        y = kernels.qlinear(x, w, bias, isa=isa)
        assert torch.equal(y, kernels.qlinear(x, old, bias, isa=isa)), (kind, isa, M)
        check(y, x, w, qt.q, qt.scale, qt.min, qt.block, bias)


@pytest.mark.parametrize("kind", NATIVE)
@pytest.mark.parametrize("isa", ISAS)
def test_a_rows_result_does_not_depend_on_the_batch(kind, isa):
    N, K = 40, 512
    qt, _ = gguf_tensor(kind, N, K, seed=3)
    w = pack_native(qt)
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(4))
    alone = kernels.qlinear(x[:1], w, isa=isa)
    for M in MS[1:]:
        assert torch.equal(kernels.qlinear(x[:M], w, isa=isa)[:1], alone), M
    for threads in (1, 2):
        assert torch.equal(kernels.qlinear(x[:8], w, isa=isa, num_threads=threads)[:1], alone)


def test_scales_that_are_not_the_files_integers_keep_the_plain_layout():
    qt, want = gguf_tensor("Q6_K", 16, 256, seed=5)
    odd = qt.super_scale * 3  # scale / super_scale no longer integers (in general)
    w = kernels.pack(qt.q, qt.scale, None, 6, 16, super_scale=odd, native=True)
    assert not w.k_super and torch.equal(w.dequantize(), want)
    x = torch.randn(3, 256)
    assert torch.equal(kernels.qlinear(x, w), kernels.qlinear(x, pack_native(qt)))
    qt4, want4 = gguf_tensor("Q4_K", 16, 256, seed=6)
    w4 = kernels.pack(qt4.q, qt4.scale, qt4.min, 4, 32, super_scale=qt4.super_scale, super_min=qt4.super_min * 3,
                      native=True)
    assert not w4.k_super and torch.equal(w4.dequantize(), want4)


def test_bad_5_and_6_bit_weights_are_rejected():
    q = torch.zeros(4, 64, dtype=torch.int8)
    scale = torch.ones(4, 2)
    with pytest.raises(ValueError, match="bits=5 needs block 32"):
        kernels.pack(q, torch.ones(4, 4), None, 5, 16)
    with pytest.raises(ValueError, match="bits=6 needs block 16"):
        kernels.pack(q, scale, torch.zeros(4, 2), 6, 32)
    with pytest.raises(ValueError, match=r"\[-16, 15\]"):
        kernels.pack(q + 16, scale, None, 5, 32)
    with pytest.raises(ValueError, match="only as K-quant super-blocks"):
        kernels.pack(q, scale, torch.zeros(4, 2), 5, 32)
    w = kernels.pack(q, torch.ones(4, 4), None, 6, 16, native=True)
    bad = kernels.PackedWeight(w.data[:, :-1].contiguous(), 6, 16, 4, 64, False, w.half_scales)
    with pytest.raises(ValueError, match="bytes"):
        kernels.qlinear(torch.randn(1, 64), bad)


def test_quant_linear_stacks_k_quant_parts_natively():
    """A fused gate / up from two GGUF Q6_K tensors: one super-block call, the file's dequantisation."""
    (a, wa), (b, wb) = gguf_tensor("Q6_K", 24, 512, seed=7), gguf_tensor("Q6_K", 40, 512, seed=8)
    lin = QuantLinear([a, b])
    assert len(lin.packed) == 1 and lin.packed[0].k_super == NATIVE_BY_DEFAULT
    assert torch.equal(lin.dequantize(), torch.cat([wa, wb]))
    x = torch.randn(2, 512)
    assert torch.equal(lin(x, None), kernels.qlinear(x, pack_expanded(formats.concat_rows([a, b]))))


def test_a_layer_with_q5_0_and_q8_0_parts_stays_one_call():
    """Gemma's Q4_K_M q / k (Q5_0) beside its v (Q8_0): widened to int8 blocks, one packed part
    (the fused decode path needs one); a layer of Q5_0 parts alone keeps its 5-bit blocks."""
    (q, wq), (v, wv) = gguf_tensor("Q5_0", 32, 256, seed=9), gguf_tensor("Q8_0", 16, 256, seed=10)
    mixed = QuantLinear([q, v])
    assert len(mixed.packed) == 1 and mixed.packed[0].bits == 8
    assert torch.equal(mixed.dequantize(), torch.cat([wq, wv]))
    alone = QuantLinear([q, q])
    assert len(alone.packed) == 1 and alone.packed[0].bits == (5 if NATIVE_BY_DEFAULT else 8)
    k4, _ = gguf_tensor("Q4_K", 16, 256, seed=11)
    assert len(QuantLinear([q, k4]).packed) == 2  # no common block form: two calls


@pytest.mark.parametrize("kind", NATIVE)
def test_without_the_avx512_kernel_the_blocks_are_packed_as_before(kind):
    """AVX2 / scalar expand 5- / 6-bit blocks slower than they read int8 ones: native=False (the
    default where the kernel path is not AVX-512) packs the previous layout, same values."""
    qt, want = gguf_tensor(kind, 16, 256, seed=12)
    w = pack_native(qt, native=False)
    assert not w.k_super and w.bits in (4, 8) and w.data.shape == pack_expanded(qt).data.shape
    assert torch.equal(w.dequantize(), want)
    default = pack_native(qt, native=None)
    assert (default.k_super or default.bits == 5) == NATIVE_BY_DEFAULT
