"""Grammar backends: what a constraint library must do for the engine, and xgrammar doing it.

A backend compiles a request's `StructuredOutputsParams` against the served tokenizer's real
vocabulary (the bytes each token id stands for, an AdaptiVocab n-token's being its base
tokens' bytes joined), makes a matcher per sequence, fills the allowed-token bitmask of many
matchers in one call (int32 words, bit k of word w = token 32 w + k; the sampler applies it),
advances many matchers in one call and rolls them back (speculative decoding's drafts).
llguidance (guidance) uses the same bitmask layout and would be a second class with the same
methods.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, List, Sequence

import torch

from sarathi.sampling_params import InvalidParam, StructuredOutputsParams

logger = logging.getLogger("sarathi")

BACKENDS = ("auto", "xgrammar")
# Whitespace characters allowed in a row between JSON tokens: a small model left free there can
# emit newlines until max_tokens; pretty-printed JSON never needs more.
MAX_JSON_WHITESPACE = 24
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+?:\d+: ")


class GrammarBackend:
    """The interface (see the module docstring)."""

    name: str

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar (blocking: runs on a compile worker). InvalidParam for a bad spec."""
        raise NotImplementedError

    def grammar_bytes(self, grammar: Any) -> int:
        raise NotImplementedError

    def matcher(self, grammar: Any) -> Any:
        raise NotImplementedError

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def fill(self, matchers: Sequence[Any], bitmask: torch.Tensor, rows: List[int]) -> None:
        """bitmask[rows[i]] = what matchers[i] allows next."""
        raise NotImplementedError

    def accept(self, matchers: Sequence[Any], tokens: Sequence[int]) -> List[bool]:
        raise NotImplementedError

    def rollback(self, matchers: Sequence[Any], counts: Sequence[int]) -> None:
        """Undo the last counts[i] tokens matchers[i] accepted (speculative decoding's drafts)."""
        raise NotImplementedError

    def terminated(self, matchers: Sequence[Any]) -> List[bool]:
        """Whether each matcher has accepted a stop token (nothing may follow)."""
        raise NotImplementedError


def regex_of_choice(choice: Iterable[str]) -> str:
    """A regular expression that matches exactly one of the strings."""
    return "(" + "|".join(re.sub(r"([\\^$.|?*+()\[\]{}/])", r"\\\1", c) for c in choice) + ")"


def clean_error(e: BaseException) -> str:
    """The library's message without its C++ source location."""
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(e).strip().splitlines()]
    return " ".join(line for line in lines if line)[:400] or type(e).__name__


def vocabulary_bytes(tokenizer, vocab_size: int, decoded: Sequence[bytes]) -> List[bytes]:
    """The bytes each token id stands for in generated text: the base tokenizer's decoded
    vocabulary, with an AdaptiVocab PatchTokenizer's n-tokens as their base tokens' bytes
    joined, and special tokens empty (they never appear inside structured text; a text
    detokenised with skip_special_tokens would lose them)."""
    vocab = [decoded[i] if i < len(decoded) else b"" for i in range(vocab_size)]
    for token, parts in (getattr(tokenizer, "ngrams", None) or {}).items():
        if token < vocab_size:
            vocab[token] = b"".join(decoded[p] for p in parts)
    base = getattr(tokenizer, "base", tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(base, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    for token in special:
        if 0 <= token < vocab_size:
            vocab[token] = b""
    return vocab


class XGrammarBackend(GrammarBackend):
    """xgrammar (the library vLLM and SGLang use): a CPU bitmask path, batched fill over threads."""

    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], num_threads: int = 1):
        import xgrammar as xgr

        self.xgr = xgr
        from importlib.metadata import version

        self.version = version("xgrammar")
        self.vocab_size = vocab_size
        base = getattr(tokenizer, "base", tokenizer)   # a PatchTokenizer wraps its base HF tokenizer
        stops = sorted(stop_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(base, vocab_size=vocab_size, stop_token_ids=stops or None)
        vocab = vocabulary_bytes(tokenizer, vocab_size, info.decoded_vocab)
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=stops or None, add_prefix_space=False)
        # Each compile is single-threaded: at most a few run at once, beside the model's own threads.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=max(1, num_threads))

    def compile(self, spec: StructuredOutputsParams) -> Any:
        c, kind = self.compiler, spec.kind
        try:
            if kind in ("json", "json_object"):   # json_object: any JSON object (OpenAI's JSON mode)
                return c.compile_json_schema(spec.json if kind == "json" else '{"type": "object"}',
                                             any_whitespace=not spec.disable_any_whitespace,
                                             max_whitespace_cnt=None if spec.disable_any_whitespace
                                             else MAX_JSON_WHITESPACE)
            if kind == "regex":
                return c.compile_regex(spec.regex)
            if kind == "choice":
                return c.compile_regex(regex_of_choice(spec.choice))
            return c.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "JSON schema", "json_object": "JSON", "regex": "regular expression",
                    "choice": "choice", "grammar": "grammar"}[kind]
            raise InvalidParam(spec.param, f"{spec.param}: invalid {what}: {clean_error(e)}") from None

    def grammar_bytes(self, grammar: Any) -> int:
        return int(grammar.memory_size_bytes)

    def matcher(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matchers: Sequence[Any], bitmask: torch.Tensor, rows: List[int]) -> None:
        self.batch.batch_fill_next_token_bitmask(list(matchers), bitmask, rows)

    def accept(self, matchers: Sequence[Any], tokens: Sequence[int]) -> List[bool]:
        return list(self.xgr.BatchGrammarMatcher.batch_accept_token(list(matchers), list(tokens)))

    def rollback(self, matchers: Sequence[Any], counts: Sequence[int]) -> None:
        # unbounded in the pinned xgrammar (its Earley parser keeps every state; max_rollback_tokens is gone)
        self.xgr.BatchGrammarMatcher.batch_rollback(list(matchers), list(counts))

    def terminated(self, matchers: Sequence[Any]) -> List[bool]:
        return [m.is_terminated() for m in matchers]


def make_backend(name: str, tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 num_threads: int = 1) -> GrammarBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown structured outputs backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return XGrammarBackend(tokenizer, vocab_size, stop_token_ids, num_threads)
