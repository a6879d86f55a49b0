"""The supported model families and how a config picks one.

`model_args(hf_config)` reads any supported config.json into `ModelArgs`;
`build_model(args)` makes the (empty) model. The architecture comes from
`architectures` (or, without it, `model_type`); GGUF files name theirs in
`general.architecture` and the loader maps it to the same table.
"""
from __future__ import annotations

from typing import Callable, Dict

from sarathi.model_executor.models.decoder import DecoderLM, ModelArgs
from sarathi.model_executor.models.gemma import gemma2_args, gemma3_args
from sarathi.model_executor.models.llama import llama_args, mistral_args
from sarathi.model_executor.models.phi3 import phi3_args
from sarathi.model_executor.models.qwen import qwen2_args, qwen3_args

# architecture in config.json -> (model_type, config reader)
ARCHITECTURES: Dict[str, tuple] = {
    "LlamaForCausalLM": ("llama", llama_args),
    "MistralForCausalLM": ("mistral", mistral_args),
    "Qwen2ForCausalLM": ("qwen2", qwen2_args),
    "Qwen3ForCausalLM": ("qwen3", qwen3_args),
    "Gemma2ForCausalLM": ("gemma2", gemma2_args),
    "Gemma3ForCausalLM": ("gemma3_text", gemma3_args),
    "Phi3ForCausalLM": ("phi3", phi3_args),
}
# general.architecture as llama.cpp's converter writes it -> the HF architecture it is read as
# (Mistral is written as "llama").
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                      "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
_BY_MODEL_TYPE: Dict[str, str] = {t: arch for arch, (t, _) in ARCHITECTURES.items()}


def architecture(hf_config: dict) -> str:
    """The supported architecture a config names, or a one-line error listing them."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name
    if not names and hf_config.get("model_type", "llama") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf_config.get("model_type", "llama")]
    raise ValueError(f"unsupported architecture {names[0] if names else None!r} (model_type "
                     f"{hf_config.get('model_type')!r}); supported: {', '.join(ARCHITECTURES)}")


def model_args(hf_config: dict) -> ModelArgs:
    """The ModelArgs of any supported architecture (sizes a model's weights and KV)."""
    reader: Callable[[dict], ModelArgs] = ARCHITECTURES[architecture(hf_config)][1]
    return reader(hf_config)


def build_model(args: ModelArgs) -> DecoderLM:
    """Every family is the shared decoder; its args say which parts it uses."""
    return DecoderLM(args)


__all__ = ["ARCHITECTURES", "GGUF_ARCHITECTURES", "DecoderLM", "ModelArgs", "architecture", "build_model", "model_args"]
