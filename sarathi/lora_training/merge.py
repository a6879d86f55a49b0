"""`sarathi lora merge`: fold an adapter into its base with peft's merge_and_unload and write a
plain Hugging Face directory (config, safetensors weights, tokenizer) that `sarathi quantize`
and `sarathi serve` take as they take any model."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from adaptivocab.outdir import check_output_dir, output_path, staged_output_dir
from sarathi.lora.adapter import AdapterError, read_adapter_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def merge(base: str, adapter: str, out: str, overwrite: bool = False) -> Path:
    """Write base + adapter merged into `out` (a fresh directory renamed into place; `overwrite`
    replaces only an earlier output of this project, never mixing old and new files)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sarathi.model_executor.model_loader import resolve_model_dir

    adapter_dir = Path(adapter).expanduser()
    inputs = [base, adapter_dir]
    check_output_dir(out, overwrite, inputs)  # before the model is read or a GGUF converted
    model_dir = resolve_model_dir(base)
    inputs.append(model_dir)
    read_adapter_config(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise AdapterError(f"LoRA adapter {str(adapter_dir)!r} has no adapter_model.safetensors (a pickled "
                           "adapter_model.bin is never loaded)")
    check_output_dir(out, overwrite, inputs)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with staged_output_dir(out, "lora-merge", overwrite, inputs) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy(model_dir / name, tmp / name)
    return output_path(out)
