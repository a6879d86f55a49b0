"""The fused CPU path of one decoder layer: the reference forward of `DecoderLayer` in
eight calls instead of ~25 torch ops, with the same bits.

    qkv  = qlinear(rmsnorm(x))                 torch's RMSNorm (one op), the quantized kernel
    q, k = rope(qkv) in place                  the float ops of apply_rope, natively (after the per-head
                                               q/k norms of Qwen3 / Gemma 3, natively too)
    out  = attend(q, k, v)                     the KV backend's kernel (stores K/V itself)
    x    = x + qlinear(out)                    the residual added to the kernel's output panels
    h    = qlinear(rmsnorm(x))                 gate and up in one matmul
    x    = x + qlinear(silu(gate) * up)        the gate applied to each row before quantization

Bit-exactness is the design constraint: the int8 activation quantization turns any last-bit
difference into a quantization step, which measurably lowers agreement with the float model.
So RMSNorm stays torch's op (its sum's order decides the scale's last bit), SiLU follows torch's
vectorised exp operation for operation, and tanh-GELU (Gemma) stays torch's. Used when all four
linear layers hold quantized weights in one packed part each, without LoRA, on float32 CPU
activations; otherwise the reference runs. Every step is per row: batch invariance holds.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from sarathi.model_executor.layers.rope import apply_rope
from vattention_ext.threads import native_threads

_NONE, _SILU_MUL, _RMS_NORM = 0, 1, 2


class _Weight:
    """What one qlinear_fused call needs of a Linear, read once (the call then skips kernels.py's checks)."""

    def __init__(self, linear):
        p = linear.qweight.packed[0]
        self.data = p.data  # keeps the buffer alive
        self.args = (p.data.data_ptr(), p.data.numel(), p.out_features, p.bits, p.block, p.has_min, p.half_scales,
                     p.min_kind, 0 if linear.bias is None else linear.bias.data_ptr())
        self.bias = linear.bias
        self.in_features, self.out_features = p.in_features, p.out_features


class FusedLayer:
    """One decoder layer's weights, ready for the fused forward. Build with `fused_layer`."""

    def __init__(self, layer, activation: str):
        from sarathi.model_executor.quantization import _C  # built with the kernels QuantLinear already uses

        self._C = _C
        attn, mlp = layer.self_attn, layer.mlp
        self.layer = layer
        self.qkv, self.o = _Weight(attn.qkv_proj), _Weight(attn.o_proj)
        self.gate_up, self.down = _Weight(mlp.gate_up_proj), _Weight(mlp.down_proj)
        self.linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        self.native_silu = activation == "silu" and native_silu_matches_torch(mlp.intermediate)
        norms = [layer.input_layernorm, layer.post_attention_layernorm] + (
            [layer.pre_feedforward_layernorm] if layer.sandwich else [])
        self.norm_lanes = native_rms_norm_lanes(attn.qkv_proj.in_features) if all(
            n.weight.dtype == torch.float32 and n.weight.is_contiguous() for n in norms) else 0
        # the modules forward reads, as plain attributes (nn.Module's attribute lookup costs per call)
        self.qk_norm, self.sandwich = attn.qk_norm, layer.sandwich
        self.q_norm, self.k_norm = (attn.q_norm, attn.k_norm) if attn.qk_norm else (None, None)
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm
        self.norm_pre_ff = layer.pre_feedforward_layernorm if layer.sandwich else None
        self.norm_post_ff = layer.post_feedforward_layernorm if layer.sandwich else None
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        # Qwen3 / Gemma 3: the per-head q/k norms natively where that gives torch's bits
        self.head_norm_lanes = native_rms_norm_lanes(attn.head_dim) if attn.qk_norm and all(
            n.weight.dtype == torch.float32 and n.weight.is_contiguous() for n in (attn.q_norm, attn.k_norm)) else 0
        self.q_size, self.kv_size = attn.q_size, attn.kv_size
        self.head_split = [attn.num_heads, attn.num_kv_heads, attn.num_kv_heads]

    def usable(self, x: torch.Tensor) -> bool:
        """Whether the fused path computes this call (LoRA may be attached after loading)."""
        return x.dtype is torch.float32 and x.device.type == "cpu" and all(li.lora is None for li in self.linears)

    def _linear(self, w: _Weight, x: torch.Tensor, pre: int = _NONE, residual: Optional[torch.Tensor] = None,
                threads: int = 1, norm=None) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        out = x.new_empty(m, w.out_features)
        if m == 0:
            return out
        norm_args = (0, 0.0, False, 8) if norm is None else (norm.weight.data_ptr(), norm.eps, norm.unit_offset,
                                                             self.norm_lanes)
        self._C.qlinear_fused(x.data_ptr(), m, w.in_features, x.stride(0) if m > 1 else x.shape[1], *w.args, pre,
                              *norm_args, 0 if residual is None else residual.data_ptr(), w.out_features,
                              out.data_ptr(), w.out_features, threads)
        return out

    def _normed_linear(self, w: _Weight, norm, x: torch.Tensor, threads: int) -> torch.Tensor:
        """qlinear(norm(x)), the norm inside the call where it gives torch's bits."""
        if self.norm_lanes:
            return self._linear(w, x, _RMS_NORM, threads=threads, norm=norm)
        return self._linear(w, self._norm(norm, x), threads=threads)

    def _norm_native(self, norm, x: torch.Tensor) -> torch.Tensor:
        """norm(x) for a contiguous float32 [t, hidden] x: the native RMSNorm where it gives torch's
        bits (one call instead of RMSNorm's six ops), else the module."""
        if not self.norm_lanes or x.shape[0] == 0:
            return norm(x)
        out = torch.empty_like(x)
        k = x.shape[1]
        self._C.rms_norm(x.data_ptr(), x.shape[0], k, k, norm.weight.data_ptr(), norm.eps, norm.unit_offset,
                         self.norm_lanes, out.data_ptr(), k)
        return out

    def _head_norm(self, norm, qkv: torch.Tensor, t: int, offset: int, heads: int) -> torch.Tensor:
        """norm over each of `heads` heads starting at column `offset` of qkv -> a new [t, heads, D]."""
        D = self.head_dim
        out = qkv.new_empty(t, heads, D)
        self._C.rms_norm_heads(qkv.data_ptr() + 4 * offset, t, qkv.stride(0), heads, D, norm.weight.data_ptr(),
                               norm.eps, norm.unit_offset, self.head_norm_lanes, out.data_ptr())
        return out

    @staticmethod
    def _norm(norm, x: torch.Tensor) -> torch.Tensor:
        # RMSNorm.forward's own float32 branch, without the module call.
        if norm.unit_offset:
            return norm(x)
        return torch.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)

    def _mlp(self, h: torch.Tensor, residual: Optional[torch.Tensor], threads: int) -> torch.Tensor:
        """down(act(gate) * up) (+ residual) from h = [gate | up]."""
        if self.native_silu:
            return self._linear(self.down, h, _SILU_MUL, residual=residual, threads=threads)
        mlp = self.layer.mlp
        gate, up = h.split(mlp.intermediate, dim=-1)
        return self._linear(self.down, mlp.act(gate) * up, residual=residual, threads=threads)

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        threads = native_threads()
        t = x.shape[0]
        if not x.is_contiguous():
            x = x.contiguous()
        qkv = self._normed_linear(self.qkv, self.norm_in, x, threads)
        D = self.head_dim
        if not (cos.is_contiguous() and sin.is_contiguous()):
            cos, sin = cos.contiguous(), sin.contiguous()
        if self.qk_norm and self.head_norm_lanes and t:
            # per-head norms natively into q and k of their own, then RoPE in place on them
            q = self._head_norm(self.q_norm, qkv, t, 0, self.heads)
            k = self._head_norm(self.k_norm, qkv, t, self.q_size, self.kv_heads)
            for x_, h_ in ((q, self.heads), (k, self.kv_heads)):
                self._C.rope_inplace(x_.data_ptr(), t, h_, h_ * D, D, cos.data_ptr(), sin.data_ptr(), cos.shape[-1])
            v = qkv[:, self.q_size + self.kv_size:].view(t, self.kv_heads, D)
        elif self.qk_norm:
            q, k, v = qkv.view(t, -1, D).split(self.head_split, dim=1)
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:
            self._C.rope_inplace(qkv.data_ptr(), t, self.heads + self.kv_heads, qkv.stride(0), D, cos.data_ptr(),
                                 sin.data_ptr(), cos.shape[-1])
            q, k, v = qkv.view(t, -1, D).split(self.head_split, dim=1)
        out = attend(layer, q, k, v).reshape(t, self.q_size)
        if not self.sandwich:
            x = self._linear(self.o, out, residual=x, threads=threads)
            h = self._normed_linear(self.gate_up, self.norm_post, x, threads)
            return self._mlp(h, x, threads)
        # Gemma's sandwich: the norms after o and down natively, the one before gate_up inside its call.
        x = x + self._norm_native(self.norm_post, self._linear(self.o, out, threads=threads))
        h = self._normed_linear(self.gate_up, self.norm_pre_ff, x, threads)
        return x + self._norm_native(self.norm_post_ff, self._mlp(h, None, threads))


@functools.lru_cache(maxsize=None)
def native_silu_matches_torch(width: int) -> bool:
    """Whether the native silu(gate) * up gives torch's bits for rows of `width` on this machine:
    torch's vectorised exp is SLEEF's, which the native loop follows, but a row's last
    width % (2 x vector) values and a torch build without AVX2 use libm's. Checked once per width."""
    from sarathi.model_executor.quantization import _C

    if width % 32:
        return False
    g = torch.Generator().manual_seed(0)
    rows = max(1, 65536 // width)
    gate_up = torch.cat([torch.randn(rows, width, generator=g) * 8, torch.randn(rows, width, generator=g)], dim=1)
    out = torch.empty(rows, width)
    _C.silu_mul(gate_up.data_ptr(), rows, width, 2 * width, out.data_ptr())
    gate, up = gate_up.split(width, dim=1)
    return bool(torch.equal(out, torch.nn.functional.silu(gate) * up))


@functools.lru_cache(maxsize=None)
def native_rms_norm_lanes(width: int) -> int:
    """The vector width (8 or 16 floats) with which the native RMSNorm gives torch.rms_norm's bits
    (and RMSNorm's (1 + w) branch's) for rows of `width` on this machine, or 0: torch sums a row
    in an order that depends on its vector width (the native sum follows it). Checked once."""
    from sarathi.model_executor.quantization import _C

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, width, generator=g) * 4
    w = torch.randn(width, generator=g)
    out = torch.empty(64, width)
    want = torch.rms_norm(x, (width,), w, 1e-6)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    want_unit = (x * r) * (1.0 + w)
    for lanes in (8, 16):
        _C.rms_norm(x.data_ptr(), 64, width, width, w.data_ptr(), 1e-6, False, lanes, out.data_ptr(), width)
        if torch.equal(out, want):
            _C.rms_norm(x.data_ptr(), 64, width, width, w.data_ptr(), 1e-6, True, lanes, out.data_ptr(), width)
            if torch.equal(out, want_unit):
                return lanes
    return 0


def fused_layer(layer, activation: str) -> Optional[FusedLayer]:
    """A FusedLayer when every linear of `layer` is quantized in one packed part (no input
    permutation) with float32 biases; else None (the reference forward runs)."""
    attn, mlp = layer.self_attn, layer.mlp
    for li in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        q = li.qweight
        if q is None or len(q.packed) != 1 or q.perms[0] is not None:
            return None
        if li.bias is not None and (li.bias.dtype != torch.float32 or not li.bias.is_contiguous()):
            return None
    return FusedLayer(layer, activation)
