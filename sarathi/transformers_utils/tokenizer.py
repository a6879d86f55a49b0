"""Load the tokenizer of a model directory: the HF tokenizer, or an AdaptiVocab
PatchTokenizer when one is given or the directory is a patched model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def get_tokenizer(model_dir: Path, patch_tokenizer: Optional[str] = None):
    if patch_tokenizer is None:
        try:
            import adaptivocab
        except ImportError:
            adaptivocab = None
        if adaptivocab is not None and hasattr(adaptivocab, "is_patch_tokenizer_dir") \
                and adaptivocab.is_patch_tokenizer_dir(model_dir):
            patch_tokenizer = str(model_dir)
    if patch_tokenizer is not None:
        path = Path(patch_tokenizer).expanduser()
        if not path.is_dir():
            raise ValueError(f"patch tokenizer directory {patch_tokenizer!r} does not exist")
        from adaptivocab import PatchTokenizer

        return PatchTokenizer.from_pretrained(str(path))
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise ValueError(f"model directory {str(model_dir)!r} has no tokenizer.json or tokenizer.model")
    return AutoTokenizer.from_pretrained(str(model_dir))
