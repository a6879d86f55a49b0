"""Finding a base model directory and its HF tokenizer.

adaptivocab does not depend on the engine: an existing HF-style directory is used as
is, and only for a name or a GGUF file do we borrow the engine's converter, imported
lazily, so the package still works where sarathi is absent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union


def resolve_model_dir(name_or_path: Union[str, Path]) -> Path:
    """Return an HF-style directory for a directory, a GGUF file or a known model name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and not (path / "config.json").is_file():
            raise ValueError(f"directory {str(path)!r} has neither config.json nor tokenizer.json")
        return path
    try:
        from sarathi.model_executor.model_loader import resolve_model_dir as engine_resolve
    except ImportError:
        raise ValueError(
            f"model {str(name_or_path)!r} is not a directory, and converting names or GGUF files "
            f"needs the sarathi package, which is not importable") from None
    return Path(engine_resolve(str(name_or_path)))


def load_hf_tokenizer(model: Union[str, Path]):
    """The base model's fast (tokenizers-backed) HF tokenizer, read from disk only."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(model)
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"model directory {str(model_dir)!r} has no tokenizer.json (a fast BPE tokenizer is needed)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers / tokenizers raise many classes (even bare Exception) for bad files
        raise ValueError(f"cannot load the tokenizer of {str(model_dir)!r}: {e}") from None
