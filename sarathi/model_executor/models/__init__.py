"""Model architectures: the math of each family, chosen from a checkpoint's config."""
from __future__ import annotations


def model_args(hf_config: dict):
    """The architecture's arguments (layers, heads, head_dim, vocabulary) from config.json."""
    from sarathi.model_executor.models.llama import LlamaArgs

    return LlamaArgs.from_hf_config(hf_config)
