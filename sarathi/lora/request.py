"""`LoRARequest`: which adapter a request runs with (vLLM's spelling)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LoRARequest:
    """lora_name identifies the adapter; lora_path (a PEFT directory) loads it the first time the
    name is seen. lora_int_id is accepted for vLLM compatibility (names are the identity here)."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name or len(self.lora_name) > 256:
            raise ValueError("lora_name must be a non-empty string of at most 256 characters")
        try:
            self.lora_name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("lora_name must be valid Unicode (no lone surrogates)") from None

    # vLLM's older spelling
    @property
    def lora_local_path(self) -> Optional[str]:
        return self.lora_path
