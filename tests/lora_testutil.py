"""Helpers for the LoRA tests: PEFT adapters on the tiny model, made by `peft` itself."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, seed: int, r: int = 8, alpha: int = 16,
                 targets: Sequence[str] = tuple(ALL_LINEARS), **extra) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False), saved as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base_dir)).float()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # keep the deltas moderate: outputs change, logits stay well conditioned
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(str(out))
    return out


def peft_model(base_dir: Path, adapter_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_dir)).float().eval()
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval().to(torch.float32)
