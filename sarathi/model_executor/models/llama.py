"""The Llama family (Llama 2/3, Mistral without sliding window, SmolLM2) in plain PyTorch.

Math only: tokens are a flat [T] batch (prefill chunks first, then decodes) and
attention over the KV cache is injected as a callable, so this file knows nothing
of scheduling, slots or memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from sarathi.model_executor.layers.linear import Linear
from sarathi.model_executor.quantization.formats import QuantTensor

# attend(layer_idx, q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D]) -> [T,Hq,D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaArgs":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if cfg.get("model_type", "llama") not in ("llama", "mistral") and arch not in (
                "LlamaForCausalLM", "MistralForCausalLM"):
            raise ValueError(f"unsupported architecture {arch!r} (model_type {cfg.get('model_type')!r}); "
                             "this engine runs the Llama family")
        if cfg.get("sliding_window") and cfg.get("model_type") == "mistral" and cfg.get("use_sliding_window", True):
            max_len = cfg.get("max_position_embeddings", 0)
            if cfg["sliding_window"] < max_len:
                raise ValueError("Mistral sliding-window attention is not supported")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
        )


def _rope_scaling(cfg: dict) -> Optional[dict]:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else dict(scaling, rope_type=kind)


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies, with rope_scaling (linear, llama3) applied."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if s is None:
        return inv
    kind = s["rope_type"]
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (linear and llama3 are)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T,H,D]; cos/sin [T,1,D/2] (halves layout, as HF's rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size = a.num_heads * a.head_dim
        self.kv_size = a.num_kv_heads * a.head_dim
        self.qkv_proj = Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.attention_bias)
        self.o_proj = Linear(self.q_size, a.hidden_size, bias=a.attention_bias)

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttendFn) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # Rotate q and k together: one pass over [T, Hq + Hkv, D].
        qk = apply_rope(qkv[:, :self.q_size + self.kv_size].view(t, -1, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        out = attend(layer, q, k, v)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.intermediate = a.intermediate_size
        self.gate_up_proj = Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, layer, x, cos, sin, attend):
        x = x + self.self_attn(layer, self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)  # tied: a transposed copy
        self._inv_freq: Optional[torch.Tensor] = None  # built on first use, on the weights' device

    def rope(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.args).float().to(positions.device)
        freqs = (positions.to(torch.float32)[:, None] * self._inv_freq[None, :])[:, None, :]
        dtype = self.embed_tokens.weight.dtype
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.layers):
            x = layer(i, x, cos, sin, attend)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[Tuple[str, Union[torch.Tensor, QuantTensor]]]) -> None:
        """Load HF-named weights, fusing q/k/v and gate/up into one matmul each.

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
        for name, tensor in weights:
            name = name.removeprefix("model.")
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
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
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
            if isinstance(module, Linear) and target.endswith(".weight"):
                tensor = tensor.t()  # HF stores [out, in]
            dest = param if cols is None else (param[:, cols[0]:cols[0] + cols[1]] if param.dim() == 2
                                               else param[cols[0]:cols[0] + cols[1]])
            if dest.shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
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
