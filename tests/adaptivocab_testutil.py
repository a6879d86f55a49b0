"""Shared set-up for the AdaptiVocab tests: SmolLM2's tokenizer, stdlib text, tiny models."""
from __future__ import annotations

import functools
import json
import shutil
import sysconfig
from pathlib import Path

TRAIN_MODULES = ["argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "string.py", "dataclasses.py",
                 "pathlib.py", "shutil.py"]
HELDOUT_MODULES = ["shlex.py", "fnmatch.py", "glob.py", "contextlib.py"]


def stdlib_file(name: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / name


def stdlib_text(names) -> str:
    return "\n".join(stdlib_file(n).read_text(encoding="utf-8") for n in names)


@functools.lru_cache(maxsize=None)
def smollm2_dir() -> Path:
    """The embedded SmolLM2 as an HF-style directory (converted once by the engine's loader)."""
    from sarathi.model_executor.model_loader import resolve_model_dir

    return Path(resolve_model_dir("smollm2-135m-instruct"))


@functools.lru_cache(maxsize=None)
def small_patch_tokenizer(num_new_tokens: int = 300):
    from adaptivocab import PatchTokenizer

    files = [stdlib_file(n) for n in TRAIN_MODULES]
    return PatchTokenizer.build(str(smollm2_dir()), files, num_new_tokens=num_new_tokens, max_ngram=4,
                                show_progress=False)


def tiny_llama_dir(path: Path, tie: bool = True, seed: int = 0) -> Path:
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path))
    for f in smollm2_dir().iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy2(f, path / f.name)
    return path


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
