"""Quantized formats -> the kernels' logical blocks: exact against each format's own meaning
(GGUF: the gguf package's dequantisation, bit for bit; GPTQ / AWQ: (q - z) * s), and bad
checkpoints rejected with errors naming the tensor."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from sarathi.model_executor.model_loader import pick_quantization
from sarathi.model_executor.quantization.formats import (GGUF_KERNEL_TYPES, from_gguf, from_gptq, quantize_int8)


def random_blocks(kind: str, nblocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw GGUF blocks with finite, sane fp16 scales (any other bit pattern is valid)."""
    qtype = gguf.GGMLQuantizationType[kind]
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    halves = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [nbytes - 2]}[kind]
    for off in halves:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, size=nblocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("kind", GGUF_KERNEL_TYPES)
def test_gguf_blocks_decode_bit_exact(kind):
    rng = np.random.default_rng(0)
    qtype = gguf.GGMLQuantizationType[kind]
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n, k = 6, 2 * 256
    raw = random_blocks(kind, n * k // elems, rng).reshape(n, -1)
    want = gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32)
    qt = from_gguf(raw, kind, (n, k), "t")
    got = qt.dequantize().numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want), np.abs(got - want).max()
    assert qt.bits in (4, 5, 6, 8) and qt.block in (16, 32)
    if qt.bits == 4:
        assert qt.q.dtype == torch.uint8 and int(qt.q.max()) <= 15
    else:
        assert qt.q.dtype == torch.int8


def test_gguf_without_kernel_is_requantised_with_a_note(caplog):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 256)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match="does not match"):
        from_gguf(raw, "Q8_0", (4, 512), "bad")
    # Q2_K has no kernel: dequantised by gguf, re-quantised to int8 blocks, logged
    _, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K]
    raw2 = np.random.default_rng(2).integers(0, 256, size=(4, nbytes), dtype=np.uint8)
    raw2[:, -4:] = np.array([0.01, 0.001], dtype=np.float16).view(np.uint8)
    with caplog.at_level("INFO", logger="sarathi"):
        qt = from_gguf(raw2, "Q2_K", (4, 256), "q2")
    assert qt.bits == 8 and "no kernel" in caplog.text and "Q2_K" in qt.source
    ref = gguf.quants.dequantize(raw2, gguf.GGMLQuantizationType.Q2_K).reshape(4, 256)
    err = np.abs(qt.dequantize().numpy() - ref).max()
    assert err <= np.abs(ref).max() / 127 + 1e-6


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, bits: int):
    """The GPTQ layout written out plainly: qweight [K/per, N] along the input, qzeros [G, N/per]."""
    per = 32 // bits
    k, n = q.shape
    qweight = torch.zeros(k // per, n, dtype=torch.int64)
    for i in range(per):
        qweight |= q[i::per].to(torch.int64) << (bits * i)
    g = zeros.shape[0]
    qzeros = torch.zeros(g, n // per, dtype=torch.int64)
    for i in range(per):
        qzeros |= zeros[:, i::per].to(torch.int64) << (bits * i)
    to32 = lambda t: ((t + 2**31) % 2**32 - 2**31).to(torch.int32)  # noqa: E731 - two's complement
    return to32(qweight), to32(qzeros)


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (4, 128, True), (8, 64, False), (4, -1, False)])
def test_gptq_unpack_matches_formula(bits, group, act_order):
    g = torch.Generator().manual_seed(0)
    k, n = 256, 48
    gs = k if group == -1 else group
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    zeros = torch.randint(0, 2**bits, (k // gs, n), generator=g)            # the true zeros
    scales = (torch.rand(k // gs, n, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(k) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    qweight, qzeros = pack_gptq(q, (zeros - 1) & (2**bits - 1), bits)       # v1 stores zero - 1
    qt = from_gptq(qweight, qzeros, scales, g_idx.int(), bits, group, "layer", zero_offset=1)
    want = ((q - zeros[g_idx]).float() * scales.float()[g_idx]).t()         # [N, K]
    assert torch.equal(qt.dequantize(), want)
    assert (qt.input_perm is not None) == act_order


def test_awq_unpack_order():
    g = torch.Generator().manual_seed(1)
    k, n, gs = 64, 16, 32
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (k // gs, n), generator=g)
    scales = (torch.rand(k // gs, n, generator=g) * 0.02 + 0.001).half()
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = torch.zeros(k, n // 8, dtype=torch.int64)
    qzeros = torch.zeros(k // gs, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            qweight[:, col] |= q[:, col * 8 + order[i]].to(torch.int64) << (4 * i)
            qzeros[:, col] |= zeros[:, col * 8 + order[i]].to(torch.int64) << (4 * i)
    to32 = lambda t: ((t + 2**31) % 2**32 - 2**31).to(torch.int32)  # noqa: E731
    qt = from_gptq(to32(qweight), to32(qzeros), scales, None, 4, gs, "awq", zero_offset=0, awq=True)
    want = ((q - zeros.repeat_interleave(gs, 0)).float() * scales.float().repeat_interleave(gs, 0)).t()
    assert torch.equal(qt.dequantize(), want)


def test_gptq_bad_checkpoints_name_the_tensor():
    q = torch.zeros(32, 8, dtype=torch.int32)
    z = torch.zeros(1, 1, dtype=torch.int32)
    s = torch.ones(1, 8).half()
    with pytest.raises(ValueError, match="layers.0.q_proj.*missing qzeros"):
        from_gptq(q, None, s, None, 4, 256, "layers.0.q_proj")
    with pytest.raises(ValueError, match="3-bit"):
        from_gptq(q, z, s, None, 3, 256, "x")
    with pytest.raises(ValueError, match="group size 100"):
        from_gptq(q, z, s, None, 4, 100, "x")
    with pytest.raises(ValueError, match="AWQ"):
        from_gptq(q, z, s, None, 8, 32, "x", awq=True)


def test_int8_per_channel_error_bound():
    w = torch.randn(64, 100)
    qt = quantize_int8(w)
    err = (qt.dequantize() - w).abs()
    assert (err <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    assert qt.q.dtype == torch.int8 and qt.scale.shape == (64, 4)


def test_pick_quantization():
    from pathlib import Path
    gg = Path("m.gguf")
    assert pick_quantization("auto", {}, gg) == "gguf"
    assert pick_quantization("auto", {}, None) == "none"
    assert pick_quantization("auto", {"quantization_config": {"quant_method": "gptq"}}, None) == "gptq"
    assert pick_quantization("none", {}, gg) == "none"
    assert pick_quantization("int8", {}, gg) == "int8"
    with pytest.raises(ValueError, match="needs a .gguf"):
        pick_quantization("gguf", {}, None)
    with pytest.raises(ValueError, match="says awq"):
        pick_quantization("gptq", {"quantization_config": {"quant_method": "awq"}}, None)
    with pytest.raises(ValueError, match="not supported"):
        pick_quantization("auto", {"quantization_config": {"quant_method": "bitsandbytes"}}, None)
