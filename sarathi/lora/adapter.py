"""Reading a PEFT LoRA adapter directory, as `peft` writes it, into plain tensors.

An adapter is `adapter_config.json` + `adapter_model.safetensors`. Each adapted linear layer
W [out, in] gets `lora_A.weight` [r, in] and `lora_B.weight` [out, r]; the layer's output
becomes x W^T + scaling * (x A^T) B^T with scaling = lora_alpha / r (lora_alpha / sqrt(r) with
rsLoRA). Only safetensors is read: a pickled `adapter_model.bin` is refused, never loaded.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

# The linear layers of a Llama decoder layer, by the names PEFT's target_modules use.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """The adapter cannot be served: bad files, unsupported options, or a mismatch with the model."""


@dataclass
class LoRAAdapter:
    """One adapter's weights: (layer, module) -> (A [r, in], B [out, r] already times scaling)."""

    name: str
    path: str
    rank: int
    weights: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    base_model: Optional[str] = None

    @property
    def target_modules(self) -> Tuple[str, ...]:
        return tuple(sorted({m for _, m in self.weights}))

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern: a regex (or suffix) of the module name -> value."""
    for pattern, value in (patterns or {}).items():
        if re.search(rf"(^|\.){pattern}$", key) or re.fullmatch(pattern, key):
            return value
    return default


def read_adapter_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"LoRA adapter {str(path)!r} is not a directory")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"LoRA adapter {str(path)!r} has no adapter_config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"LoRA adapter {str(path)!r}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"LoRA adapter {str(path)!r}: adapter_config.json must be an object")
    return cfg


def load_adapter(name: str, path, num_layers: int, shapes: Dict[str, Tuple[int, int]], max_rank: int) -> LoRAAdapter:
    """Read and check an adapter against the model: `shapes` maps module name -> (in, out)."""
    path = Path(path).expanduser()
    cfg = read_adapter_config(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"LoRA adapter {str(path)!r} has only adapter_model.bin (a pickle, which is never "
                               "loaded); save it with safetensors (peft's default: save_pretrained(..., "
                               "safe_serialization=True))")
        raise AdapterError(f"LoRA adapter {str(path)!r} has no adapter_model.safetensors")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {str(path)!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for option, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(option) == bad:
            raise AdapterError(f"LoRA adapter {str(path)!r}: {option}={bad} is not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"LoRA adapter {str(path)!r}: modules_to_save {cfg['modules_to_save']} (fully trained "
                           "copies of layers) is not supported; merge the adapter instead (sarathi lora merge)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"LoRA adapter {str(path)!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))

    from safetensors import safe_open

    pairs: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise AdapterError(f"LoRA adapter {str(path)!r}: tensor {key!r} is not a LoRA weight of a "
                                       f"decoder layer's {'/'.join(LLAMA_LINEARS)} (unsupported target)")
                layer, module, which = int(m.group(1)), m.group(3), m.group(4)
                if module not in shapes:
                    raise AdapterError(f"LoRA adapter {str(path)!r} targets {module!r}, which this model lacks "
                                       f"(it has {', '.join(shapes)})")
                if layer >= num_layers:
                    raise AdapterError(f"LoRA adapter {str(path)!r} targets layer {layer}; the model has "
                                       f"{num_layers}")
                pairs.setdefault((layer, module), {})[which] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise AdapterError(f"LoRA adapter {str(path)!r}: cannot read adapter_model.safetensors ({e})") from None
    if not pairs:
        raise AdapterError(f"LoRA adapter {str(path)!r} holds no LoRA weights")

    adapter = LoRAAdapter(name, str(path), 0, base_model=cfg.get("base_model_name_or_path"))
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter {str(path)!r}: {where} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"].float(), ab["B"].float()
        n_in, n_out = shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape != (n_out, r):
            raise AdapterError(f"LoRA adapter {str(path)!r}: {where} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                               f"the model's layer needs A [r, {n_in}] and B [{n_out}, r]")
        if r > max_rank:
            raise AdapterError(f"LoRA adapter {str(path)!r} has rank {r} at {where}, above --max-lora-rank "
                               f"{max_rank}")
        key = f"model.layers.{layer}.{'self_attn' if module in LLAMA_LINEARS[:4] else 'mlp'}.{module}"
        rank = _pattern_value(cfg.get("rank_pattern"), key, r_default)
        alpha = _pattern_value(cfg.get("alpha_pattern"), key, alpha_default)
        if rank != r:
            raise AdapterError(f"LoRA adapter {str(path)!r}: {where} has rank {r}, adapter_config.json says {rank}")
        scaling = alpha / (math.sqrt(r) if rslora else r)
        if not all(torch.isfinite(t).all() for t in (a, b)):
            raise AdapterError(f"LoRA adapter {str(path)!r}: {where} has non-finite weights")
        adapter.weights[(layer, module)] = (a.contiguous(), (b * scaling).contiguous())
        adapter.rank = max(adapter.rank, r)
    return adapter


def iter_delta_weights(adapter: LoRAAdapter) -> Iterable[Tuple[int, str, torch.Tensor]]:
    """(layer, module, scaling * B A [out, in]): what merging adds to each weight."""
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        yield layer, module, b @ a
