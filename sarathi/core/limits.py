"""What one request may ask of this engine, checked in one place by every entry (the
offline API, the in-process and Ray engine clients, the OpenAI server) before anything is
queued. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from sarathi.sampling_params import InvalidParam, SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    """Request limits of one engine."""

    max_model_len: int
    vocab_size: int
    max_logprobs: int
    max_n: int
    max_kv_tokens: int            # the most tokens one sequence can hold in the whole KV cache

    def check(self, p: SamplingParams) -> None:
        """Raise InvalidParam where p asks for more than the engine allows."""
        if p.n > self.max_n:
            raise InvalidParam("n", f"n must be <= {self.max_n} (--max-n), got {p.n}")
        if p.top_k > self.vocab_size:
            raise InvalidParam("top_k", f"top_k must be -1 or at most the vocabulary size {self.vocab_size}, "
                                        f"got {p.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(p, name)
            if value is not None and value > self.max_logprobs:
                raise InvalidParam(name, f"{name} must be <= {self.max_logprobs} (--max-logprobs), got {value}")
        for name, ids in (("stop_token_ids", p.stop_token_ids), ("logit_bias", p.logit_bias or ())):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParam(name, f"{name} has token id {bad[0]}, outside the vocabulary "
                                         f"[0, {self.vocab_size})")

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise InvalidParam(param, f"{param} contains token id {str(t)[:40]!r}, outside the vocabulary "
                                          f"[0, {self.vocab_size})")

    def check_prompt(self, ids: Sequence[int], max_tokens: Optional[int] = None, param: str = "prompt") -> int:
        """A prompt's token ids must be in the vocabulary and, with at least one output token
        (max_tokens of them when given), fit the context and the KV cache. Returns the
        max_tokens to use (the room left when None)."""
        if not ids:
            raise InvalidParam(param, f"{param} is empty: at least one token is needed")
        self.check_token_ids(ids, param)
        n = len(ids)
        if n >= self.max_model_len:
            raise InvalidParam(param, f"This model's maximum context length is {self.max_model_len} tokens; the "
                                      f"{param} has {n} tokens, which leaves no room for output.",
                               code="context_length_exceeded")
        if n + 1 > self.max_kv_tokens:
            raise InvalidParam(param, f"the {param} has {n} tokens, more than the whole KV cache holds "
                                      f"({self.max_kv_tokens} tokens); raise --kv-cache-memory",
                               code="context_length_exceeded")
        room = self.max_model_len - n
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise InvalidParam(
                "max_tokens", f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {n + max_tokens} tokens ({n} in the {param}, {max_tokens} for the "
                              f"completion). Please reduce the length of the {param} or max_tokens.",
                code="context_length_exceeded")
        return max_tokens
