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
# Checkpoints that store these fused (Phi-3) get adapters on the fused module: one A, one B
# over the parts' outputs. Split by B's rows they are the parts' own adapters (the same A).
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d{1,6})\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
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


MAX_CONFIG_BYTES = 1 << 20
MAX_PATH_CHARS = 4096
MAX_RANK = 4096
MAX_ALPHA = 1e6
# |scaling * (B A)[i, j]| <= r * max|A| * max|scaling * B|: above this the update overflows activations.
MAX_DELTA_BOUND = 1e4


def _shown(path) -> str:
    """A path for an error line: long ones cut, so the message stays one readable line."""
    text = str(path)
    return repr(text if len(text) <= 200 else text[:100] + "..." + text[-60:])


def _pattern_value(patterns: Dict[str, object], key: str, default):
    """PEFT's rank_pattern / alpha_pattern: a regex (or suffix) of the module name -> value."""
    for pattern, value in patterns.items():
        if re.search(rf"(^|\.){pattern}$", key) or re.fullmatch(pattern, key):
            return value
    return default


def _number(where: str, field: str, value, integer: bool, high: float):
    """A JSON number of the config, checked: not a bool or string, finite, in (0, high]."""
    kind = "integer" if integer else "number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise AdapterError(f"LoRA adapter {where}: adapter_config.json {field} must be a{'n' * integer} {kind}, "
                           f"got {json.dumps(value)[:40]}")
    if not (math.isfinite(value) and 0 < value <= high):
        raise AdapterError(f"LoRA adapter {where}: adapter_config.json {field} {value} is not a finite {kind} in "
                           f"(0, {high:g}]")
    return value


def _patterns(where: str, field: str, value, integer: bool, high: float) -> Dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(f"LoRA adapter {where}: adapter_config.json {field} must be an object of "
                           f"{{module regex: value}}, got {type(value).__name__}")
    for pattern, v in value.items():
        _regex(where, f"{field} key", pattern)
        _number(where, f"{field}[{pattern[:40]!r}]", v, integer, high)
    return value


def _regex(where: str, field: str, pattern: str) -> None:
    if len(pattern) > 1000:
        raise AdapterError(f"LoRA adapter {where}: adapter_config.json {field} is longer than 1000 characters")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"LoRA adapter {where}: adapter_config.json {field} {pattern[:40]!r} is not a valid "
                           f"regular expression ({e})") from None


@dataclass
class AdapterOptions:
    """The options of adapter_config.json that serving uses, each checked."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Dict[str, object]
    alpha_pattern: Dict[str, object]


def adapter_options(cfg: dict, where: str) -> AdapterOptions:
    """Check every field of adapter_config.json serving reads; AdapterError names the field."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {where}: peft_type {str(cfg.get('peft_type'))[:40]!r} is not LORA")
    for option in ("use_dora", "fan_in_fan_out", "use_rslora"):
        if not isinstance(cfg.get(option, False), bool):
            raise AdapterError(f"LoRA adapter {where}: adapter_config.json {option} must be true or false")
        if option != "use_rslora" and cfg.get(option):
            raise AdapterError(f"LoRA adapter {where}: {option}=True is not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"LoRA adapter {where}: modules_to_save (fully trained copies of layers) is not "
                           "supported; merge the adapter instead (sarathi lora merge)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"LoRA adapter {where}: bias={str(cfg['bias'])[:40]!r} is not supported (only 'none')")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        _regex(where, "target_modules", targets)
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(f"LoRA adapter {where}: adapter_config.json target_modules must be a regex string or a "
                           "list of module names")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"LoRA adapter {where}: adapter_config.json base_model_name_or_path must be a string")
    return AdapterOptions(
        r=_number(where, "r", cfg.get("r", 8), True, MAX_RANK),
        lora_alpha=_number(where, "lora_alpha", cfg.get("lora_alpha", 8), False, MAX_ALPHA),
        use_rslora=cfg.get("use_rslora", False),
        rank_pattern=_patterns(where, "rank_pattern", cfg.get("rank_pattern"), True, MAX_RANK),
        alpha_pattern=_patterns(where, "alpha_pattern", cfg.get("alpha_pattern"), False, MAX_ALPHA))


def _adapter_dir(path) -> Path:
    text = str(path)
    if len(text) > MAX_PATH_CHARS or "\x00" in text:
        raise AdapterError(f"LoRA adapter path {_shown(text)} is longer than {MAX_PATH_CHARS} characters or holds "
                           "a NUL")
    try:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise AdapterError(f"LoRA adapter {_shown(path)} is not a directory")
    except OSError as e:  # a component too long, a loop of links, no permission
        raise AdapterError(f"LoRA adapter {_shown(text)}: {e.strerror or e}") from None
    return path


def read_adapter_config(path: Path) -> dict:
    path = _adapter_dir(path)
    cfg_file = path / "adapter_config.json"
    try:
        if not cfg_file.is_file():
            raise AdapterError(f"LoRA adapter {_shown(path)} has no adapter_config.json")
        if cfg_file.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"LoRA adapter {_shown(path)}: adapter_config.json is larger than "
                               f"{MAX_CONFIG_BYTES} bytes")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, AdapterError):
            raise
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise AdapterError(f"LoRA adapter {_shown(path)}: adapter_config.json is not valid JSON ({reason})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"LoRA adapter {_shown(path)}: adapter_config.json must be an object")
    return cfg


def load_adapter(name: str, path, num_layers: int, shapes: Dict[str, Tuple[int, int]], max_rank: int) -> LoRAAdapter:
    """Read and check an adapter against the model: `shapes` maps module name -> (in, out)."""
    from sarathi.model_executor.checkpoint_check import check_safetensors

    path = _adapter_dir(path)
    where = _shown(path)
    cfg = read_adapter_config(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"LoRA adapter {where} has only adapter_model.bin (a pickle, which is never "
                               "loaded); save it with safetensors (peft's default: save_pretrained(..., "
                               "safe_serialization=True))")
        raise AdapterError(f"LoRA adapter {where} has no adapter_model.safetensors")
    opts = adapter_options(cfg, where)
    try:
        header = check_safetensors(weights_file)
    except ValueError as e:
        raise AdapterError(f"LoRA adapter {where}: cannot read adapter_model.safetensors: {e}") from None

    from safetensors import safe_open

    shapes = dict(shapes)
    for fused, parts in FUSED_TARGETS.items():
        if all(p in shapes for p in parts):
            shapes[fused] = (shapes[parts[0]][0], sum(shapes[p][1] for p in parts))
    pairs: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, (dtype, shape) in header.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"LoRA adapter {where}: tensor {key[:200]!r} is not a LoRA weight of a "
                               f"decoder layer's {'/'.join(LLAMA_LINEARS)} (unsupported target)")
        layer, module, which = int(m.group(1)), m.group(3), m.group(4)
        if module not in shapes:
            raise AdapterError(f"LoRA adapter {where} targets {module!r}, which this model lacks "
                               f"(it has {', '.join(shapes)})")
        if layer >= num_layers:
            raise AdapterError(f"LoRA adapter {where} targets layer {layer}; the model has {num_layers}")
        n_in, n_out = shapes[module]
        if dtype not in ("F16", "BF16", "F32", "F64") or len(shape) != 2 \
                or shape[1 if which == "A" else 0] != (n_in if which == "A" else n_out):
            raise AdapterError(f"LoRA adapter {where}: tensor {key} is {dtype} {shape}; the model's "
                               f"layers.{layer}.{module} needs float A [r, {n_in}] and B [{n_out}, r]")
        r = shape[0 if which == "A" else 1]
        if r > max_rank:
            raise AdapterError(f"LoRA adapter {where} has rank {r} at layers.{layer}.{module}, above "
                               f"--max-lora-rank {max_rank}")
        pairs.setdefault((layer, module), {})[which] = key
    if not pairs:
        raise AdapterError(f"LoRA adapter {where} holds no LoRA weights")

    adapter = LoRAAdapter(name, str(path), 0, base_model=cfg.get("base_model_name_or_path"))
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for (layer, module), keys in sorted(pairs.items()):
                where_layer = f"layers.{layer}.{module}"
                if set(keys) != {"A", "B"}:
                    raise AdapterError(f"LoRA adapter {where}: {where_layer} lacks "
                                       f"lora_{'B' if 'A' in keys else 'A'}")
                a, b = f.get_tensor(keys["A"]).float(), f.get_tensor(keys["B"]).float()
                a, b = _scaled(where, layer, module, opts, a, b)
                parts = FUSED_TARGETS.get(module, (module,))
                for part, b_part in zip(parts, b.split([shapes[p][1] for p in parts])):
                    if (layer, part) in adapter.weights:
                        raise AdapterError(f"LoRA adapter {where} adapts layers.{layer}.{part} twice (fused and "
                                           "alone)")
                    adapter.weights[(layer, part)] = (a, b_part.contiguous())
                adapter.rank = max(adapter.rank, a.shape[0])
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file the header check let through
        raise AdapterError(f"LoRA adapter {where}: cannot read adapter_model.safetensors "
                           f"({' '.join(str(e).split())[:200]})") from None
    return adapter


def _scaled(where: str, layer: int, module: str, opts: AdapterOptions, a: torch.Tensor, b: torch.Tensor):
    """(A, scaling * B) of one layer, after checking that the update it makes is finite and bounded."""
    where_layer = f"layers.{layer}.{module}"
    r = a.shape[0]
    if b.shape[1] != r:
        raise AdapterError(f"LoRA adapter {where}: {where_layer} has A {tuple(a.shape)} and B {tuple(b.shape)} "
                           "of different ranks")
    attn = module in LLAMA_LINEARS[:4] or module == "qkv_proj"
    key = f"model.layers.{layer}.{'self_attn' if attn else 'mlp'}.{module}"
    rank = _pattern_value(opts.rank_pattern, key, opts.r)
    alpha = _pattern_value(opts.alpha_pattern, key, opts.lora_alpha)
    if rank != r:
        raise AdapterError(f"LoRA adapter {where}: {where_layer} has rank {r}, adapter_config.json says {rank}")
    scaling = alpha / (math.sqrt(r) if opts.use_rslora else r)
    b = b * scaling  # the finiteness check sees what serving multiplies by
    bound = r * float(a.abs().max()) * float(b.abs().max()) if a.numel() and b.numel() else 0.0
    if not (math.isfinite(scaling) and bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise AdapterError(f"LoRA adapter {where}: {where_layer} has non-finite weights after scaling by "
                           f"lora_alpha / r = {scaling:g}")
    if not bound <= MAX_DELTA_BOUND:
        raise AdapterError(f"LoRA adapter {where}: {where_layer} would change weights by up to {bound:.3g} "
                           f"(r * max|A| * max|scaling * B|, limit {MAX_DELTA_BOUND:g}); the adapter is corrupt "
                           "or its lora_alpha is wrong")
    return a.contiguous(), b.contiguous()


def iter_delta_weights(adapter: LoRAAdapter) -> Iterable[Tuple[int, str, torch.Tensor]]:
    """(layer, module, scaling * B A [out, in]): what merging adds to each weight."""
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        yield layer, module, b @ a
