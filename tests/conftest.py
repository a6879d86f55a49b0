"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer, and the real SmolLM2."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Keep the test suite's model cache inside the repo checkout unless the user set one.
os.environ.setdefault("SARATHI_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "sarathi"))
# Every Ray instance of the tests stays on 127.0.0.1. Ray reads this when it is imported, so it is set
# here, before any test module imports Ray (see sarathi/engine/ray_replica.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from sarathi.model_executor.model_loader import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")


def make_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random LlamaForCausalLM (HF format) with the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def hf_tiny(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_model_dir)).float().eval()


def hf_greedy(model, prompt_ids, max_new_tokens):
    """Token-by-token greedy reference (full forward each step, EOS not special)."""
    import torch

    ids = list(prompt_ids)
    out, logprobs = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(logits.argmax())
            out.append(t)
            logprobs.append(float(lp[t]))
            ids.append(t)
    return out, logprobs
