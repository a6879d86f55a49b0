"""The Llama family (Llama 2/3, SmolLM2) and Mistral (Llama with a sliding window).

The math is the shared decoder (decoder.py); this module reads their configs.
"""
from __future__ import annotations

from sarathi.model_executor.layers.norm import RMSNorm  # noqa: F401  (older callers import these here)
from sarathi.model_executor.layers.rope import apply_rope  # noqa: F401
from sarathi.model_executor.models.decoder import AttendFn, DecoderLM, ModelArgs  # noqa: F401
from sarathi.model_executor.models.hf_config import common_args, layer_windows

LlamaArgs = ModelArgs  # the name callers of the Llama-only engine used; from_hf_config reads any family


def llama_args(cfg: dict) -> ModelArgs:
    bias = cfg.get("attention_bias", False)
    return common_args(cfg, "LlamaForCausalLM", qkv_bias=bias, o_bias=bias, mlp_bias=cfg.get("mlp_bias", False))


def mistral_args(cfg: dict) -> ModelArgs:
    """Mistral: Llama's layers; `sliding_window` (when set) applies to every layer."""
    return common_args(cfg, "MistralForCausalLM", sliding_windows=layer_windows(cfg))


LlamaForCausalLM = DecoderLM  # the shared decoder with plain RMSNorm and a SiLU MLP
