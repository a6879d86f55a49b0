"""Incremental detokenisation that is correct for multi-byte UTF-8.

Each step decodes a short window of ids twice (with and without the newest ids) and
emits the difference. Text that ends in U+FFFD is held back: the newest token ended
inside a multi-byte character (a byte-level BPE piece or a PatchTokenizer n-token),
and the next token completes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

# Tokens decoded before the new ones: enough for tokenizers whose decode of a token
# depends on its left neighbour (SentencePiece spaces).
_CONTEXT = 6


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    skip_special_tokens: bool = True
    prefix_offset: int = 0   # window start
    read_offset: int = 0     # ids before this are already in the text

    @classmethod
    def after_prompt(cls, tokenizer, prompt_ids: List[int], skip_special_tokens: bool) -> "IncrementalDetokenizer":
        n = len(prompt_ids)
        return cls(tokenizer, skip_special_tokens, max(n - _CONTEXT, 0), n)

    def step(self, all_ids: List[int]) -> str:
        """New text for the ids appended since the last call ('' while a character is incomplete)."""
        dec = self.tokenizer.decode
        prefix = dec(all_ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = dec(all_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        # The prefix may itself end in an incomplete character that the new ids complete.
        cut = len(prefix.rstrip("\ufffd"))
        if prefix.endswith("\ufffd") and full.startswith(prefix[:cut]):
            new = full[cut:]
        else:
            new = full[len(prefix):]
        self.prefix_offset = max(len(all_ids) - _CONTEXT, self.read_offset)
        self.read_offset = len(all_ids)
        return new
