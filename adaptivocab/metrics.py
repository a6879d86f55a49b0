"""Tokenizer-independent quality: bits per byte of a causal LM on a text.

bits/byte = sum over the text's tokens of -log2 p(token | previous tokens) / UTF-8 bytes.
Since the patched tokenizer round-trips exactly, this is the model's code length for the
same bytes, so a base and a patched model are directly comparable. Long texts are scored
in windows of `window` tokens that advance by `stride`, so every scored token sees at
least `window - stride` tokens of context; the first token is predicted from one
context token (the tokenizer's BOS, else EOS), identical for base and patched models.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch


def context_token_id(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start scoring from")


@torch.inference_mode()
def sequence_bits(model, ids: Sequence[int], context_id: int, window: int = 512, stride: Optional[int] = None) -> float:
    """Sum of -log2 p over `ids` (each predicted from its predecessors), in sliding windows."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    stride = stride or max(1, (window * 3) // 4)
    seq: List[int] = [context_id] + list(ids)
    n = len(seq)
    total_nats = 0.0
    for a in range(1, n, stride):
        b = min(a + stride, n)
        lo = max(0, b - window)
        inp = torch.tensor([seq[lo:b - 1]], dtype=torch.long)
        logits = model(input_ids=inp).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        # logits row j predicts seq[lo + j + 1]; we want targets a..b-1.
        rows = torch.arange(a - lo - 1, b - lo - 1)
        targets = torch.tensor(seq[a:b], dtype=torch.long)
        total_nats -= logp[rows, targets].sum().item()
    return total_nats / math.log(2)


def bits_per_byte(model, tokenizer, text: str, window: int = 512) -> float:
    """Bits per UTF-8 byte of `text` under `model` with `tokenizer` (no special tokens added)."""
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        raise ValueError("cannot score an empty text")
    ids = tokenizer.encode(text, add_special_tokens=False)
    was_training = model.training
    model.eval()
    try:
        return sequence_bits(model, ids, context_token_id(tokenizer), window) / n_bytes
    finally:
        model.train(was_training)


def heldout_sample(texts: Sequence[str], max_bytes: int) -> str:
    """The first `max_bytes` (about) of the joined texts, cut at a line end, for a fixed eval sample."""
    joined = "\n".join(texts)
    data = joined.encode("utf-8")
    if len(data) <= max_bytes:
        return joined
    cut = data.rfind(b"\n", 0, max_bytes)
    cut = cut + 1 if cut > 0 else max_bytes
    return data[:cut].decode("utf-8", errors="ignore")
