"""Reading an HF config.json into `ModelArgs`: the fields every family shares."""
from __future__ import annotations

from typing import Sequence, Tuple

from sarathi.model_executor.layers.rope import rope_spec
from sarathi.model_executor.models.decoder import ModelArgs


def need(cfg: dict, key: str, architecture: str):
    """cfg[key], or a one-line error naming the field and the architecture that needs it."""
    if cfg.get(key) is None:
        raise ValueError(f"config.json has no {key!r}, which {architecture} needs")
    return cfg[key]


def common_args(cfg: dict, architecture: str, tie_default: bool = False, **family) -> ModelArgs:
    """The shape, RoPE and embedding fields, then the family's own options (`family`)."""
    heads = need(cfg, "num_attention_heads", architecture)
    hidden = need(cfg, "hidden_size", architecture)
    family.setdefault("rope", rope_spec(cfg))
    return ModelArgs(
        vocab_size=need(cfg, "vocab_size", architecture),
        hidden_size=hidden,
        intermediate_size=need(cfg, "intermediate_size", architecture),
        num_layers=need(cfg, "num_hidden_layers", architecture),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", tie_default),
        architecture=architecture,
        **family)


def layer_windows(cfg: dict, default_types: Sequence[str] = ()) -> Tuple[int, ...]:
    """The sliding window of each layer (0 = full attention), () when no layer has one.

    `layer_types` in the config decides which layers slide; without it `default_types`
    (the family's pattern), and without that every layer does (Mistral, Phi-3)."""
    window = cfg.get("sliding_window")
    if not window or not cfg.get("use_sliding_window", True):
        return ()
    types = cfg.get("layer_types") or list(default_types)
    if not types:
        return (int(window),) * int(cfg["num_hidden_layers"])
    if len(types) != cfg["num_hidden_layers"]:
        raise ValueError(f"config.json: layer_types has {len(types)} entries for {cfg['num_hidden_layers']} layers")
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def activation(cfg: dict, architecture: str) -> str:
    """The MLP gate's activation as ModelArgs names it."""
    name = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"):
        return "gelu_tanh"
    raise ValueError(f"{architecture}: activation {name!r} is not supported (silu and tanh-GELU are)")
