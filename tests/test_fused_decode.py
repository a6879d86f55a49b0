"""The fused native decoder layer (layers/fused.py) gives the reference torch layer's bits, for a
tiny random model of every family config and two weight formats, and a token's result is the
same bits in any batch."""
from __future__ import annotations

import pytest
import torch

from sarathi.model_executor.models import model_args
from sarathi.model_executor.models.decoder import DecoderLM
from sarathi.model_executor.quantization import _C
from sarathi.model_executor.quantization.formats import QuantTensor, quantize_int8
from test_model_families import BASE, FAMILIES
from vattention_ext.kernel import attention

VOCAB = 512
MAX_CTX = 96


def q4_1(w: torch.Tensor) -> QuantTensor:
    """GGUF Q4_1-like blocks of 32 (4-bit, scale and min per block, fp16-exact)."""
    n, k = w.shape
    b = w.view(n, k // 32, 32)
    lo, hi = b.amin(-1), b.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-6).half().float()
    mn = lo.half().float()
    q = torch.round((b - mn[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return QuantTensor(q, scale, mn, 4, 32, "test q4_1")


def tiny(name: str, fmt: str, seed: int = 0) -> DecoderLM:
    import transformers

    config_cls, _, fields = FAMILIES[name]
    cfg = getattr(transformers, config_cls)(**{**BASE, **fields, "vocab_size": VOCAB}).to_dict()
    args = model_args(cfg)
    model = DecoderLM(args).eval()
    g = torch.Generator().manual_seed(seed)
    weights = []
    for pname, p in model.named_parameters():
        if pname.endswith("norm.weight"):
            weights.append((pname, (1.0 + 0.3 * torch.randn(p.shape, generator=g)) if not args.norm_unit_offset
                            else 0.3 * torch.randn(p.shape, generator=g)))
        elif pname.endswith("bias"):
            weights.append((pname, 0.1 * torch.randn(p.shape, generator=g)))
        elif pname == "embed_tokens.weight":
            weights.append((pname, torch.randn(p.shape, generator=g)))
    model.load_weights([(n, t) for n, t in weights if not n.startswith("lm_head")]
                       + _linears(model, fmt, g))
    return model


def _linears(model: DecoderLM, fmt: str, g) -> list:
    """HF-named quantized weights for every linear layer (q/k/v and gate/up as separate parts)."""
    a = model.args
    out = []
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    quant = q4_1 if fmt == "q4_1" else (lambda w: quantize_int8(w, per_channel=False))
    for i in range(a.num_layers):
        pre = f"layers.{i}."
        shapes = {"self_attn.q_proj": (q, a.hidden_size), "self_attn.k_proj": (kv, a.hidden_size),
                  "self_attn.v_proj": (kv, a.hidden_size), "self_attn.o_proj": (a.hidden_size, q),
                  "mlp.gate_proj": (a.intermediate_size, a.hidden_size),
                  "mlp.up_proj": (a.intermediate_size, a.hidden_size),
                  "mlp.down_proj": (a.hidden_size, a.intermediate_size)}
        for n, shape in shapes.items():
            out.append((pre + n + ".weight", quant(0.2 * torch.randn(shape, generator=g))))
    if not a.tie_word_embeddings:
        out.append(("lm_head.weight", quant(0.2 * torch.randn(a.vocab_size, a.hidden_size, generator=g))))
    return out


class Cache:
    """A contiguous KV cache and the native attention kernel: the same `attend` for both paths."""

    def __init__(self, model: DecoderLM, slots: int = 4):
        a = model.args
        self.args = a
        self.k = torch.zeros(a.num_layers, slots, MAX_CTX, a.num_kv_heads, a.head_dim)
        self.v = torch.zeros_like(self.k)

    def step(self, model: DecoderLM, seqs):
        """seqs: [(slot, context_len, token ids)]; returns hidden [T, hidden]."""
        ids = torch.tensor([t for _, _, toks in seqs for t in toks])
        pos = torch.cat([torch.arange(c, c + len(toks)) for _, c, toks in seqs])
        a = self.args

        def attend(layer, q, k, v):
            return attention(q, self.k[layer], self.v[layer], [s for s, _, _ in seqs], [c for _, c, _ in seqs],
                             [len(t) for _, _, t in seqs], a.attn_scale, k_new=k, v_new=v, window=a.window(layer),
                             softcap=a.attn_logit_softcap)

        with torch.inference_mode():
            return model(ids, pos, attend)


def run_both(model, prompt, steps):
    """Prefill `prompt`, then `steps` decodes fed the same tokens, on each path with its own cache."""
    hidden = {}
    for fused in (False, True):
        model.set_fused(fused)
        cache = Cache(model)
        hs = [cache.step(model, [(0, 0, prompt)])]
        for i in range(steps):
            hs.append(cache.step(model, [(0, len(prompt) + i, [7 + 3 * i])]))
        hidden[fused] = torch.cat(hs)
    model.set_fused(True)
    return hidden[False], hidden[True]


@pytest.mark.parametrize("fmt", ["q4_1", "int8"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_layer_matches_reference(name, fmt):
    model = tiny(name, fmt)
    assert all(layer._fused_layer() is not None for layer in model.layers), "fused path not taken"
    assert model.layers[0]._fused_layer().native_silu == (model.args.activation == "silu")
    assert model.layers[0]._fused_layer().norm_lanes
    assert bool(model.layers[0]._fused_layer().head_norm_lanes) == model.args.qk_norm  # native per-head norms
    prompt = list(range(40, 80))  # longer than the sliding windows
    ref, fused = run_both(model, prompt, 8)
    assert torch.equal(fused, ref), (fused - ref).abs().max().item()


def test_fused_parts_give_torch_bits():
    """RoPE in place gives apply_rope's bits, the residual add x + h's, silu(gate) * up and
    RMSNorm (plain and Gemma's 1 + w) torch's."""
    from sarathi.model_executor.layers.rope import apply_rope

    g = torch.Generator().manual_seed(1)
    for rot in (64, 32):  # full and partial rotary
        x = torch.randn(5, 6, 64, generator=g)
        cos, sin = torch.randn(5, 1, rot // 2, generator=g), torch.randn(5, 1, rot // 2, generator=g)
        want = apply_rope(x, cos, sin)
        _C.rope_inplace(x.data_ptr(), 5, 6, 6 * 64, 64, cos.data_ptr(), sin.data_ptr(), rot // 2)
        assert torch.equal(x, want)
    from sarathi.model_executor.quantization.kernels import pack, qlinear

    w = q4_1(torch.randn(80, 64, generator=g))
    pw = pack(w.q, w.scale, w.min, 4, 32)
    x, res, bias = torch.randn(3, 64, generator=g), torch.randn(3, 80, generator=g), torch.randn(80, generator=g)
    out = torch.empty(3, 80)
    _C.qlinear_fused(x.data_ptr(), 3, 64, 64, pw.data.data_ptr(), pw.data.numel(), 80, 4, 32, True, pw.half_scales,
                     pw.min_kind, bias.data_ptr(), 0, 0, 0.0, False, 8, res.data_ptr(), 80, out.data_ptr(), 80, 1)
    assert torch.equal(out, res + qlinear(x, pw, bias))
    from sarathi.model_executor.layers.fused import native_silu_matches_torch

    assert native_silu_matches_torch(1536)  # torch's SLEEF exp on every x86-64 CPU with AVX2
    gate_up = torch.randn(3, 128, generator=g) * 10
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, float("nan")])
    out = torch.empty(3, 64)
    _C.silu_mul(gate_up.data_ptr(), 3, 64, 128, out.data_ptr())
    want = torch.nn.functional.silu(gate_up[:, :64]) * gate_up[:, 64:]
    assert torch.equal(out.nan_to_num(7.0), want.nan_to_num(7.0))
    from sarathi.model_executor.layers.fused import native_rms_norm_lanes
    from sarathi.model_executor.layers.norm import RMSNorm

    for width in (64, 576, 2048, 3000):
        lanes = native_rms_norm_lanes(width)
        assert lanes in (8, 16)  # torch's order of summing a row, found on every x86-64 build measured
        x = torch.randn(9, width, generator=g) * 5
        for unit in (False, True):
            norm = RMSNorm(width, 1e-6, unit)
            with torch.no_grad():
                norm.weight.normal_(generator=g)
            out = torch.empty(9, width)
            _C.rms_norm(x.data_ptr(), 9, width, width, norm.weight.data_ptr(), 1e-6, unit, lanes, out.data_ptr(),
                        width)
            with torch.no_grad():
                assert torch.equal(out, norm(x)), (width, unit)
    # per-head norms over the q heads of a fused qkv row (Qwen3, Gemma 3): token stride != heads x D
    for d in (64, 128, 256):
        lanes = native_rms_norm_lanes(d)
        qkv = torch.randn(3, 7 * d, generator=g) * 3
        for unit in (False, True):
            norm = RMSNorm(d, 1e-6, unit)
            with torch.no_grad():
                norm.weight.normal_(generator=g)
                want = norm(qkv.view(3, 7, d)[:, 1:5])   # heads 1..4, a strided view as the reference takes it
            out = torch.empty(3, 4, d)
            _C.rms_norm_heads(qkv.data_ptr() + 4 * d, 3, 7 * d, 4, d, norm.weight.data_ptr(), 1e-6, unit, lanes,
                              out.data_ptr())
            assert torch.equal(out, want), (d, unit)
    with pytest.raises(ValueError, match="bad sizes"):
        _C.rms_norm_heads(qkv.data_ptr(), 3, 2 * d, 4, d, norm.weight.data_ptr(), 1e-6, False, 8, out.data_ptr())


def test_fused_refuses_bad_arguments():
    with pytest.raises(ValueError, match="pre_kind"):
        _C.qlinear_fused(0, 1, 32, 32, 0, 0, 16, 4, 32, False, False, 0, 0, 7, 0, 0.0, False, 8, 0, 16, 0, 16, 1)
    with pytest.raises(ValueError, match="stride"):  # a silu(gate) * up row holds 2K values
        _C.qlinear_fused(0, 1, 32, 32, 0, 0, 16, 4, 32, False, False, 0, 0, 1, 0, 0.0, False, 8, 0, 16, 0, 16, 1)
    with pytest.raises(ValueError, match="RMSNorm"):
        _C.qlinear_fused(0, 1, 32, 32, 0, 0, 16, 4, 32, False, False, 0, 0, 2, 0, 0.0, False, 8, 0, 16, 0, 16, 1)


@pytest.mark.parametrize("name", ["llama3", "gemma3", "qwen2"])
def test_fused_token_same_bits_in_any_batch(name):
    """A decode token alone, beside other decodes, and beside a prefill chunk: the same hidden bits."""
    model = tiny(name, "q4_1")
    prompts = {0: list(range(10, 50)), 1: list(range(60, 75)), 2: list(range(100, 130))}
    cache = Cache(model)
    for slot, p in prompts.items():
        cache.step(model, [(slot, 0, p)])
    n0 = len(prompts[0])
    alone = cache.step(model, [(0, n0, [5])])
    with_decodes = cache.step(model, [(1, len(prompts[1]), [9]), (0, n0, [5]), (2, len(prompts[2]), [11])])
    with_prefill = cache.step(model, [(3, 0, list(range(200, 217))), (0, n0, [5])])
    assert torch.equal(with_decodes[1], alone[0])
    assert torch.equal(with_prefill[17], alone[0])


def test_fused_layer_follows_requantized_weights():
    """A linear quantized again after the layer ran gets a new fused plan (Linear.version)."""
    model = tiny("llama3", "q4_1")
    run_both(model, [5, 6, 7], 1)
    g = torch.Generator().manual_seed(5)
    a = model.args
    for layer in model.layers:
        layer.mlp.down_proj.quantize([q4_1(0.2 * torch.randn(a.hidden_size, a.intermediate_size, generator=g))])
    ref, fused = run_both(model, [5, 6, 7], 1)
    assert torch.equal(fused, ref)
    assert model.layers[0]._fused_layer().down.data is model.layers[0].mlp.down_proj.qweight.packed[0].data
