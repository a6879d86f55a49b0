"""`sarathi lora merge`: fold an adapter into its base with peft's merge_and_unload and write a
plain Hugging Face directory (config, safetensors weights, tokenizer) that `sarathi quantize`
and `sarathi serve` take as they take any model."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sarathi.lora.adapter import AdapterError, read_adapter_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def merge(base: str, adapter: str, out: str, overwrite: bool = False) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sarathi.model_executor.model_loader import resolve_model_dir

    model_dir = resolve_model_dir(base)
    adapter_dir = Path(adapter).expanduser()
    read_adapter_config(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise AdapterError(f"LoRA adapter {str(adapter_dir)!r} has no adapter_model.safetensors (a pickled "
                           "adapter_model.bin is never loaded)")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(out_dir)!r} is not empty (pass --overwrite)")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy(model_dir / name, out_dir / name)
    return out_dir
