"""Which sequences run in the next step, and how many of their tokens.

`sarathi` (default): a token budget of `chunk_size` per step; running decodes go
first and are never refused for budget, then ongoing prefills take the next chunk
of what budget remains, then new requests FIFO, prompts of at most `max_prefills`
requests per step (0: as many as the budget holds). The batch lists prefill chunks
first, then decodes.

Why the engine asks for one prompt per step on a CPU (and 0 on CUDA): on a CPU a step's
time grows with every token in it (no idle lanes to fill, as a GPU has at small
batches), so k prompts packed into one step all get their first token when the whole
step ends, at about k times the cost of one. One prompt per step gives them first
tokens one step apart: a lower mean and median TTFT for the same work, plus a few extra
passes over the weights (decodes ride every step, so those are not lost). It also stops
requests of equal length that arrived together from finishing, and coming back,
together forever.

`vllm`: whole prompts in prefill-only steps whenever any can be admitted, otherwise a
decode-only step (decodes stall behind prefills). `orca`: whole prompts mixed with
decodes, no token budget.

Prefix caching (when the KVManager has it on): a new sequence starts with the KV of the
longest cached prefix of its tokens, counted as computed, so the token budget goes to
the rest; samples 2..n of a request wait until sample 1 has computed the prompt, then
share its pages instead of computing the prompt again.

The step contract: `schedule()` says what runs (sequences, token counts, slots, block
tables, and the KV manager's memory operations for the runner to apply first); after the
runner ran it, `update_from_output()` advances the sequences, appends the sampled tokens,
applies token-id stops, offers computed blocks to the prefix cache and frees what
finished. Sequences ended for other reasons (a stop string, an abort, a failure) leave
through `finish()`.

Holds: a sequence added with holds (futures: work its request waits for, such as a grammar
compiling) stays in the queue, without blocking those behind it, until they are done; one
whose hold failed is rejected (`SchedulerOutput.rejected`, with the error) and never runs.

Speculative decoding: a running decode with draft tokens (`Sequence.spec_token_ids`, from the
runner's last output) is scheduled with 1 + k positions, which the token budget counts; the
runner returns the tokens it verified (`StepResult.verified_token_ids`: accepted drafts and
the token after them), which are appended here, and `num_computed_tokens` moves past the
accepted positions only (a rejected position's KV is overwritten later; its pages stay).
`num_lookahead_tokens` more positions are mapped for a proposer that writes KV while it
drafts (early exit), when memory allows.

Memory pressure: recompute preemption of the newest running sequence. Admission
keeps headroom: a new request must leave room for every running sequence to grow by
one more block, and a request that was preempted comes back only when it can run to
completion next to what is running, so a tight budget cannot make it thrash.

No torch here: this runs on a fake clock in unit tests.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, List, Optional, Sequence as Seq, Tuple

from sarathi.core.kv_manager import KVManager, KVOp, PrefixHit
from sarathi.core.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_scheduled_tokens: int
    slot: int = -1                             # filled in when the schedule is final
    block_table: Optional[List[int]] = None
    draft_token_ids: List[int] = field(default_factory=list)   # run after the last token, to verify
    mapped_len: int = 0                        # with lookahead: positions of KV mapped after this step's ops
    num_new_tokens: int = 0                    # tokens the step appended (update_from_output)

    @property
    def samples(self) -> bool:
        """This chunk reaches the sequence's last token, so the step samples its next one."""
        return self.seq.num_computed_tokens + self.num_scheduled_tokens - len(self.draft_token_ids) \
            == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    prefills: List[ScheduledSeq] = field(default_factory=list)
    decodes: List[ScheduledSeq] = field(default_factory=list)
    preempted: List[Sequence] = field(default_factory=list)
    kv_ops: List[KVOp] = field(default_factory=list)      # memory operations, applied before the step
    finished_seq_ids: List[int] = field(default_factory=list)   # sequences gone since the last step
    rejected: List[Tuple[Sequence, BaseException]] = field(default_factory=list)   # holds that failed

    @property
    def scheduled(self) -> List[ScheduledSeq]:
        """Batch layout: prefill chunks first, then decodes."""
        return self.prefills + self.decodes

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.prefills)

    @property
    def num_decode_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.decodes)

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(s.draft_token_ids) for s in self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    def _drop(self, seq: Sequence) -> None:
        self.prefills = [s for s in self.prefills if s.seq is not seq]
        self.decodes = [s for s in self.decodes if s.seq is not seq]


@dataclass
class StepResult:
    """What the scheduler reads of the runner's output (ModelRunnerOutput has these fields):
    the token each sampling sequence drew, by seq_id (speculating: the first it verified, the
    rest in verified_token_ids); drafts for the next step; whether the step failed as a whole;
    cached blocks the backend could not retain."""

    sampled_token_ids: Dict[int, int] = field(default_factory=dict)
    verified_token_ids: Dict[int, List[int]] = field(default_factory=dict)
    draft_token_ids: Dict[int, List[int]] = field(default_factory=dict)
    error: Optional[str] = None
    retain_failed: List[int] = field(default_factory=list)


class Scheduler:
    """Shared state and mechanics; subclasses decide the batch."""

    def __init__(self, kv: KVManager, max_num_seqs: int, max_model_len: int,
                 chunk_size: int = 512, max_num_batched_tokens: Optional[int] = None,
                 max_loras: Optional[int] = None, max_prefills: int = 0, num_lookahead_tokens: int = 0):
        self.kv = kv
        self.num_lookahead_tokens = num_lookahead_tokens
        self.max_prefills = max_prefills  # most requests with prompt chunks in one step (0: no limit)
        self.max_loras = max_loras  # most distinct LoRA adapters running at once (None: no LoRA)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.chunk_size = chunk_size
        self.max_num_batched_tokens = max_num_batched_tokens or max(max_model_len, chunk_size)
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.num_preemptions = 0
        self._finished_ids: List[int] = []
        self._holds: Dict[int, List[Future]] = {}   # seq_id -> what it waits for before its first admission

    # ---- requests in and out -------------------------------------------------
    def add(self, seq: Sequence, holds: Seq[Future] = ()) -> None:
        """Queue a sequence. Entries check prompts first (EngineLimits.check_prompt); this only
        guards the invariant that what is queued can run. holds: it is not admitted before these
        futures are done (and is rejected if one failed)."""
        n = len(seq.prompt_token_ids)
        if not 0 < n < self.max_model_len or not self.kv.fits(n + 1):
            raise ValueError(f"a prompt of {n} tokens cannot be scheduled (max_model_len {self.max_model_len}, "
                             f"KV cache {self.kv.num_blocks} blocks): check it with EngineLimits.check_prompt")
        if holds:
            self._holds[seq.seq_id] = list(holds)
        self.waiting.append(seq)

    def finish(self, seqs: Iterable[Sequence], reason: Optional[str] = None) -> None:
        """Take sequences out of the scheduler (finished, stopped by text or aborted; reason,
        when given, is the finish_reason of those still unfinished) and free their memory."""
        for seq in seqs:
            if seq.is_finished:
                continue
            if reason is not None and seq.finish_reason is None:
                seq.finish_reason = reason
            if seq in self.running:
                self.running.remove(seq)
                self._release(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            self._holds.pop(seq.seq_id, None)
            self.kv.forget(seq.seq_id)
            seq.status = SequenceStatus.FINISHED
            self._finished_ids.append(seq.seq_id)

    def _cache_computed(self, seq: Sequence, partial: bool = False) -> None:
        """Offer the running sequence's computed blocks to the prefix cache (the KV manager
        has the backend retain the new ones before the slot can be freed)."""
        self.kv.cache_blocks(seq.seq_id, seq.token_ids(), seq.num_computed_tokens, seq.cache_salt, partial)

    def _release(self, seq: Sequence) -> int:
        """Free a sequence's KV, first caching the computed head of its last block."""
        self._cache_computed(seq, partial=True)
        return self.kv.free(seq.seq_id)

    def update_from_output(self, out: SchedulerOutput, result: StepResult) -> List[Sequence]:
        """After the runner ran `out`: advance every scheduled sequence, append the sampled
        tokens, apply token-id stops (EOS, stop ids, max_tokens, max_model_len), cache the
        computed blocks, free what finished. Returns the sequences that finished. A failed
        step advances nothing (its requests are ended by the caller)."""
        self.kv.copies_done()   # the runner applied this step's copies (or the step failed)
        for block in result.retain_failed:
            self.kv.uncache(block)
        if result.error is not None:
            return []
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_scheduled_tokens - len(item.draft_token_ids)
            if seq.max_tokens == 0 and seq.num_uncomputed_tokens == 0:
                seq.finish_reason = "length"  # prompt scoring only: nothing to sample
            token = result.sampled_token_ids.get(seq.seq_id)
            seq.spec_token_ids = []
            if token is not None:
                appended = 0
                for t in (token, *result.verified_token_ids.get(seq.seq_id, ())):
                    self._append(seq, t)
                    appended += 1
                    if seq.finish_reason is not None:
                        break
                seq.num_computed_tokens += appended - 1   # the accepted drafts' KV was computed
                item.num_new_tokens = appended
                if seq.finish_reason is None:
                    seq.spec_token_ids = list(result.draft_token_ids.get(seq.seq_id, ()))
        finished = []
        for item in out.scheduled:
            seq = item.seq
            if self.kv.enable_prefix_caching and self.kv.holds(seq.seq_id):
                # The head of the last block too once the prompt is done: n > 1 samples copy it.
                done = seq.num_computed_tokens - item.num_scheduled_tokens < len(seq.prompt_token_ids) \
                    <= seq.num_computed_tokens
                self._cache_computed(seq, partial=done)
            if seq.finish_reason is not None:
                finished.append(seq)
            elif self.kv.window and self.kv.holds(seq.seq_id):
                self.kv.slide(seq.seq_id, seq.num_computed_tokens)
        self.finish(finished)
        return finished

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        n_out = len(seq.output_token_ids)
        if n_out >= seq.min_tokens and (token in seq.stop_token_ids or token in seq.eos_token_ids):
            seq.finish_reason = "stop"
            seq.stop_reason = token if token in seq.stop_token_ids else None
        elif n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (requests in flight keep theirs); returns how many."""
        return self.kv.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_runnable(self) -> bool:
        """Something can run now: a running sequence, or a queued one no hold keeps waiting
        (with nothing runnable, a loop can sleep instead of stepping)."""
        return bool(self.running) or any(all(h.done() for h in self._holds.get(s.seq_id, ())) for s in self.waiting)

    def has_pending_memory_ops(self) -> bool:
        """Memory operations wait for the runner (a finish or abort freed a slot between steps)."""
        return self.kv.has_ops or bool(self._finished_ids)

    # ---- mechanics -----------------------------------------------------------
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute preemption: drop the KV, start over later from the head of the queue."""
        self.running.remove(seq)
        self._release(seq)
        out._drop(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _drafts(self, seq: Sequence, budget: Optional[int]) -> List[int]:
        """The sequence's drafts this step can verify: within its max_tokens and the context
        (a draft past either could not be kept), the token budget and free memory."""
        drafts = seq.spec_token_ids[:max(min(seq.max_tokens - len(seq.output_token_ids),
                                             self.max_model_len - seq.num_tokens) - 1, 0)]
        if budget is not None:
            drafts = drafts[:max(budget - 1, 0)]
        while drafts and not self.kv.can_grow(seq.seq_id, seq.num_tokens + len(drafts)):
            drafts = drafts[:-1]
        return drafts

    def _schedule_decodes(self, out: SchedulerOutput, budget: Optional[int] = None) -> None:
        """Every running decode, oldest first, with its drafts while the budget lasts (None:
        no budget); preempt the newest when a block is short."""
        for seq in list(self.running):
            if seq not in self.running or seq.is_prefill:
                continue
            while not self.kv.can_grow(seq.seq_id, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                drafts = self._drafts(seq, budget)
                self.kv.grow(seq.seq_id, seq.num_tokens + len(drafts))
                out.decodes.append(ScheduledSeq(seq, 1 + len(drafts), draft_token_ids=drafts))
                if budget is not None:
                    budget -= 1 + len(drafts)

    def _can_admit(self, seq: Sequence, hit: PrefixHit) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return False
        if not self.running:
            return self.kv.can_admit(seq.num_tokens, hit=hit)
        if seq.num_preemptions == 0:
            # Leave room for every running sequence to grow by one more block.
            growth = sum(self.kv.blocks_for(s.num_tokens + self.kv.block_size) - self.kv.blocks_held(s.seq_id)
                         for s in self.running)
            return self.kv.can_admit(seq.num_tokens, extra_blocks=max(growth, 0), hit=hit)
        # A restarted sequence returns only when it and everything running can finish.
        growth = sum(max(self.kv.blocks_for(s.final_len) - self.kv.blocks_held(s.seq_id), 0)
                     for s in self.running)
        final = min(seq.final_len, self.kv.num_blocks * self.kv.block_size)
        return self.kv.can_admit(max(final, seq.num_tokens), extra_blocks=growth, hit=hit)

    def _lora_full(self, seq: Sequence) -> bool:
        """Admitting seq would run more than max_loras distinct adapters at once."""
        if seq.lora_name is None or self.max_loras is None:
            return False
        running = {s.lora_name for s in self.running if s.lora_name is not None}
        return seq.lora_name not in running and len(running) >= self.max_loras

    def _admit(self, seq: Sequence, hit: PrefixHit, out: SchedulerOutput) -> None:
        self.waiting.remove(seq)
        self.kv.admit(seq.seq_id, seq.num_tokens, hit)
        self.kv.count_query(seq.num_tokens, hit)
        seq.num_computed_tokens = hit.num_cached_tokens
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = hit.num_cached_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _held(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """The sequence still waits for a hold; one whose hold failed is rejected."""
        holds = self._holds.get(seq.seq_id)
        if holds is None:
            return False
        if not all(h.done() for h in holds):
            return True
        del self._holds[seq.seq_id]
        error = next((h.exception() for h in holds if h.exception() is not None), None)
        if error is None:
            return False
        seq.finish_reason = "abort"
        self.finish([seq])
        out.rejected.append((seq, error))
        return True

    @staticmethod
    def _waits_for_leader(seq: Sequence) -> bool:
        """A later sample of a request waits until the first has computed the shared prompt."""
        lead = seq.prefix_leader
        return (lead is not None and not lead.is_finished
                and lead.num_computed_tokens < len(lead.prompt_token_ids))

    def _prefills_full(self, out: SchedulerOutput, seq: Sequence) -> bool:
        """The step already holds prompt chunks of max_prefills other requests (the samples
        of one request count once: they share its prompt)."""
        if not self.max_prefills:
            return False
        requests = {s.seq.request_id for s in out.prefills}
        return seq.request_id not in requests and len(requests) >= self.max_prefills

    def _admit_waiting(self, out: SchedulerOutput, budget: Optional[int] = None, chunked: bool = False) -> int:
        """Admit queued sequences in order while they fit and the token budget lasts (None: no
        budget). chunked: the last one admitted may get a partial prefill chunk; else whole
        prompts only. Returns the budget left."""
        for seq in list(self.waiting):
            if self._held(seq, out) or self._lora_full(seq) or self._waits_for_leader(seq):
                continue  # waits for a running adapter to finish (or its first sample); others may go
            if self._prefills_full(out, seq):
                break
            hit = self.kv.match(seq.seq_id, seq.token_ids(), seq.cache_salt) if seq.cache_lookup else PrefixHit()
            if not self._can_admit(seq, hit):
                break
            n = seq.num_tokens - hit.num_cached_tokens
            if budget is not None:
                if budget <= 0 or (n > budget and not chunked):
                    break
                n = min(n, budget)
                budget -= n
            self._admit(seq, hit, out)
            out.prefills.append(ScheduledSeq(seq, n))
        return budget

    def _running_decodes(self, budget: Optional[int] = None) -> SchedulerOutput:
        """A new step holding every running decode, oldest first (drafts within budget)."""
        out = SchedulerOutput()
        self.running.sort(key=lambda s: (s.arrival_time, s.seq_id))
        self._schedule_decodes(out, budget)
        return out

    def _map_lookahead(self, out: SchedulerOutput) -> None:
        """Map num_lookahead_tokens positions past what each sampling sequence may reach this
        step, for a proposer that writes KV while drafting; none where memory is short."""
        for item in out.scheduled:
            seq = item.seq
            if not item.samples:
                continue
            reach = min(seq.num_tokens + len(item.draft_token_ids) + 1 + self.num_lookahead_tokens,
                        self.max_model_len)
            if self.kv.can_grow(seq.seq_id, reach):
                self.kv.grow(seq.seq_id, reach)
                item.mapped_len = reach

    def schedule(self) -> SchedulerOutput:
        """The next step: the policy's batch, each sequence's slot and block table, and the
        memory operations the runner applies before running it."""
        out = self._policy()
        if self.num_lookahead_tokens:
            self._map_lookahead(out)
        for item in out.scheduled:
            item.slot = self.kv.slot(item.seq.seq_id)
            item.block_table = self.kv.block_table(item.seq.seq_id)
        out.kv_ops = self.kv.take_ops()
        out.finished_seq_ids, self._finished_ids = self._finished_ids, []
        return out

    @property
    def token_budget(self) -> Optional[int]:
        """Most tokens one step computes (None: no budget)."""
        return None

    def _policy(self) -> SchedulerOutput:
        raise NotImplementedError


class SarathiScheduler(Scheduler):
    """Chunked prefills and stall-free hybrid batches under a token budget."""

    @property
    def token_budget(self) -> Optional[int]:
        return self.chunk_size

    def _policy(self) -> SchedulerOutput:
        out = self._running_decodes(self.chunk_size)
        budget = max(self.chunk_size - out.num_decode_tokens, 0)
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefill and not self._prefills_full(out, seq):
                n = min(seq.num_uncomputed_tokens, budget)
                out.prefills.append(ScheduledSeq(seq, n))
                budget -= n
        self._admit_waiting(out, budget, chunked=True)
        return out


class VLLMScheduler(Scheduler):
    """Prefill-first: whole prompts in prefill-only steps, else a decode-only step."""

    @property
    def token_budget(self) -> Optional[int]:
        return self.max_num_batched_tokens

    def _policy(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._admit_waiting(out, self.max_num_batched_tokens)
        if out.prefills:
            return out
        decodes = self._running_decodes(self.max_num_batched_tokens)
        decodes.rejected = out.rejected
        return decodes


class OrcaScheduler(Scheduler):
    """Iteration-level batching: decodes plus whole new prompts, no token budget."""

    def _policy(self) -> SchedulerOutput:
        out = self._running_decodes()
        self._admit_waiting(out)
        return out


def make_scheduler(name: str, kv: KVManager, max_num_seqs: int, max_model_len: int,
                   chunk_size: int, max_num_batched_tokens: Optional[int],
                   max_loras: Optional[int] = None, max_prefills: int = 0,
                   num_lookahead_tokens: int = 0) -> Scheduler:
    cls = {"sarathi": SarathiScheduler, "vllm": VLLMScheduler, "orca": OrcaScheduler}.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}")
    return cls(kv, max_num_seqs, max_model_len, chunk_size, max_num_batched_tokens, max_loras,
               max_prefills if name == "sarathi" else 0, num_lookahead_tokens)
