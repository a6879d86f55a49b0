"""Verification of drafted tokens against the target model, exactly.

Greedy rows keep drafts while they equal the target's argmax (after bias, penalties and
min_tokens blocks at that position, as plain sampling applies them), then add the target's
own token: the output is token for token what decoding without speculation gives.

Sampled rows use modified rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
draft d drawn from q is kept with probability min(1, p(d) / q(d)); at the first rejection
the token is drawn from norm(max(p - q, 0)); when all k are kept, one more is drawn from p
at position k + 1. The tokens are then distributed exactly as plain sampling from p. A
proposer without a distribution (n-gram lookup) proposes one token for sure: q is one-hot,
so d is kept with probability p(d), and on rejection the token comes from p without d.
A grammar's mask (structured outputs) restricts p at every position and q likewise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from sarathi.model_executor.sampler import (SampleRequest, SampleResult, apply_token_bitmask, describe, draw,
                                            processed_logits, sampling_probs)


@dataclass
class Verification:
    """One speculating sequence: its 1 + k target logits rows, its k drafts, the draft
    distributions they were drawn from ([k, V], None: one-hot), and one SampleRequest per
    position (each sees the drafts before it as output)."""

    logits: torch.Tensor
    drafts: List[int]
    draft_probs: Optional[torch.Tensor]
    requests: List[SampleRequest]


def verify(items: List[Verification], shared: torch.Generator,
           bitmasks: Sequence[Tuple[torch.Tensor, List[int]]] = ()) -> List[List[SampleResult]]:
    """The tokens each sequence keeps (1 to k + 1), with the target's logprobs. bitmasks: what
    grammars allow at each position (rows of the items' 1 + k rows laid end to end), applied
    to the target's logits as plain sampling applies them, and to the draft distributions."""
    raw = torch.cat([v.logits for v in items])
    for bitmask, rows in bitmasks:
        apply_token_bitmask(raw, bitmask, rows)
        _restrict_drafts(items, bitmask, rows)
    reqs = [r for v in items for r in v.requests]
    processed = processed_logits(raw, reqs)
    greedy = processed.argmax(dim=-1).tolist()
    random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    probs = {}
    if random_rows:
        p = sampling_probs(processed[random_rows], [reqs[i] for i in random_rows])
        probs = {row: p[j] for j, row in enumerate(random_rows)}
    out, offset = [], 0
    for v in items:
        n = len(v.drafts) + 1
        if v.requests[0].params.greedy:
            kept = _greedy(greedy[offset:offset + n], v.drafts)
        else:
            gen = v.requests[0].generator or shared
            kept = _rejection([probs[offset + j] for j in range(n)], v.drafts, v.draft_probs, gen)
        rows = list(range(offset, offset + len(kept)))
        out.append(describe(raw[rows], kept, [reqs[i] for i in rows]))
        offset += n
    return out


def _restrict_drafts(items: List[Verification], bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """q restricted to what the grammar allows, renormalised. A draft the grammar refuses is
    cut before verification (StructuredOutputManager.allowed_prefix), so a kept draft is
    distributed as q given that it is allowed: rejection sampling against that q is exact."""
    masked, offset = set(rows), 0
    for v in items:
        k = len(v.drafts)
        local = [j for j in range(k) if offset + j in masked]
        if v.draft_probs is not None and local:
            logq = v.draft_probs.log()
            apply_token_bitmask(logq, bitmask[offset:offset + k], local)
            v.draft_probs = logq.softmax(dim=-1)
        offset += k + 1


def _greedy(targets: List[int], drafts: List[int]) -> List[int]:
    kept = []
    for j, d in enumerate(drafts):
        kept.append(targets[j])
        if targets[j] != d:
            return kept
    kept.append(targets[len(drafts)])
    return kept


def _rejection(p: List[torch.Tensor], drafts: List[int], q: Optional[torch.Tensor],
               gen: torch.Generator) -> List[int]:
    kept = []
    for j, d in enumerate(drafts):
        p_d = float(p[j][d])
        q_d = 1.0 if q is None else float(q[j][d])
        u = float(torch.rand(1, generator=gen, dtype=torch.float64, device=p[j].device))
        if q_d > 0 and u * q_d < p_d:
            kept.append(d)
            continue
        if q is None:
            residual = p[j].clone()
            residual[d] = 0
        else:
            residual = (p[j] - q[j].to(p[j].dtype)).clamp_(min=0)
        if not float(residual.sum()) > 0:   # p == q up to rounding: any token from p is right
            residual = p[j]
        kept.append(draw(residual.unsqueeze(0), [gen])[0])
        return kept
    kept.append(draw(p[len(drafts)].unsqueeze(0), [gen])[0])
    return kept
