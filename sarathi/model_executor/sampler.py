"""Turn logits into tokens: penalties, bias, temperature, top-k/top-p/min-p, seeds, logprobs.

Logprobs are reported from the model's raw distribution (log-softmax of the logits),
as HF and vLLM report them; for a row a grammar constrains (structured outputs), from that
distribution restricted to the tokens the grammar allows, the one the token is drawn from
(before temperature and the top-k/p filters). A seeded row draws its randomness from its
own generator, so its tokens do not depend on what else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence as Seq, Tuple

import torch

from sarathi.model_executor import _sampler
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


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Seq[int]) -> None:
    """logits[r] = -inf, in place, where bitmask[r] forbids the token (int32 words, bit k of word w is
    token 32 w + k; a grammar's allowed tokens), for r in rows. On CPU one native pass per row
    (csrc/sampler/bitmask.cpp; 32 rows of 49,152 tokens: 0.15 ms, where xgrammar's own CPU apply
    took 8.7 ms on our 2-core machine); elsewhere torch unpacks the bits."""
    rows = list(rows)
    if not rows:
        return
    if bitmask.dim() != 2 or logits.dim() != 2 or bitmask.shape[1] * 32 < logits.shape[1]:
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}")
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        words = bitmask.to("cpu", torch.int32).contiguous()
        _sampler.apply_token_bitmask(logits.data_ptr(), logits.shape[0], logits.shape[1], words.data_ptr(),
                                     words.shape[0], words.shape[1], rows)
        return
    index = torch.tensor(rows, device=logits.device)
    words = bitmask.to(logits.device, torch.int32)[index]
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=logits.device, dtype=torch.int32)) & 1
    allowed = bits.reshape(len(rows), -1)[:, :logits.shape[1]].bool()
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def draw(probs: torch.Tensor, generators: Seq[torch.Generator]) -> List[int]:
    """One index per row of probs [n, V] (need not sum to 1), drawn with that row's generator by
    inverting the row's float64 cumulative sum at one uniform number: the first index whose
    cumulative mass exceeds u * total, so never a zero-probability index. One random number and
    one sequential pass per row: the exponential race (argmax p / E, E ~ Exp(1) per token) costs
    a random number and a log per token, about 1 ms per 49,152-token row with torch on CPU,
    paid by every sampled row of every step. A row's draw depends only on its own probabilities
    and generator."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators])
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    out = idx.tolist()
    for i, j in enumerate(out):
        if j >= probs.shape[1]:  # u * total rounded up to the total (or NaNs): the last token with mass
            mass = torch.nonzero(probs[i] > 0)
            out[i] = int(mass[-1]) if mass.numel() else int(probs[i].argmax())
    return out


def processed_logits(logits: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
    """logit_bias, ids blocked before min_tokens and the penalties, applied (a copy where any applies)."""
    if any(r.params.logit_bias or r.block_ids or r.params.needs_penalties for r in rows):
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
    return logits


def sampling_probs(logits: torch.Tensor, rows: Seq[SampleRequest]) -> torch.Tensor:
    """The distribution a non-greedy row draws from, given its processed logits: temperature,
    top-k, top-p, min-p, softmax."""
    return _filter(logits, rows).softmax(dim=-1)


def sample(logits: torch.Tensor, rows: Seq[SampleRequest], shared: torch.Generator) -> List[SampleResult]:
    """Sample one token per row of logits [N, V] (float32)."""
    processed = processed_logits(logits, rows)
    chosen = processed.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        sub = [rows[i] for i in random_rows]
        probs = sampling_probs(processed[random_rows], sub)
        drawn = draw(probs, [r.generator or shared for r in sub])
        chosen[random_rows] = torch.tensor(drawn, dtype=chosen.dtype, device=chosen.device)
    return describe(logits, chosen.tolist(), rows)


_EXP_FLOOR = -87.0   # exp(-87) = 1.6e-38: still a normal float


def logsumexp_rows(raw: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp over the last dimension, without x86's slow underflow path on the CPU.

    torch computes max + log(sum(exp(x - max))); where logits spread wide (a random-weight model's
    span hundreds of units) most exp(x - max) underflow, and each underflowing exp runs a slow path:
    1.4 vs 0.04 ms for one 49k-vocabulary row, 45 vs 2 ms for 32 rows. Here x - max is clamped at -87
    first, so every exp stays a normal float. That adds < 2^-126 per entry (< 2^-109 for a 2^17
    vocabulary) to a sum that holds exp(0) = 1, far below half an ulp of it: the same bits as
    torch.logsumexp. Rows whose max is not finite (all -inf, +inf, NaN) take torch's op."""
    if raw.device.type != "cpu":
        return torch.logsumexp(raw, dim=-1)
    m = raw.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(m).all()):
        return torch.logsumexp(raw, dim=-1)
    return (raw - m).clamp_(min=_EXP_FLOOR).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))


def describe(raw: torch.Tensor, chosen: Seq[int], rows: Seq[SampleRequest]) -> List[SampleResult]:
    """The SampleResult of token chosen[i] drawn from row i: its logprob in the raw distribution
    (log-softmax of raw), and its rank and the top-N where the row asks for logprobs."""
    chosen_t = torch.tensor(list(chosen), dtype=torch.long, device=raw.device)
    # Logprobs of the raw distribution: one logsumexp pass; ranks and top-N only where asked.
    lse = logsumexp_rows(raw)
    chosen_lp = raw.gather(1, chosen_t.unsqueeze(1)).squeeze(1) - lse
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    ranks: Dict[int, int] = {}
    tops: Dict[int, List[Tuple[int, float]]] = {}
    if want:
        sub_raw = raw[want]
        sub_chosen = raw.gather(1, chosen_t.unsqueeze(1))[want]
        counts = (sub_raw > sub_chosen).sum(dim=-1) + 1
        max_n = max(rows[i].params.logprobs for i in want)
        if max_n > 0:
            top_vals, top_ids = sub_raw.topk(max_n, dim=-1)
            top_vals = top_vals - lse[want].unsqueeze(1)
        for j, i in enumerate(want):
            ranks[i] = int(counts[j])
            n = rows[i].params.logprobs
            # a masked row (a grammar) may have fewer than n possible tokens: the impossible ones are left out
            tops[i] = [(t, v) for t, v in zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist())
                       if v != float("-inf")] if n else []
    chosen_l, lp_l = chosen_t.tolist(), chosen_lp.tolist()
    return [SampleResult(chosen_l[i], lp_l[i], ranks.get(i, 0), tops.get(i, [])) for i in range(len(rows))]


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
