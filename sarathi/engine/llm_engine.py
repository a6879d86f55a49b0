"""The engine: requests in, one scheduled model step at a time, outputs out."""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterable, List, Optional, Union

import torch

from sarathi.config import EngineConfig
from sarathi.core.kv_manager import KVManager
from sarathi.core.scheduler import SchedulerOutput, make_scheduler
from sarathi.core.sequence import Sequence, SequenceStatus
from sarathi.model_executor.model_loader import load_hf_config, resolve_model_dir
from sarathi.model_executor.model_runner import ModelRunner, RunSeq
from sarathi.model_executor.sampler import SampleRequest, prompt_logprobs, sample
from sarathi.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from sarathi.sampling_params import SamplingParams
from sarathi.transformers_utils.detokenizer import IncrementalDetokenizer
from sarathi.transformers_utils.tokenizer import get_tokenizer

logger = logging.getLogger("sarathi")


@dataclass
class SeqState:
    """Per-sequence sampling and text state owned by the engine."""

    detok: IncrementalDetokenizer
    generator: Optional[torch.Generator]
    text: str = ""
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0


@dataclass
class Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    params: SamplingParams
    seqs: List[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: Optional[list] = None
    finished: bool = False


@dataclass
class StepStats:
    time: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_time: float


class LLMEngine:
    """`add_request`, `step`, `abort_request`: the synchronous core of every entry point."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        hf_config = load_hf_config(self.model_dir)
        self.model_name = config.served_model_name or config.model
        self.tokenizer = get_tokenizer(self.model_dir, config.patch_tokenizer)
        model_max = hf_config.get("max_position_embeddings", 2048)
        self.max_model_len = config.max_model_len or model_max
        self.runner = ModelRunner(
            self.model_dir, config.dtype, config.device, self.max_model_len, config.max_num_seqs,
            config.kv_cache_memory, config.kv_cache_backend, config.block_size, config.page_size,
            config.async_kv_mapping, config.num_threads)
        num_blocks, block_size, num_slots = self.runner.kv_layout()
        self.kv = KVManager(num_blocks, block_size, min(num_slots, config.max_num_seqs))
        self.scheduler = make_scheduler(config.scheduler, self.kv, config.max_num_seqs, self.max_model_len,
                                        config.chunk_size, config.max_num_batched_tokens)
        self.eos_token_ids = self._eos_ids(hf_config)
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self.requests: Dict[str, Request] = {}
        self._seq_counter = itertools.count()
        self.step_stats: Deque[StepStats] = deque(maxlen=10000)
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "requests_finished_total": 0}
        self._pending_outputs: List[RequestOutput] = []

    def _eos_ids(self, hf_config: dict) -> set:
        ids = set()
        for value in (getattr(self.tokenizer, "eos_token_id", None), hf_config.get("eos_token_id")):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    # ---- requests ------------------------------------------------------------
    def encode_prompt(self, prompt: Optional[str], prompt_token_ids: Optional[List[int]]) -> List[int]:
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string (or pass prompt_token_ids)")
            if prompt == "":
                raise ValueError("prompt must not be empty")
            prompt_token_ids = list(self.tokenizer.encode(prompt))
        vocab = self.runner.model.args.vocab_size
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        self.scheduler.check_prompt(len(prompt_token_ids))
        return prompt_token_ids

    def add_request(self, request_id: str, prompt: Optional[str], sampling_params: SamplingParams,
                    prompt_token_ids: Optional[List[int]] = None, arrival_time: Optional[float] = None) -> None:
        """Queue a request. Raises ValueError for bad input; nothing else is affected."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        ids = self.encode_prompt(prompt, prompt_token_ids)
        p = sampling_params
        room = self.max_model_len - len(ids)
        max_tokens = room if p.max_tokens is None else min(p.max_tokens, room)
        now = arrival_time if arrival_time is not None else time.monotonic()
        req = Request(request_id, prompt, ids, p, [], RequestMetrics(arrival_time=now))
        if p.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        for i in range(p.n):
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(p.seed + i * 1_000_003)
            detok = IncrementalDetokenizer.after_prompt(self.tokenizer, ids, p.skip_special_tokens)
            seq = Sequence(next(self._seq_counter), request_id, i, list(ids), now, max_tokens,
                           data=SeqState(detok, gen, logprobs=[] if p.logprobs is not None else None))
            req.seqs.append(seq)
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.counters["prompt_tokens_total"] += len(ids)

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        """Stop a request now; its KV slots are freed at once."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self._free(seq)
            req.finished = True
            req.metrics.finished_time = time.monotonic()
            self._pending_outputs.append(self._make_output(req))
            del self.requests[rid]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _free(self, seq: Sequence) -> None:
        slot = self.scheduler.finish(seq)
        if slot is not None:
            self.runner.free_slot(slot)

    # ---- one step ------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Schedule and run one batch; return outputs of requests that made progress."""
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule()
        for slot in sched.freed_slots:
            self.runner.free_slot(slot)
        for seq in sched.preempted:
            self.requests[seq.request_id].metrics.num_preemptions += 1
        if sched.is_empty:
            return outputs
        start = time.monotonic()
        touched = self._run(sched, start)
        end = time.monotonic()
        self.step_stats.append(StepStats(end, sched.num_prefill_tokens, sched.num_decode_tokens,
                                         len(sched.scheduled), end - start))
        for req in touched:
            outputs.append(self._make_output(req))
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _run(self, sched: SchedulerOutput, now: float) -> List[Request]:
        run_seqs, sample_at, plp_at = [], [], []
        for item in sched.scheduled:
            seq, n = item.seq, item.num_tokens
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            start = seq.num_computed_tokens
            tokens = seq.token_ids()[start:start + n]
            samples = start + n == seq.num_tokens
            want_plp = (req.prompt_logprobs is not None and seq.index == 0 and seq.num_preemptions == 0
                        and start < len(seq.prompt_token_ids) - 1)
            first_row = 0 if want_plp else n - 1
            last_row = n if (samples or want_plp) else first_row
            table = self.kv.block_table(seq.seq_id) if self.config.kv_cache_backend == "paged" else None
            run_seqs.append(RunSeq(self.kv.slot(seq.seq_id), tokens, start, (first_row, last_row), table))
            sample_at.append(samples)
            plp_at.append(want_plp)
        logits = self.runner.execute(run_seqs, len(sched.prefills))

        rows: List[SampleRequest] = []
        row_logits = []
        offset = 0
        for item, rs, samples, want_plp in zip(sched.scheduled, run_seqs, sample_at, plp_at):
            seq = item.seq
            count = rs.logits_rows[1] - rs.logits_rows[0]
            block = logits[offset:offset + count]
            offset += count
            if want_plp:
                req = self.requests[seq.request_id]
                start = rs.context_len
                prompt = seq.prompt_token_ids
                npos = min(len(prompt) - 1 - start, count)  # positions predicting a prompt token
                lps = prompt_logprobs(block[:npos], prompt[start + 1:start + 1 + npos], req.params.prompt_logprobs)
                req.prompt_logprobs.extend(self._to_logprobs(d) for d in lps)
            seq.num_computed_tokens += item.num_tokens
            if samples:
                p = self.requests[seq.request_id].params
                blocked = ()
                if len(seq.output_token_ids) < p.min_tokens:
                    blocked = tuple(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
                st: SeqState = seq.data
                rows.append(SampleRequest(p, seq.prompt_token_ids, seq.output_token_ids, st.generator, blocked))
                row_logits.append(offset - 1)
        touched: Dict[str, Request] = {}
        if rows:
            picked = logits if len(row_logits) == logits.shape[0] else logits[row_logits]
            results = sample(picked, rows, self.generator)
            sampled = [item.seq for item, s in zip(sched.scheduled, sample_at) if s]
            now = time.monotonic()
            for seq, res in zip(sampled, results):
                req = self.requests[seq.request_id]
                self._append_token(req, seq, res, now)
                touched[req.request_id] = req
        return list(touched.values())

    def _to_logprobs(self, d: Dict[int, tuple]) -> Dict[int, Logprob]:
        return {tid: Logprob(lp, rank, self.tokenizer.decode([tid])) for tid, (lp, rank) in d.items()}

    def _append_token(self, req: Request, seq: Sequence, res, now: float) -> None:
        p, st = req.params, seq.data
        tok = res.token_id
        seq.output_token_ids.append(tok)
        self.counters["generation_tokens_total"] += 1
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if seq.index == 0:
            m.token_times.append(now)
        st.cumulative_logprob += res.logprob
        if st.logprobs is not None:
            d = {tok: (res.logprob, res.rank)}
            for rank, (tid, lp) in enumerate(res.top, start=1):
                d.setdefault(tid, (lp, rank))
            st.logprobs.append(self._to_logprobs(d))

        n_out = len(seq.output_token_ids)
        stop_by_token = n_out > p.min_tokens - 1 and (
            tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids))
        if stop_by_token:
            if p.include_stop_str_in_output and tok in p.stop_token_ids:
                st.text += st.detok.step(seq.token_ids())
            self._finish(req, seq, "stop", tok if tok in p.stop_token_ids else None)
            return
        new_text = st.detok.step(seq.token_ids())
        if new_text:
            prev_len = len(st.text)
            st.text += new_text
            if p.stop_strs and n_out >= p.min_tokens:
                hit = self._find_stop(st.text, prev_len, p.stop_strs)
                if hit is not None:
                    idx, s = hit
                    st.text = st.text[:idx + len(s)] if p.include_stop_str_in_output else st.text[:idx]
                    self._finish(req, seq, "stop", s)
                    return
        if n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(req, seq, "length", None)

    @staticmethod
    def _find_stop(text: str, prev_len: int, stops: List[str]):
        best = None
        for s in stops:
            i = text.find(s, max(prev_len - len(s) + 1, 0))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _finish(self, req: Request, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._free(seq)
        if all(s.is_finished for s in req.seqs):
            req.finished = True
            req.metrics.finished_time = time.monotonic()
            self.counters["requests_finished_total"] += 1

    # ---- outputs -------------------------------------------------------------
    def _visible_text(self, seq: Sequence, params: SamplingParams) -> str:
        """Hold back a tail that could still become a stop string, so none ever leaks."""
        text = seq.data.text
        if seq.is_finished or not params.stop_strs:
            return text
        hold = 0
        for s in params.stop_strs:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[:len(text) - hold]

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            st: SeqState = seq.data
            outs.append(CompletionOutput(
                index=seq.index, text=self._visible_text(seq, req.params), token_ids=list(seq.output_token_ids),
                cumulative_logprob=st.cumulative_logprob,
                logprobs=list(st.logprobs) if st.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
                             outs, req.finished, req.metrics)

    # ---- stats ---------------------------------------------------------------
    def get_stats(self) -> Dict[str, float]:
        running = len(self.scheduler.running)
        waiting = len(self.scheduler.waiting)
        stats = {
            "num_running": running, "num_waiting": waiting, "kv_usage": self.kv.usage,
            "kv_blocks_total": self.kv.num_blocks, "kv_blocks_free": self.kv.num_free_blocks,
            "kv_block_tokens": self.kv.block_size,
            "kv_bytes_total": self.kv.num_blocks * self.kv.block_size * self.runner.kv_spec.bytes_per_token,
            "num_preemptions_total": self.scheduler.num_preemptions,
        }
        stats["kv_bytes_used"] = int(stats["kv_bytes_total"] * self.kv.usage)
        stats.update(self.counters)
        stats.update({f"kv_cache_{k}": v for k, v in self.runner.kv_cache.stats().items()})
        return stats
