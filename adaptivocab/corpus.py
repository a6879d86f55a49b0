"""Reading domain corpus files, with errors that name the file and the problem."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

PathLike = Union[str, Path]


def read_corpus(files: Sequence[PathLike], what: str = "corpus file") -> List[str]:
    """Return the text of each corpus file (UTF-8).

    Missing files, directories, unreadable, empty or binary (non-UTF-8 or NUL bytes) files
    raise ValueError naming the file; `what` names the role in messages ("corpus file").
    """
    if isinstance(files, (str, Path)):
        files = [files]
    if not files:
        raise ValueError(f"no {what}s given")
    return [_read_text(Path(f), what) for f in files]


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a text file")
    if not path.is_file():  # a device or pipe could block or never end
        raise ValueError(f"{what} {str(path)!r} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if "\0" in text:
        raise ValueError(f"{what} {str(path)!r} looks binary (it contains NUL bytes)")
    if not text.strip():
        raise ValueError(f"{what} {str(path)!r} is empty")
    return text


def split_documents(texts: Iterable[str], max_chars: int = 1 << 16) -> List[str]:
    """Cut texts into pieces of about `max_chars` at newlines between two non-space characters.

    A byte-level BPE pre-tokenizer never joins across such a newline (it is a pre-token of
    its own), so encoding the pieces gives exactly the tokens of the whole text; pieces let
    the base tokenizer encode in parallel and keep progress bars moving.
    """
    pieces = []
    for text in texts:
        start = 0
        while len(text) - start > max_chars:
            cut = _safe_newline(text, start + max_chars, start)
            if cut is None:
                break
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
    return [p for p in pieces if p]


def _safe_newline(text: str, pos: int, floor: int):
    """Index just after a newline at or before `pos` that has non-space on both sides."""
    i = text.rfind("\n", floor + 1, pos)
    while i > floor:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", floor + 1, i)
    return None


def corpus_blocks(tok, texts: Sequence[str], seq_len: int) -> np.ndarray:
    """(num_blocks, seq_len) ids of the corpus under `tok` (a PatchTokenizer: `encode_many`,
    `eos_token_id`), documents separated by EOS; fine-tuning and teacher targets share these blocks."""
    eos = tok.eos_token_id
    parts = []
    for text in tqdm(texts, desc="tokenizing corpus (patched)", unit="file"):
        # Pieces of one file join exactly (see split_documents); files are separated by EOS.
        parts.extend(tok.encode_many(split_documents([text])))
        if eos is not None:
            parts.append([eos])
    arr = np.fromiter((t for ids in parts for t in ids), dtype=np.int64)
    n_blocks = len(arr) // seq_len
    if n_blocks == 0:
        raise ValueError(f"the corpus has {len(arr)} tokens, fewer than one block of --seq-len {seq_len}")
    return arr[: n_blocks * seq_len].reshape(n_blocks, seq_len)
