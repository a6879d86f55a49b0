"""A request's sequences: their tokens, progress through the prompt, and status.

One `Sequence` per output sample (n > 1 fans a request out into n sequences that
are scheduled independently). `num_computed_tokens` counts tokens whose K/V are in
the cache; whatever lies beyond it is still to run, so a decode is simply a
sequence with one token left and a preempted sequence (recompute) starts over
from zero with its generated tokens folded into what it must prefill.
"""
from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, FrozenSet, List, Optional, Tuple

if TYPE_CHECKING:
    from sarathi.sampling_params import SamplingParams


@dataclass(frozen=True)
class Binding:
    """What a request plug-in (`bind`) says a new request needs: the LoRA adapter it runs with,
    the salt of its cached KV, the adapters / models it keeps loaded, and work it must wait for
    before it is scheduled (`holds`, futures that fail with the request's error: a grammar
    compiling on a worker thread)."""

    adapter: Optional[str] = None
    cache_salt: str = ""
    uses: FrozenSet[str] = frozenset()
    holds: Tuple[Future, ...] = ()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int                      # which of the request's n outputs
    prompt_token_ids: List[int]
    arrival_time: float
    max_tokens: int                 # output tokens allowed (already capped by max_model_len)
    output_token_ids: List[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    # Token-id stops, applied by Scheduler.update_from_output once min_tokens are out.
    stop_token_ids: FrozenSet[int] = frozenset()   # the request's own stop ids
    eos_token_ids: FrozenSet[int] = frozenset()    # the model's EOS ids (empty with ignore_eos)
    min_tokens: int = 0
    lora_name: Optional[str] = None  # the LoRA adapter it runs with; the scheduler caps distinct ones per step
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    # Prefix caching: the salt starts the chain of block identities (tenants, adapters and
    # anything else that changes the KV never share); a later sample of a request waits for
    # its leader to compute the prompt, then shares its pages.
    cache_salt: str = ""
    cache_lookup: bool = True                 # False: compute everything (prompt logprobs need it)
    prefix_leader: Optional["Sequence"] = None
    num_cached_tokens: Optional[int] = None   # prompt tokens found in the cache at first admission
    # How the runner samples this sequence (read there; the scheduler only uses the stops above).
    params: Optional["SamplingParams"] = None
    # Draft tokens a proposer guessed follow the output (speculative decoding): the next
    # decode runs them as extra positions and keeps those the model verifies. Never part of
    # token_ids(), never cached; dropped on preemption.
    spec_token_ids: List[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the last token is still to run (a prompt, or a recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def final_len(self) -> int:
        """Longest this sequence can grow to."""
        return len(self.prompt_token_ids) + self.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def blocked_token_ids(self) -> FrozenSet[int]:
        """Ids the sampler must not pick yet: every token-id stop until min_tokens are out."""
        if len(self.output_token_ids) >= self.min_tokens:
            return frozenset()
        return self.stop_token_ids | self.eos_token_ids

    def token_ids(self) -> List[int]:
        return self.prompt_token_ids + self.output_token_ids
