"""Load the tokenizer of a model directory: the HF tokenizer, or an AdaptiVocab
PatchTokenizer when one is given or the directory is a patched model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def load_patch_tokenizer(model_dir: Path):
    """The PatchTokenizer of a patched model directory, or None when it is not one."""
    try:
        import adaptivocab
    except ImportError:
        return None
    if not adaptivocab.is_patch_tokenizer_dir(model_dir):
        return None
    return adaptivocab.PatchTokenizer.from_pretrained(str(model_dir))


def get_tokenizer(model_dir: Path, patch_tokenizer: Optional[str] = None):
    if patch_tokenizer is None:
        patched = load_patch_tokenizer(Path(model_dir))
        if patched is not None:
            return patched
    else:
        path = Path(patch_tokenizer).expanduser()
        if not path.is_dir():
            raise ValueError(f"patch tokenizer directory {patch_tokenizer!r} does not exist")
        from adaptivocab import PatchTokenizer

        return PatchTokenizer.from_pretrained(str(path))
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise ValueError(f"model directory {str(model_dir)!r} has no tokenizer.json or tokenizer.model")
    return AutoTokenizer.from_pretrained(str(model_dir))
