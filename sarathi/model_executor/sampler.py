"""Turn logits into tokens: penalties, bias, temperature, top-k/top-p/min-p, seeds, logprobs.

Logprobs are reported from the model's raw distribution (log-softmax of the logits),
as HF and vLLM report them. A seeded row draws its randomness from its own
generator, so its tokens do not depend on what else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence as Seq, Tuple

import torch

from sarathi.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    """One row of the logits to sample from."""

    params: SamplingParams
    prompt_ids: List[int]
    output_ids: List[int]
    generator: Optional[torch.Generator]   # None: the engine's shared generator
    block_ids: Tuple[int, ...] = ()          # ids not allowed yet (EOS/stop ids before min_tokens)


@dataclass
class SampleResult:
    token_id: int
    logprob: float
    rank: int
    top: List[Tuple[int, float]]           # top-N (id, logprob), N = params.logprobs


def apply_penalties(logits: torch.Tensor, rows: Seq[SampleRequest]) -> None:
    """Repetition (HF: prompt + output), presence and frequency (OpenAI: output) penalties, in place."""
    for i, r in enumerate(rows):
        p = r.params
        if not p.needs_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long,
                                device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if r.output_ids and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(r.output_ids, device=logits.device).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _filter(logits: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masking, vectorised over rows."""
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=dev).unsqueeze(1)
    logits = logits / temps
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=dev).clamp(max=vocab)
        ranks = torch.arange(vocab, device=dev).unsqueeze(0)
        drop = ranks >= k.unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        drop |= before >= torch.tensor(top_p, device=dev).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(m > 0.0 for m in min_p):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor(min_p, device=dev).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, rows: Seq[SampleRequest], shared: torch.Generator) -> List[SampleResult]:
    """Sample one token per row of logits [N, V] (float32)."""
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    logits = logits.clone()
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), dtype=torch.long, device=logits.device)
            ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
            vals = torch.tensor([r.params.logit_bias[int(t)] for t in ids], device=logits.device)
            logits[i, ids] += vals
        if r.block_ids:
            logits[i, list(r.block_ids)] = float("-inf")
    apply_penalties(logits, rows)

    greedy = [r.params.greedy for r in rows]
    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, g in enumerate(greedy) if not g]
    if random_rows:
        sub = [rows[i] for i in random_rows]
        probs = _filter(logits[random_rows], sub).softmax(dim=-1)
        for j, (i, r) in enumerate(zip(random_rows, sub)):
            gen = r.generator or shared
            # Exponential race: argmax p / E with E ~ Exp(1) is a draw from p.
            noise = torch.empty_like(probs[j]).exponential_(generator=gen)
            chosen[i] = (probs[j] / noise).argmax()

    results = []
    chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    ranks = (raw_logprobs > chosen_lp.unsqueeze(1)).sum(dim=-1) + 1
    max_n = max((r.params.logprobs or 0) for r in rows)
    top_vals = top_ids = None
    if max_n > 0:
        top_vals, top_ids = raw_logprobs.topk(max_n, dim=-1)
    for i, r in enumerate(rows):
        n = r.params.logprobs or 0
        top = list(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist())) if n else []
        results.append(SampleResult(int(chosen[i]), float(chosen_lp[i]), int(ranks[i]), top))
    return results


def prompt_logprobs(logits: torch.Tensor, next_ids: List[int], n: int) -> List[Dict[int, Tuple[float, int]]]:
    """For logits of positions predicting next_ids: {id: (logprob, rank)} with the actual
    token plus the top-n alternatives."""
    lp = torch.log_softmax(logits, dim=-1)
    ids = torch.tensor(next_ids, dtype=torch.long, device=logits.device)
    actual = lp.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = (lp > actual.unsqueeze(1)).sum(dim=-1) + 1
    top_vals = top_ids = None
    if n > 0:
        top_vals, top_ids = lp.topk(n, dim=-1)
    out = []
    for i, t in enumerate(next_ids):
        d = {t: (float(actual[i]), int(ranks[i]))}
        if n > 0:
            for rank, (tid, val) in enumerate(zip(top_ids[i].tolist(), top_vals[i].tolist()), start=1):
                d.setdefault(tid, (val, rank))
        out.append(d)
    return out
