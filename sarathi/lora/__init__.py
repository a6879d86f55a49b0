"""LoRA serving: PEFT adapters loaded, stacked and batched together unmerged (training: sarathi.lora_training)."""
from sarathi.lora.request import LoRARequest

__all__ = ["LoRARequest"]
