"""Read a GPTQ-v1 / AWQ-GEMM checkpoint back into float weights (a reference for loaders' tests)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from sarathi.quantize.packing import dequantize_checkpoint_tensor


def read_quantization_config(model_dir) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not qc or qc.get("quant_method") not in ("gptq", "awq"):
        raise ValueError(f"{model_dir}: config.json has no gptq/awq quantization_config")
    return qc


def load_safetensors_dir(model_dir) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def dequantize_checkpoint(model_dir, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """An HF-style float state dict: every `{p}.qweight/qzeros/scales[/g_idx]` becomes `{p}.weight`."""
    qc = read_quantization_config(model_dir)
    fmt = qc["quant_method"]
    bits = int(qc["bits"])
    gs = int(qc.get("group_size", -1))
    tensors = load_safetensors_dir(model_dir)
    out: Dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            p = key[: -len(".qweight")]
            out[f"{p}.weight"] = dequantize_checkpoint_tensor(
                t, tensors[f"{p}.qzeros"], tensors[f"{p}.scales"], tensors.get(f"{p}.g_idx"),
                bits=bits, fmt=fmt, group_size=gs).to(dtype)
        elif key.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        else:
            out[key] = t.to(dtype) if t.is_floating_point() else t
    return out


def load_dequantized_model(model_dir, dtype: torch.dtype = torch.float32):
    """HF `LlamaForCausalLM` holding the dequantized weights (no quantization packages needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for k in ("quantization_config", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()
    state = dequantize_checkpoint(model_dir, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: missing tensors {missing}, unexpected tensors {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model
