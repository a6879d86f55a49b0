"""Each family written as GGUF the way llama.cpp's converter writes it (gguf's own tensor-name
tables and metadata keys, the SmolLM2 file's tokenizer) gives the tokens transformers gives
for the same weights; Q8_0 blocks run through the quantized kernels."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import hf_greedy  # noqa: F401
from sarathi import LLM
from test_model_families import MAX_NEW, PROMPTS, assert_matches, family, run  # noqa: F401

GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "gemma2": "gemma2", "gemma3": "gemma3",
             "phi3": "phi3", "llama3": "llama"}


def _permute(w, heads):
    """llama.cpp's q/k row order for the llama architecture (rotary pairs interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, out, tokenizer_gguf, quant=None):
    """The tiny HF model in `model_dir` as a GGUF file, F32 tensors (or `quant` for 2-D ones)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = GGUF_ARCH[{"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral",
                      "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
                      "Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama3"}[cfg["architectures"][0]]]
    heads, kv, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg["rope_parameters"]
    rope = rope.get("full_attention", rope)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope["rope_theta"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch == "gemma3":
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    tensors = {}
    if rope.get("rope_type") == "llama3":  # the converter's rope_freqs: one divisor per frequency
        inv = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
        wavelen = 2 * math.pi / inv
        low, high = rope["original_max_position_embeddings"] / np.array([rope["low_freq_factor"],
                                                                          rope["high_freq_factor"]])
        smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
            rope["high_freq_factor"] - rope["low_freq_factor"])
        factors = np.where(wavelen < high, 1.0, np.where(wavelen > low, rope["factor"],
                                                         1 / ((1 - smooth) / rope["factor"] + smooth)))
        tensors["rope_freqs.weight"] = factors.astype(np.float32)
    if arch == "phi3":
        rot = int(head_dim * rope["partial_rotary_factor"])
        w.add_rope_dimension_count(rot)
        orig = rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        scale = cfg["max_position_embeddings"] / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
        tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    reader = gguf.GGUFReader(str(tokenizer_gguf))
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    names = gguf.TensorNameMap({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], layers)
    for hf, t in load_file(str(model_dir / "model.safetensors")).items():
        base, suffix = hf.rsplit(".", 1)
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            t = _permute(t, heads if "q_proj" in hf else kv)
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            t = t + 1
        tensors[f"{names.get_name(base)}.{suffix}"] = t.astype(np.float32)
    for name, t in tensors.items():
        if quant is not None and t.ndim == 2 and name != "token_embd.weight":
            w.add_tensor(name, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("name", list(GGUF_ARCH))
def test_gguf_family_gives_the_same_tokens(name, family, tmp_path, smollm2_dir, monkeypatch):
    from sarathi.model_executor.model_loader import _embedded_smollm2

    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path / "cache"))
    d, refs = family(name)
    path = write_gguf(d, tmp_path / f"{name}.gguf", _embedded_smollm2())
    llm = LLM(model=str(path), quantization="none", chunk_size=16, max_model_len=256, max_num_seqs=4,
              kv_cache_memory="32MiB")
    assert_matches(run(llm, PROMPTS), refs)


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_gguf_q8_0_runs_quantized(name, family, tmp_path, monkeypatch):
    """Q8_0 blocks computed in place: the same model's float GGUF agrees on most greedy tokens."""
    import gguf

    from sarathi.model_executor.model_loader import _embedded_smollm2

    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path / "cache"))
    d, refs = family(name)
    path = write_gguf(d, tmp_path / f"{name}-q8.gguf", _embedded_smollm2(), quant=gguf.GGMLQuantizationType.Q8_0)
    llm = LLM(model=str(path), chunk_size=16, max_model_len=256, kv_cache_memory="32MiB")
    assert "gguf Q8_0" in llm.engine.runner.weight_formats()
    got = run(llm, PROMPTS)
    first = [tokens[0] for tokens, _ in got]
    assert sum(a == b[0][0] for a, b in zip(first, refs)) >= 2
