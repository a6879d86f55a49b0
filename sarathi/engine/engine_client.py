"""What the OpenAI server needs from an engine: the `EngineClient` protocol.

`AsyncLLMEngine` (one engine in this process) implements it; a client that routes to
engine replicas elsewhere (Ray) implements the same methods, and the server does not
know the difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Protocol, runtime_checkable

from sarathi.outputs import RequestOutput
from sarathi.sampling_params import InvalidParam, SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    """Request limits clients are checked against before anything is queued."""

    max_model_len: int
    vocab_size: int
    max_logprobs: int
    max_n: int

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
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise InvalidParam(name, f"{name} has token id {bad[0]}, outside the vocabulary "
                                         f"[0, {self.vocab_size})")


class RequestFailed(RuntimeError):
    """The engine ended this request with an error (other requests are unaffected)."""


class ReplicaFailed(RuntimeError):
    """The engine replica serving this request died (it is being restarted; others still serve)."""


class EngineDead(RuntimeError):
    """The engine loop stopped for good; the server should report unhealthy and exit."""


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Any
    model_name: str
    limits: EngineLimits
    errored: Optional[BaseException]   # set once the engine is dead

    def generate(self, prompt: Optional[str], sampling_params: SamplingParams, request_id: str,
                 prompt_token_ids: Optional[List[int]] = None,
                 lora_request: Optional[Any] = None) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request. Raises ValueError (InvalidParam) for bad
        input before any output, RequestFailed if the engine fails the request later.
        lora_request (a sarathi.lora.LoRARequest) runs it with that adapter."""

    def list_loras(self) -> List[str]:
        """Names of the LoRA adapters loaded (empty without --enable-lora)."""

    async def add_lora(self, lora_request: Any) -> None:
        """Load an adapter (ValueError when it cannot be served)."""

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter (KeyError: unknown; ValueError: requests still use it)."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its memory."""

    def get_stats(self) -> Dict[str, float]:
        """Gauges and counters for /metrics (num_waiting_requests among them)."""

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block (requests in flight keep theirs); returns how many."""

    async def shutdown(self) -> None:
        """Stop the loop, fail what is in flight, release memory."""
