"""`--speculative-config`: vLLM's JSON keys, checked at start-up (no torch here)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

METHODS = ("ngram", "early_exit", "draft_model")
KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
        "disable_by_batch_size", "num_early_exit_layers")
MAX_SPECULATIVE_TOKENS = 16
# No drafts in a step of this many sequences or more unless the config says otherwise. On a CPU
# a step costs a fixed part plus a part per row (measured on the embedded model: 8.9 ms + 1.5 ms
# per row), and a verified position is a row: drafts at acceptance a pay only below the batch
# a * fixed / (per_row * (1 - a)), about 5 at prompt lookup's 44 % on open-ended text, 9 at 60 %,
# 17 at 74 % on copying text (benchmarks/spec_decode.py --step-cost; docs/speculative-decoding.md).
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    """How drafts are proposed. method: ngram (prompt lookup), early_exit (the served model's
    first `num_early_exit_layers` layers + final norm + LM head) or draft_model (`model`)."""

    method: str
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: Optional[str] = None
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    num_early_exit_layers: Optional[int] = None   # None: the default measured for the model (early_exit.py)

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in KEYS if getattr(self, k) is not None})


def _int(d: dict, key: str, minimum: int, maximum: Optional[int] = None) -> Optional[int]:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"--speculative-config: {key} must be an integer {bound}, got {value!r}")
    return value


def parse_speculative_config(value: Any) -> Optional[SpeculativeConfig]:
    """A JSON string, a dict or a SpeculativeConfig -> SpeculativeConfig (None / '' : off).
    Raises ValueError naming what is wrong."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not valid JSON ({e.msg} at character {e.pos}); "
                             f"expected e.g. '{{\"method\": \"ngram\", \"num_speculative_tokens\": 3}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"--speculative-config must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise ValueError(f"--speculative-config: unknown keys {unknown}; known: {', '.join(KEYS)}")
    method = value.get("method")
    if method not in METHODS:
        raise ValueError(f"--speculative-config: method must be one of {', '.join(METHODS)}, got {method!r}")
    k = _int(value, "num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
    lo = _int(value, "prompt_lookup_min", 1)
    hi = _int(value, "prompt_lookup_max", 1)
    if method == "ngram":
        lo = lo if lo is not None else 1
        hi = hi if hi is not None else max(lo, 4)
        if lo > hi:
            raise ValueError(f"--speculative-config: prompt_lookup_min ({lo}) > prompt_lookup_max ({hi})")
    elif lo is not None or hi is not None:
        raise ValueError("--speculative-config: prompt_lookup_min / prompt_lookup_max are ngram's keys")
    model = value.get("model")
    if method == "draft_model":
        if not isinstance(model, str) or not model:
            raise ValueError("--speculative-config: method draft_model needs \"model\" (a path or alias)")
    elif model is not None:
        raise ValueError(f"--speculative-config: \"model\" is draft_model's key, not {method}'s")
    layers = _int(value, "num_early_exit_layers", 1)
    if layers is not None and method != "early_exit":
        raise ValueError("--speculative-config: num_early_exit_layers is early_exit's key")
    disable = _int(value, "disable_by_batch_size", 1)
    return SpeculativeConfig(method, k if k is not None else 3, lo or 1, hi or 4, model,
                             disable if disable is not None else DEFAULT_DISABLE_BY_BATCH_SIZE, layers)
