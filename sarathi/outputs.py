"""What the engine hands back for a request (vLLM's shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

# One dict per token: token id -> Logprob (the chosen token plus top-N alternatives).
SampleLogprobs = List[Dict[int, "Logprob"]]
PromptLogprobs = List[Optional[Dict[int, "Logprob"]]]


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request; latencies derive from them."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    token_times: List[float] = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_tokens: int = 0    # prompt tokens whose KV came from the prefix cache

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> Optional[float]:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def e2e_latency(self) -> Optional[float]:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> List[float]:
        """Time between consecutive output tokens (the first token is excluded)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class OptimalToken:
    """What optimal sampling adds to one token: the α of q* it was drawn from and the
    diagnostics of that draw (keys as optimal_sampling.kl.diagnostics)."""

    alpha: float
    diagnostics: Dict[str, float]


@dataclass
class OptimalSamplingOutput:
    """A choice's optimal-sampling record: the target π_t, α and diagnostics per token."""

    target_model: str
    alpha_history: List[float] = field(default_factory=list)
    diagnostics: List[Dict[str, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Optional[object] = None  # the stop string or stop token id that ended it
    optimal_sampling: Optional[OptimalSamplingOutput] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: List[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None   # set when the engine failed this request (it is finished, as aborted)
    error_param: Optional[str] = None   # with error: the request field at fault (a 400, not a 500)
    num_cached_tokens: int = 0    # prompt tokens whose KV came from the prefix cache (vLLM's name)
