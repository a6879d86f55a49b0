"""From sampled tokens to what users see: text, stop strings, logprobs, metrics, outputs.

The scheduler has already appended each sampled token and applied the token-id
stops (`Scheduler.postprocess`); here the token becomes text, stop strings are
found, logprobs and timestamps recorded, and `RequestOutput`s built. Nothing here
frees memory: a sequence whose `finish_reason` is set is finished by the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from sarathi.core.sequence import Sequence
from sarathi.model_executor.sampler import SampleResult
from sarathi.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from sarathi.sampling_params import SamplingParams
from sarathi.transformers_utils.detokenizer import IncrementalDetokenizer


@dataclass
class SeqState:
    """Per-sequence sampling and text state, carried as `Sequence.data`."""

    detok: IncrementalDetokenizer
    generator: Optional[torch.Generator]
    text: str = ""
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    alpha_history: Optional[list] = None   # optimal sampling: α and diagnostics of each token
    diagnostics: Optional[list] = None


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
    lora_name: Optional[str] = None


def find_stop(text: str, prev_len: int, stops: List[str]):
    """Earliest (index, stop string) that ends after prev_len, or None."""
    best = None
    for s in stops:
        i = text.find(s, max(prev_len - len(s) + 1, 0))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def visible_text(seq: Sequence, params: SamplingParams) -> str:
    """Hold back a tail that could still become a stop string, so none ever leaks."""
    text = seq.data.text
    if seq.finish_reason is not None or not params.stop_strs:
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
        self.generation_tokens = 0

    def to_logprobs(self, d: Dict[int, tuple]) -> Dict[int, Logprob]:
        """{token id: (logprob, rank)} -> {token id: Logprob with its text}."""
        return {tid: Logprob(lp, rank, self.tokenizer.decode([tid])) for tid, (lp, rank) in d.items()}

    def add_prompt_logprobs(self, req: Request, lps: List[Dict[int, tuple]]) -> None:
        req.prompt_logprobs.extend(self.to_logprobs(d) for d in lps)

    def process_token(self, req: Request, seq: Sequence, res: SampleResult, now: float) -> None:
        """Record the token the scheduler appended last; may set finish_reason for a stop string."""
        p, st = req.params, seq.data
        tok = res.token_id
        self.generation_tokens += 1
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
            st.logprobs.append(self.to_logprobs(d))

        if seq.finish_reason == "stop":  # a token-id stop: its text shows only when asked for
            if p.include_stop_str_in_output and seq.stop_reason is not None:
                st.text += st.detok.step(seq.token_ids())
            return
        new_text = st.detok.step(seq.token_ids())
        if new_text:
            prev_len = len(st.text)
            st.text += new_text
            if p.stop_strs and len(seq.output_token_ids) >= p.min_tokens:
                hit = find_stop(st.text, prev_len, p.stop_strs)
                if hit is not None:
                    idx, s = hit
                    st.text = st.text[:idx + len(s)] if p.include_stop_str_in_output else st.text[:idx]
                    seq.finish_reason, seq.stop_reason = "stop", s

    def make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            st: SeqState = seq.data
            outs.append(CompletionOutput(
                index=seq.index, text=visible_text(seq, req.params), token_ids=list(seq.output_token_ids),
                cumulative_logprob=st.cumulative_logprob,
                logprobs=list(st.logprobs) if st.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                optimal_sampling=None if st.alpha_history is None else {
                    "target_model": req.params.optimal_sampling.target, "alpha_history": list(st.alpha_history),
                    "diagnostics": list(st.diagnostics)}))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
                             outs, req.finished, req.metrics, num_cached_tokens=req.metrics.num_cached_tokens)
