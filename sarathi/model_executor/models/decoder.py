"""The decoder-only transformer every supported family is built from, in plain PyTorch.
(Where a layer's weights are quantized on the CPU, it runs the fused native path of
layers/fused.py instead, which gives this file's bits.)

A family is a `ModelArgs`: which norm (plain or Gemma's 1 + w), whether norms also
follow attention and the MLP (Gemma 2/3), q/k biases (Qwen2) or per-head q/k norms
(Qwen3, Gemma 3), the MLP's activation (SiLU or tanh-GELU), soft-capping, the attention
scale, partial rotary, and a sliding window per layer with its own RoPE (Gemma 3's
local layers). The family modules (llama.py, qwen.py, ...) only read configs into it.

Math only: tokens are a flat [T] batch (prefill chunks first, then decodes) and
attention over the KV cache is injected as a callable, so this file knows nothing of
scheduling, slots or memory. The sliding window and the attention soft-cap are applied
by the KV backend's attention (they are in `args`, which the runner hands to the backend).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from sarathi.model_executor.layers.fused import fused_layer
from sarathi.model_executor.layers.linear import Linear
from sarathi.model_executor.layers.norm import RMSNorm
from sarathi.model_executor.layers.rope import RopeSpec, RotaryEmbedding, apply_rope
from sarathi.model_executor.quantization.formats import QuantTensor

# attend(layer_idx, q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D]) -> [T,Hq,D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeSpec = field(default_factory=RopeSpec)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"               # the MLP's gate: "silu" or "gelu_tanh"
    norm_unit_offset: bool = False         # Gemma: norms scale by (1 + w)
    sandwich_norms: bool = False           # Gemma 2/3: a norm after attention and around the MLP too
    qk_norm: bool = False                  # Qwen3, Gemma 3: RMSNorm over each head of q and k
    embed_scale: Optional[float] = None    # Gemma: embeddings times sqrt(hidden)
    query_pre_attn_scalar: Optional[float] = None  # Gemma: softmax scale 1/sqrt(this), not 1/sqrt(head_dim)
    attn_logit_softcap: float = 0.0        # Gemma 2: scores -> cap * tanh(scores / cap); 0 = off
    final_logit_softcap: float = 0.0       # Gemma 2: the same on the logits
    sliding_windows: Tuple[int, ...] = ()  # per layer: keys a query sees (0 = all); empty = none
    sliding_rope: Optional[RopeSpec] = None  # Gemma 3: the sliding layers' own RoPE

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    def window(self, layer: int) -> int:
        return self.sliding_windows[layer] if self.sliding_windows else 0

    def layer_rope(self, layer: int) -> RopeSpec:
        return self.sliding_rope if self.sliding_rope is not None and self.window(layer) else self.rope

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """The args of any supported architecture (see sarathi.model_executor.models)."""
        from sarathi.model_executor.models import model_args

        return model_args(cfg)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size = a.num_heads * a.head_dim
        self.kv_size = a.num_kv_heads * a.head_dim
        self.qkv_proj = Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = Linear(self.q_size, a.hidden_size, bias=a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, a.norm_unit_offset)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, a.norm_unit_offset)
        self.qk_norm = a.qk_norm

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttendFn) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        qk = qkv[:, :self.q_size + self.kv_size].view(t, -1, self.head_dim)
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:
            # Rotate q and k together: one pass over [T, Hq + Hkv, D].
            q, k = apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        out = attend(layer, q, k, v)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.intermediate = a.intermediate_size
        self.act = ACTIVATIONS[a.activation]
        self.gate_up_proj = Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residuals; with sandwich norms (Gemma) the branch
    outputs are normed too. Names follow HF: in Gemma post_attention_layernorm norms the
    attention output, in Llama it is the MLP's input norm."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        norm = lambda: RMSNorm(a.hidden_size, a.rms_norm_eps, a.norm_unit_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(a)
        self.post_attention_layernorm = norm()
        if a.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.sandwich = a.sandwich_norms
        self.mlp = MLP(a)
        self.activation = a.activation
        self.use_fused = True  # the fused native path where it applies (layers/fused.py)
        self._linears = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        self._fused = (None, None)  # (the linears' versions it was built for, FusedLayer or None)

    def forward(self, layer, x, cos, sin, attend):
        if self.use_fused and x.dtype is torch.float32 and cos.dtype is torch.float32:
            fused = self._fused_layer()
            if fused is not None and fused.usable(x):
                return fused.forward(layer, x, cos, sin, attend)
        return self.reference_forward(layer, x, cos, sin, attend)

    def _fused_layer(self):
        qkv, o, gate_up, down = self._linears
        versions = (qkv.version, o.version, gate_up.version, down.version)  # plain attributes: cheap per call
        if versions != self._fused[0]:
            self._fused = (versions, fused_layer(self, self.activation))
        return self._fused[1]

    def reference_forward(self, layer, x, cos, sin, attend):
        """The layer in plain torch ops: the reference the fused path must match."""
        h = self.self_attn(layer, self.input_layernorm(x), cos, sin, attend)
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class DecoderLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head: the causal LM of every family."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_unit_offset)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)  # tied: a transposed copy
        # One rotary table per distinct RoPE (Gemma 3: local and global); layer i uses _layer_rope[i].
        specs: Dict[tuple, RopeSpec] = {}
        for i in range(args.num_layers):
            specs.setdefault(args.layer_rope(i).key(), args.layer_rope(i))
        keys = list(specs)
        self._ropes = [RotaryEmbedding(specs[k], args.head_dim) for k in keys]
        self._layer_rope = [keys.index(args.layer_rope(i).key()) for i in range(args.num_layers)]

    def set_fused(self, on: bool) -> None:
        """Use the fused native layer path where it applies (default), or the reference torch ops."""
        for layer in self.layers:
            layer.use_fused = bool(on)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                num_layers: Optional[int] = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm (num_layers: after only the first
        num_layers layers, as an early-exit draft reads them)."""
        x = self.embed_tokens(input_ids)
        if self.args.embed_scale is not None:
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        dtype = self.embed_tokens.weight.dtype
        tables = [rope(positions, dtype) for rope in self._ropes]
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for i, layer in enumerate(layers):
            cos, sin = tables[self._layer_rope[i]]
            x = layer.forward(i, x, cos, sin, attend)   # no module hooks here: skip __call__'s per-call cost
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.args.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def load_weights(self, weights: Iterable[Tuple[str, Union[torch.Tensor, QuantTensor]]]) -> None:
        """Load HF-named weights, fusing q/k/v and gate/up into one matmul each (checkpoints
        that store them fused, as Phi-3's, load as they are).

        A float matrix is [out, in] as HF stores it; a `QuantTensor` (named like the HF weight)
        makes its Linear quantized. A tied LM head shares the embedding's tensor."""
        a = self.args
        params: Dict[str, nn.Parameter] = dict(self.named_parameters())
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        fused = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
                 "gate_proj": ("gate_up_proj", 0, a.intermediate_size),
                 "up_proj": ("gate_up_proj", a.intermediate_size, a.intermediate_size)}
        loaded = set()
        quant_parts: Dict[str, Dict[int, QuantTensor]] = {}
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and a.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, cols = name, None
            for i, part in enumerate(parts):
                if part in fused:
                    fused_name, start, size = fused[part]
                    target = ".".join(parts[:i] + [fused_name] + parts[i + 1:])
                    cols = (start, size)
                    break
            if target not in params:
                raise ValueError(f"unexpected weight {hf_name!r} (not part of {a.architecture})")
            module = self.get_submodule(target.rsplit(".", 1)[0]) if "." in target else self
            if isinstance(tensor, QuantTensor):
                if name == "embed_tokens.weight":
                    if a.tie_word_embeddings:
                        quant_parts["lm_head"] = {0: tensor}
                    tensor = tensor.dequantize()  # rows are looked up, not multiplied
                elif isinstance(module, Linear) and target.endswith(".weight"):
                    quant_parts.setdefault(target.rsplit(".", 1)[0], {})[cols[0] if cols else 0] = tensor
                    loaded.add((target, cols))
                    continue
                else:
                    raise ValueError(f"weight {name!r} cannot be quantized")
            param = params[target]
            matrix = isinstance(module, Linear) and target.endswith(".weight")
            if matrix:
                tensor = tensor.t()  # HF stores [out, in]
            dest = param if cols is None else (param[:, cols[0]:cols[0] + cols[1]] if param.dim() == 2
                                               else param[cols[0]:cols[0] + cols[1]])
            if dest.shape != tensor.shape:
                as_hf = (lambda t: tuple(t.t().shape)) if matrix else (lambda t: tuple(t.shape))  # noqa: E731
                raise ValueError(f"weight {hf_name!r} has shape {as_hf(tensor)}, expected {as_hf(dest)}")
            with torch.no_grad():
                dest.copy_(tensor)
                if name == "embed_tokens.weight" and a.tie_word_embeddings and "lm_head" not in quant_parts:
                    self.lm_head.weight.copy_(tensor.t())
            loaded.add((target, cols))
            if name == "embed_tokens.weight" and a.tie_word_embeddings:
                loaded.add(("lm_head.weight", None))
        for path, by_start in quant_parts.items():
            linear: Linear = self.get_submodule(path)
            starts = sorted(by_start)
            if sum(by_start[s].shape[0] for s in starts) != linear.out_features:
                raise ValueError(f"{path}: quantized parts cover {sum(by_start[s].shape[0] for s in starts)} of "
                                 f"{linear.out_features} outputs (a fused layer needs all of its parts quantized)")
            linear.quantize([by_start[s] for s in starts])
        missing = set(params) - {t for t, _ in loaded}
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")
