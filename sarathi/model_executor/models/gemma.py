"""Gemma 2 and Gemma 3 (text): (1 + w) RMSNorms before and after attention and the MLP,
tanh-GELU, embeddings scaled by sqrt(hidden), softmax scale from query_pre_attn_scalar,
interleaved sliding-window (local) and global layers. Gemma 2 soft-caps attention scores
and logits; Gemma 3 norms each head of q and k and gives local layers their own RoPE base."""
from __future__ import annotations

from sarathi.model_executor.layers.rope import rope_spec
from sarathi.model_executor.models.decoder import ModelArgs
from sarathi.model_executor.models.hf_config import activation, common_args, layer_windows, need


def _pattern(cfg: dict, every: int):
    """Gemma's default layer types: every `every`-th layer global, the others local."""
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(cfg.get("num_hidden_layers", 0))]


def _gemma(cfg: dict, architecture: str, every: int, **family) -> ModelArgs:
    hidden = need(cfg, "hidden_size", architecture)
    return common_args(
        cfg, architecture, tie_default=True, activation=activation(cfg, architecture), norm_unit_offset=True,
        sandwich_norms=True, embed_scale=hidden ** 0.5,
        query_pre_attn_scalar=need(cfg, "query_pre_attn_scalar", architecture),
        final_logit_softcap=cfg.get("final_logit_softcapping") or 0.0,
        sliding_windows=layer_windows(cfg, _pattern(cfg, every)), **family)


def gemma2_args(cfg: dict) -> ModelArgs:
    return _gemma(cfg, "Gemma2ForCausalLM", 2, attn_logit_softcap=cfg.get("attn_logit_softcapping") or 0.0)


def gemma3_args(cfg: dict) -> ModelArgs:
    """Gemma 3 text. Its global layers read rope_theta / rope_scaling (or rope_parameters'
    full_attention), the local ones rope_local_base_freq (or rope_parameters' sliding_attention).
    Transformers does not soft-cap Gemma 3's attention, whatever the config says; neither do we."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        global_rope = rope_spec(cfg, params=params["full_attention"])
        local_rope = rope_spec(cfg, params=params.get("sliding_attention") or {"rope_theta": 10000.0})
    else:
        global_rope = rope_spec(dict(cfg, rope_theta=cfg.get("rope_theta", 1_000_000.0)))
        local_rope = rope_spec(cfg, theta=cfg.get("rope_local_base_freq", 10000.0), params={})
    return _gemma(cfg, "Gemma3ForCausalLM", cfg.get("sliding_window_pattern", 6), qk_norm=True,
                  rope=global_rope, sliding_rope=local_rope)
