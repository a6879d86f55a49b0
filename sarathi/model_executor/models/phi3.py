"""Phi-3 / Phi-3.5 / Phi-4-mini: checkpoints store qkv_proj and gate_up_proj fused (they
load into the shared decoder's fused layers as they are); partial rotary and LongRoPE
(su) factors come from the config; `sliding_window`, when set, applies to every layer."""
from __future__ import annotations

from sarathi.model_executor.models.decoder import ModelArgs
from sarathi.model_executor.models.hf_config import activation, common_args, layer_windows


def phi3_args(cfg: dict) -> ModelArgs:
    return common_args(cfg, "Phi3ForCausalLM", activation=activation(cfg, "Phi3ForCausalLM"),
                       sliding_windows=layer_windows(cfg))
