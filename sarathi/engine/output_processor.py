"""From sampled tokens to what users see: text, stop strings, logprobs, metrics, outputs.

The output processor owns every request's text-side state (detokenizers, text, logprobs,
what a second model added per token) and its metrics. The scheduler has already appended
each sampled token and applied the token-id stops; here the token becomes text, stop
strings are found and `RequestOutput`s built. Nothing here frees memory: sequences stopped
by text, and every sequence of a request that failed, are handed back for the scheduler
to finish.

Failures are per request by construction: anything that goes wrong while turning one
request's tokens into text fails that request (an output with `error`), never the step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from sarathi.core.sequence import Sequence
from sarathi.model_executor.sampler import SampleResult
from sarathi.outputs import (CompletionOutput, Logprob, OptimalSamplingOutput, OptimalToken, RequestMetrics,
                             RequestOutput)
from sarathi.sampling_params import SamplingParams
from sarathi.transformers_utils.detokenizer import IncrementalDetokenizer

logger = logging.getLogger("sarathi")


@dataclass
class SeqText:
    """One sample's text-side state."""

    detok: IncrementalDetokenizer
    text: str = ""
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    optimal: Optional[OptimalSamplingOutput] = None


@dataclass
class RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    params: SamplingParams
    seqs: List[Sequence]
    metrics: RequestMetrics
    uses: frozenset = frozenset()          # adapters / models this request needs loaded
    texts: Dict[int, SeqText] = field(default_factory=dict)   # by seq_id
    prompt_logprobs: Optional[list] = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


def find_stop(text: str, prev_len: int, stops: List[str]):
    """Earliest (index, stop string) that ends after prev_len, or None."""
    best = None
    for s in stops:
        i = text.find(s, max(prev_len - len(s) + 1, 0))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def visible_text(text: str, finished: bool, params: SamplingParams) -> str:
    """Hold back a tail that could still become a stop string, so none ever leaks."""
    if finished or not params.stop_strs:
        return text
    hold = 0
    for s in params.stop_strs:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold]


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: Dict[str, RequestState] = {}
        self.generation_tokens = 0
        self.requests_finished = 0

    # ---- requests in and out ----------------------------------------------------
    def add(self, req: RequestState) -> None:
        """Start a request's text state (raises for a prompt the detokenizer cannot take)."""
        p = req.params
        for seq in req.seqs:
            req.texts[seq.seq_id] = SeqText(
                IncrementalDetokenizer.after_prompt(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens),
                logprobs=[] if p.logprobs is not None else None,
                optimal=None if p.optimal_sampling is None else OptimalSamplingOutput(p.optimal_sampling.target))
        if p.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        self.requests[req.request_id] = req

    def end(self, request_id: str, error: Optional[str] = None,
            error_param: Optional[str] = None) -> Optional[RequestOutput]:
        """Abort (or fail, with error) a request: its final output. Its sequences are the
        caller's to finish in the scheduler. error_param: the request field at fault."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        req.metrics.finished_time = time.monotonic()
        out = self.make_output(req)
        out.error, out.error_param = error, error_param
        return out

    # ---- one step ------------------------------------------------------------------
    def process(self, sched, runner_out) -> Tuple[List[RequestOutput], List[Sequence]]:
        """Outputs of the requests that made progress in this step, and the sequences the
        scheduler must finish now (stopped by a stop string, or of a failed request)."""
        now = time.monotonic()
        outputs: List[RequestOutput] = []
        to_finish: List[Sequence] = []
        touched: Dict[str, RequestState] = {}
        failed: Dict[str, Tuple[str, Optional[str]]] = {}   # request -> (error, the field at fault)
        for seq, error in sched.rejected:   # a hold failed (its grammar did not compile): never ran
            if seq.request_id in self.requests:
                failed.setdefault(seq.request_id, (str(error), getattr(error, "param", None)))
        for seq in sched.preempted:
            req = self.requests.get(seq.request_id)
            if req is not None:
                req.metrics.num_preemptions += 1
        for item in sched.scheduled:
            seq = item.seq
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            if runner_out.error is not None:
                failed[req.request_id] = f"the model step running this request failed: {runner_out.error}", None
                continue
            if seq.seq_id in runner_out.failed:
                failed[req.request_id] = f"this request failed: {runner_out.failed[seq.seq_id]}", None
                continue
            try:
                self._record(req, seq, item, runner_out, now)
            except Exception as e:  # noqa: BLE001 - e.g. a token the detokenizer cannot handle
                logger.exception("output processing failed for request %s", req.request_id)
                failed[req.request_id] = f"processing this request's output failed: {type(e).__name__}: {e}", None
                continue
            if seq.seq_id in runner_out.sampled_token_ids or seq.finish_reason is not None:
                touched[req.request_id] = req
            if seq.finish_reason is not None and not seq.is_finished:
                to_finish.append(seq)
        for rid, (message, param) in failed.items():
            touched.pop(rid, None)
            req = self.requests[rid]
            to_finish.extend(s for s in req.seqs if not s.is_finished)
            outputs.append(self.end(rid, message, param))
        for req in touched.values():
            outputs.append(self.make_output(req))
            if req.finished:
                req.metrics.finished_time = now
                self.requests_finished += 1
                del self.requests[req.request_id]
        return outputs, to_finish

    def _record(self, req: RequestState, seq: Sequence, item, runner_out, now: float) -> None:
        m = req.metrics
        if m.first_scheduled_time is None:
            m.first_scheduled_time = now
        if seq.index == 0 and seq.num_cached_tokens is not None:
            m.num_cached_tokens = seq.num_cached_tokens
        lps = runner_out.prompt_logprobs.get(seq.seq_id)
        if lps is not None:
            req.prompt_logprobs.extend(self._to_logprobs(d) for d in lps)
        res = runner_out.samples.get(seq.seq_id)
        if res is None:
            return
        # A speculating step may have appended several tokens (accepted drafts): each is
        # turned into text in order, and a stop string inside them ends the output there.
        results = [res, *runner_out.verified.get(seq.seq_id, ())][:max(getattr(item, "num_new_tokens", 1), 1)]
        base = len(seq.output_token_ids) - len(results)
        info = runner_out.token_info.get(seq.seq_id)
        for i, r in enumerate(results):
            if self._token(req, seq, r, info, now, base + i + 1, last=i == len(results) - 1):
                del seq.output_token_ids[base + i + 1:]   # tokens after the stop string never happened
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
                break

    def _to_logprobs(self, d: Dict[int, tuple]) -> Dict[int, Logprob]:
        """{token id: (logprob, rank)} -> {token id: Logprob with its text}."""
        return {tid: Logprob(lp, rank, self.tokenizer.decode([tid])) for tid, (lp, rank) in d.items()}

    def _token(self, req: RequestState, seq: Sequence, res: SampleResult, info, now: float,
                num_output: int, last: bool = True) -> bool:
        """Record output token num_output - 1 (last: the last the scheduler appended this step,
        the one a token-id stop ended on); True when a stop string ends the sequence on it."""
        p, st = req.params, req.texts[seq.seq_id]
        self.generation_tokens += 1
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if seq.index == 0:
            m.token_times.append(now)
        st.cumulative_logprob += res.logprob
        if st.logprobs is not None:
            d = {res.token_id: (res.logprob, res.rank)}
            for rank, (tid, lp) in enumerate(res.top, start=1):
                d.setdefault(tid, (lp, rank))
            st.logprobs.append(self._to_logprobs(d))
        if isinstance(info, OptimalToken) and st.optimal is not None:
            st.optimal.alpha_history.append(info.alpha)
            st.optimal.diagnostics.append(info.diagnostics)

        ids = seq.token_ids()[:len(seq.prompt_token_ids) + num_output]
        if last and seq.finish_reason == "stop":  # a token-id stop: its text shows only when asked for
            if p.include_stop_str_in_output and seq.stop_reason is not None:
                st.text += st.detok.step(ids)
            return False
        new_text = st.detok.step(ids)
        if new_text:
            prev_len = len(st.text)
            st.text += new_text
            if p.stop_strs and num_output >= p.min_tokens:
                hit = find_stop(st.text, prev_len, p.stop_strs)
                if hit is not None:
                    idx, s = hit
                    st.text = st.text[:idx + len(s)] if p.include_stop_str_in_output else st.text[:idx]
                    seq.finish_reason, seq.stop_reason = "stop", s
                    return True
        return False

    def make_output(self, req: RequestState) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            st = req.texts[seq.seq_id]
            opt = st.optimal
            outs.append(CompletionOutput(
                index=seq.index, text=visible_text(st.text, seq.finish_reason is not None, req.params),
                token_ids=list(seq.output_token_ids), cumulative_logprob=st.cumulative_logprob,
                logprobs=list(st.logprobs) if st.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                optimal_sampling=None if opt is None else OptimalSamplingOutput(
                    opt.target_model, list(opt.alpha_history), list(opt.diagnostics))))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
                             outs, req.finished, req.metrics, num_cached_tokens=req.metrics.num_cached_tokens)
