"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head RMSNorm on q and k, no biases)."""
from __future__ import annotations

from sarathi.model_executor.models.decoder import ModelArgs
from sarathi.model_executor.models.hf_config import common_args, layer_windows


def _windows(cfg: dict):
    # Without layer_types, the layers from max_window_layers on slide (when use_sliding_window).
    n = cfg.get("num_hidden_layers", 0)
    first = cfg.get("max_window_layers", n)
    return layer_windows(cfg, ["sliding_attention" if i >= first else "full_attention" for i in range(n)])


def qwen2_args(cfg: dict) -> ModelArgs:
    return common_args(cfg, "Qwen2ForCausalLM", qkv_bias=True, sliding_windows=_windows(cfg))


def qwen3_args(cfg: dict) -> ModelArgs:
    bias = cfg.get("attention_bias", False)
    return common_args(cfg, "Qwen3ForCausalLM", qkv_bias=bias, o_bias=bias, qk_norm=True,
                       sliding_windows=_windows(cfg))
