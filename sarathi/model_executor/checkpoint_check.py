"""Safetensors checkpoints and their config.json read as a parser would, before any tensor is loaded.

`check_safetensors(path)` reads the 8-byte header length and the JSON header with every field
bounded against the file (dtype known, shape non-negative and small, byte ranges inside the data,
matching the shape, not overlapping). `check_model_dir(model_dir, hf_config)` checks the
hyperparameters a model is built from (integers in sane ranges: a `num_hidden_layers` of 2^31-1
never reaches an allocation), cross-checks them with the tensors the headers name, and for a
GPTQ / AWQ checkpoint checks `quantization_config` and the packed tensors' dtypes and shapes,
including a `gptq_v2` label on v1 data (or the reverse) where the data shows it. Each failure is
one ValueError line naming the file and the field.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

MAX_HEADER_BYTES = 100 << 20
MAX_RANK = 8
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
CONFIG_LIMITS = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 24),
    "head_dim": (1, 1 << 12),
}
_LAYER = re.compile(r"^model\.layers\.(\d{1,6})\.")
Header = Dict[str, Tuple[str, List[int]]]


def safetensors_files(model_dir: Path):
    """The weight files of an HF-style directory: a sharded index's files, or every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors weights (pickle checkpoints are not loaded)")
    return [model_dir / name for name in files]


def _int_field(where: str, field: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {field} must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise ValueError(f"{where}: {field} {value} is not in [{low}, {high}]")
    return value


def check_safetensors(path: Union[str, Path]) -> Header:
    """Validate a .safetensors file's header; return {tensor name: (dtype, shape)}."""
    path = Path(path)
    where = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{where}: safetensors header length: the file is {size} bytes, shorter than 8")
            n = struct.unpack("<Q", head)[0]
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{where}: safetensors header length {n} exceeds the file ({size} bytes) or "
                                 f"the limit {MAX_HEADER_BYTES}")
            raw = f.read(n)
    except OSError as e:
        raise ValueError(f"{where}: cannot read the safetensors file ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{where}: safetensors header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    out: Header = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ValueError(f"{where}: safetensors __metadata__ must map strings to strings")
            continue
        field = f"tensor {name[:200]!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: {field} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{where}: {field} dtype {str(dtype)[:40]!r} is not a known safetensors dtype")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape):
            raise ValueError(f"{where}: {field} shape {json.dumps(shape)[:80]} is not a list of at most {MAX_RANK} "
                             "non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]
                <= data_size):
            raise ValueError(f"{where}: {field} data_offsets {json.dumps(offsets)[:80]} are not a range inside the "
                             f"{data_size} data bytes")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where}: {field} data_offsets span {offsets[1] - offsets[0]} bytes, its {dtype} "
                             f"shape {shape} needs {nbytes}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (dtype, shape)
    end = 0
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise ValueError(f"{where}: tensor {name[:200]!r} data_offsets overlap another tensor's")
        end = max(end, stop)
    return out


def read_hf_config(model_dir: Union[str, Path]) -> dict:
    """config.json of `model_dir` as a dict, or ValueError naming the file."""
    path = Path(model_dir) / "config.json"
    try:
        if path.stat().st_size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: larger than {MAX_HEADER_BYTES} bytes")
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read the model config ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    qc = cfg.get("quantization_config")
    if qc is not None and not (isinstance(qc, dict) and isinstance(qc.get("quant_method", ""), str)):
        raise ValueError(f"{path}: quantization_config must be an object with a string quant_method")
    check_hf_config(str(path), cfg)
    return cfg


def check_hf_config(where: str, cfg: dict) -> None:
    """The hyperparameters a model of any supported family is built from: integers in range, consistent."""
    # Families name some fields otherwise: what is present is checked, nothing is required here.
    for key, (low, high) in CONFIG_LIMITS.items():
        if cfg.get(key) is not None:
            _int_field(where, key, cfg[key], low, high)
    heads = cfg.get("num_attention_heads") or 1
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if not cfg.get("head_dim") and (cfg.get("hidden_size") or heads) % heads:
        raise ValueError(f"{where}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads "
                         f"{heads}")
    for key in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                "attn_logit_softcapping", "final_logit_softcapping"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < 1e30):
            raise ValueError(f"{where}: {key} {json.dumps(value)[:40]} is not a positive finite number")
    _check_family_fields(where, cfg)


def _check_family_fields(where: str, cfg: dict) -> None:
    """The fields beyond Llama's that the families read (sliding windows, partial rotary)."""
    for key, high in (("sliding_window", 1 << 24), ("max_window_layers", 1024), ("sliding_window_pattern", 1024)):
        if cfg.get(key) is not None:
            _int_field(where, key, cfg[key], 1 if key != "max_window_layers" else 0, high)
    partial = cfg.get("partial_rotary_factor")
    if partial is not None and (isinstance(partial, bool) or not isinstance(partial, (int, float))
                                or not 0 < partial <= 1):
        raise ValueError(f"{where}: partial_rotary_factor {json.dumps(partial)[:40]} is not in (0, 1]")
    types = cfg.get("layer_types")
    if types is not None:
        n = cfg.get("num_hidden_layers")
        if not isinstance(types, list) or (isinstance(n, int) and len(types) != n) or not all(
                t in ("sliding_attention", "full_attention") for t in types):
            raise ValueError(f"{where}: layer_types must list 'sliding_attention' or 'full_attention' for each of "
                             f"the {n} layers")


def check_model_dir(model_dir: Union[str, Path], hf_config: dict) -> Header:
    """config.json against the safetensors headers of `model_dir`; returns the merged header."""

    model_dir = Path(model_dir)
    where = str(model_dir / "config.json")
    if not isinstance(hf_config, dict):
        raise ValueError(f"{where}: not a JSON object")
    check_hf_config(where, hf_config)
    tensors: Header = {}
    try:
        files = safetensors_files(model_dir)
    except (KeyError, TypeError, AttributeError, RecursionError):
        raise ValueError(f"{model_dir / 'model.safetensors.index.json'}: weight_map is not a map of tensor names "
                         "to file names") from None
    for path in files:
        if path.resolve().parent != model_dir.resolve():
            raise ValueError(f"{model_dir}: weight file {path.name!r} lies outside the model directory")
        tensors.update(check_safetensors(path))
    n_layers = hf_config.get("num_hidden_layers")
    named = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
    if n_layers is not None and named and named != set(range(n_layers)):
        raise ValueError(f"{where}: num_hidden_layers {n_layers}, but the weights name {len(named)} layers "
                         f"({min(named)}..{max(named)})")
    embed = tensors.get("model.embed_tokens.weight")
    want = [hf_config.get("vocab_size"), hf_config.get("hidden_size")]
    if embed is not None and None not in want and embed[1] != want:
        raise ValueError(f"{where}: model.embed_tokens.weight has shape {embed[1]}, config.json says "
                         f"[vocab_size, hidden_size] = {want}")
    if hf_config.get("quantization_config"):
        check_quantized(model_dir, hf_config, tensors)
    return tensors


def check_quantized(model_dir: Path, hf_config: dict, tensors: Header) -> None:
    """quantization_config, the packed tensors' dtypes and shapes, and the GPTQ v1 / v2 label."""
    where = str(model_dir / "config.json")
    qc = hf_config["quantization_config"]
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        return  # pick_quantization names the unsupported method
    bits = _int_field(where, "quantization_config.bits", qc.get("bits", 4), 2, 8)
    group = _int_field(where, "quantization_config.group_size", qc.get("group_size", 128), -1, 1 << 20)
    fmt = qc.get("checkpoint_format", "gptq")
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{where}: quantization_config.checkpoint_format {str(fmt)[:40]!r} is not gptq or gptq_v2")
    per = 32 // bits
    for name, (dtype, shape) in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in ("qweight", "qzeros", "scales", "g_idx"):
            continue
        field = f"tensor {name[:200]}"
        ok = {"qweight": ("I32",), "qzeros": ("I32",), "scales": ("F16", "BF16", "F32"), "g_idx": ("I32", "I64")}
        if dtype not in ok[leaf] or len(shape) != (1 if leaf == "g_idx" else 2):
            raise ValueError(f"{where}: {field} is {dtype} {shape}; a {method} {leaf} is {'/'.join(ok[leaf])} "
                             f"with {1 if leaf == 'g_idx' else 2} dimensions")
        if leaf != "qweight":
            continue
        parts = {k: tensors.get(f"{prefix}.{k}") for k in ("qzeros", "scales", "g_idx")}
        if parts["qzeros"] is None or parts["scales"] is None:
            raise ValueError(f"{where}: {field} has no {'qzeros' if parts['qzeros'] is None else 'scales'}")
        k, n = (shape[0] * per, shape[1]) if method == "gptq" else (shape[0], shape[1] * per)
        groups = 1 if group == -1 else (k // group if group > 0 and k % group == 0 else -1)
        if groups < 1 or parts["scales"][1] != [groups, n] or parts["qzeros"][1] != [groups, n // per] \
                or (parts["g_idx"] is not None and parts["g_idx"][1] != [k]):
            raise ValueError(f"{where}: {field} {shape}, qzeros {parts['qzeros'][1]}, scales {parts['scales'][1]}"
                             f" and g_idx {parts['g_idx'] and parts['g_idx'][1]} do not describe one {bits}-bit "
                             f"layer of group size {group}")
    if method == "gptq":
        _check_gptq_label(model_dir, qc, fmt, bits, tensors)


def _check_gptq_label(model_dir: Path, qc: dict, fmt: str, bits: int, tensors: Header) -> None:
    """GPTQ v1 stores zero - 1, v2 the zero: a wrong label shifts every weight by one step."""
    where = str(model_dir / "config.json")
    side = model_dir / "quantize_config.json"
    if side.is_file():
        try:
            other = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            raise ValueError(f"{side}: not valid JSON") from None
        other_fmt = other.get("checkpoint_format", "gptq") if isinstance(other, dict) else None
        if other_fmt in ("gptq", "gptq_v2") and other_fmt != fmt:
            raise ValueError(f"{where}: quantization_config.checkpoint_format {fmt!r} contradicts {side.name}'s "
                             f"{other_fmt!r}")
    quantizer = (qc.get("meta") or {}).get("quantizer") if isinstance(qc.get("meta"), dict) else None
    if fmt == "gptq_v2" and isinstance(quantizer, list) and "sarathi-quantize" in quantizer:
        raise ValueError(f"{where}: quantization_config.checkpoint_format 'gptq_v2', but sarathi-quantize writes "
                         "GPTQ v1 (zero - 1) only")
    if qc.get("sym") is True:
        zeros = _stored_zeros(model_dir, tensors, bits)
        if zeros is not None:
            v1, v2 = (1 << (bits - 1)) - 1, 1 << (bits - 1)   # symmetric: every stored zero is one of these
            if fmt == "gptq_v2" and zeros == {v1}:
                raise ValueError(f"{where}: quantization_config.checkpoint_format 'gptq_v2', but the symmetric "
                                 f"zeros are stored as {v1} (v1's zero - 1): the checkpoint is GPTQ v1")
            if fmt == "gptq" and zeros == {v2}:
                raise ValueError(f"{where}: quantization_config.checkpoint_format 'gptq' (v1), but the symmetric "
                                 f"zeros are stored as {v2} (v2's zero): the checkpoint is GPTQ v2")


def _stored_zeros(model_dir: Path, tensors: Header, bits: int) -> Optional[set]:
    """The distinct stored zero codes of the first qzeros tensor (one small read)."""
    from safetensors import safe_open


    name = next((k for k in sorted(tensors) if k.endswith(".qzeros")), None)
    if name is None:
        return None
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():
                words = f.get_tensor(name).reshape(-1).tolist()
                mask = (1 << bits) - 1
                return {(w >> s) & mask for w in words for s in range(0, 32, bits)}
    return None
