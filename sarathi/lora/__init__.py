"""LoRA: PEFT adapters served unmerged and batched together, and the train / merge CLI."""
from sarathi.lora.request import LoRARequest

__all__ = ["LoRARequest"]
