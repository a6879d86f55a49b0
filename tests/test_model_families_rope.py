"""The RoPE scaling variants the supported configs use, against transformers' own RoPE
initialisers on the same config: inverse frequencies and the factor on cos / sin."""
from __future__ import annotations

import pytest
import torch

from sarathi.model_executor.layers.rope import rope_inv_freq, rope_spec

VARIANTS = {
    "default": ("LlamaConfig", {"rope_type": "default", "rope_theta": 50000.0}, {}),
    "linear": ("LlamaConfig", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, {}),
    "llama3": ("LlamaConfig", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 512, "rope_theta": 500000.0}, {}),
    "yarn": ("Qwen2Config", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                             "rope_theta": 1000000.0}, {}),
    "longrope": ("Phi3Config", {"rope_type": "longrope", "short_factor": [1.0 + 0.2 * i for i in range(16)],
                                "long_factor": [2.0 + i for i in range(16)], "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.5},
                 {"original_max_position_embeddings": 1024}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rope_matches_transformers(name):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cls, params, extra = VARIANTS[name]
    cfg = getattr(transformers, cls)(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                     max_position_embeddings=4096, rope_parameters=params, **extra)
    spec = rope_spec(cfg.to_dict())
    head_dim = 64
    inv, long, factor = rope_inv_freq(spec, head_dim)
    if name == "default":
        assert spec.scaling is None and spec.theta == 50000.0
        want = 1.0 / (50000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        assert torch.allclose(inv, want) and factor == 1.0
        return
    init = ROPE_INIT_FUNCTIONS[name]
    want, want_factor = init(cfg, torch.device("cpu"))
    assert torch.allclose(inv.float(), want.float(), rtol=1e-6), name
    assert factor == pytest.approx(want_factor)
    if name == "longrope":  # past the original context transformers switches to the long factors
        want_long, _ = init(cfg, torch.device("cpu"), seq_len=2048)
        assert torch.allclose(long.float(), want_long.float(), rtol=1e-6)


def test_unsupported_scaling_is_named():
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        rope_spec({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
