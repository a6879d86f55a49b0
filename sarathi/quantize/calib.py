"""Calibration data: a local UTF-8 text file cut into seeded token windows."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List

import torch


class QuantizeError(ValueError):
    """A bad input to `sarathi quantize` (reported as `error: ...`, nothing written)."""


def read_calibration_text(path) -> str:
    """Read and check a calibration file: it must exist, be non-empty UTF-8 text without NUL bytes."""
    p = Path(path)
    if not p.exists():
        raise QuantizeError(f"calibration file {str(p)!r} does not exist")
    if not p.is_file():
        raise QuantizeError(f"calibration file {str(p)!r} is not a regular file")
    data = p.read_bytes()
    if not data.strip():
        raise QuantizeError(f"calibration file {str(p)!r} is empty")
    if b"\x00" in data:
        raise QuantizeError(f"calibration file {str(p)!r} looks binary (it contains NUL bytes); "
                            "pass a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise QuantizeError(f"calibration file {str(p)!r} is not UTF-8 text (invalid byte at offset "
                            f"{e.start}); pass a UTF-8 text file") from None


def load_token_encoder(model_dir: Path) -> Callable[[List[str]], List[List[int]]]:
    """A batch encoder (no special tokens): the model's AdaptiVocab patch tokenizer when it has one
    (the model reads patched ids), else its tokenizer.json, else AutoTokenizer."""
    from sarathi.transformers_utils.tokenizer import load_patch_tokenizer

    patch = load_patch_tokenizer(Path(model_dir))
    if patch is not None:
        return patch.encode_many
    tj = Path(model_dir) / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
        tok.no_truncation()
        return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any failure means there is no usable tokenizer
        raise QuantizeError(f"model directory {str(model_dir)!r} has no usable tokenizer: {e}") from None
    return lambda texts: [hf(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]


def _chunks(text: str, size: int = 1 << 16) -> List[str]:
    """Split at line ends into pieces of about `size` characters (tokenized in parallel)."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        out.append(text[start:end])
        start = end
    return out


def calibration_windows(path, model_dir: Path, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` consecutive tokens at seeded random offsets: [N, L] int64."""
    text = read_calibration_text(path)
    encode = load_token_encoder(model_dir)
    ids: List[int] = []
    for piece in encode(_chunks(text)):
        ids.extend(piece)
    if len(ids) < seq_len:
        raise QuantizeError(f"calibration file {str(path)!r} is too short: {len(ids)} tokens, fewer than "
                            f"--seq-len {seq_len}; use a longer file or a smaller --seq-len")
    tokens = torch.tensor(ids, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
