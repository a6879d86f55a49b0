"""What the OpenAI server needs from an engine: the `EngineClient` protocol.

`AsyncLLMEngine` (one engine in this process) implements it; a client that routes to
engine replicas elsewhere (Ray) implements the same methods, and the server does not
know the difference.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Protocol, runtime_checkable

from sarathi.core.limits import EngineLimits
from sarathi.outputs import RequestOutput
from sarathi.sampling_params import SamplingParams


class RequestFailed(RuntimeError):
    """The engine ended this request with an error (other requests are unaffected)."""


class ReplicaFailed(RuntimeError):
    """The engine replica serving this request died (it is being restarted; others still serve)."""


class EngineDead(RuntimeError):
    """The engine loop stopped for good; the server should report unhealthy and exit."""


@runtime_checkable
class EngineClient(Protocol):
    """Everything the OpenAI server uses of an engine; it sees nothing else."""

    tokenizer: Any
    model_name: str
    model_path: str                    # what /v1/models reports as the model's root
    limits: EngineLimits
    errored: Optional[BaseException]   # set once the engine is dead
    on_dead: List[Callable[[BaseException], None]]   # called once if the engine dies

    def generate(self, prompt: Optional[str], sampling_params: SamplingParams, request_id: str,
                 prompt_token_ids: Optional[List[int]] = None,
                 lora_request: Optional[Any] = None) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request. Raises ValueError (InvalidParam) for bad
        input before any output, RequestFailed if the engine fails the request later.
        lora_request (a sarathi.lora.LoRARequest) runs it with that adapter."""

    def health(self) -> Dict[str, Any]:
        """{"status": "ok" | "degraded" | "down", ...}: degraded while some replicas restart."""

    def list_loras(self) -> List[str]:
        """Names of the LoRA adapters loaded (empty without --enable-lora)."""

    def lora_path(self, name: str) -> Optional[str]:
        """Where a loaded adapter was read from."""

    def optimal_sampling_models(self) -> List[str]:
        """Second models loaded only as optimal-sampling targets (adapters are listed as adapters)."""

    async def add_lora(self, lora_request: Any) -> None:
        """Load an adapter (ValueError when it cannot be served)."""

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter (KeyError: unknown; ValueError: requests still use it)."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its memory."""

    def get_stats(self) -> Dict[str, Any]:
        """Gauges and counters for /metrics (num_waiting_requests among them)."""

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block (requests in flight keep theirs); returns how many."""

    async def shutdown(self) -> None:
        """Stop the loop, fail what is in flight, release memory."""
