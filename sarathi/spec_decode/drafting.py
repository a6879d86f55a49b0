"""Drafting with a model, one position at a time for a batch of sequences: the first pass
feeds what the drafter's KV lacks of each sequence (its last token for an early exit; any
tokens not seen yet for a draft model), every later pass the draft just made. Greedy rows
take the argmax, sampled rows draw from the drafter's filtered distribution q and keep it
for verification."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from sarathi.model_executor.model_runner import RunSeq
from sarathi.model_executor.sampler import SampleRequest, draw, processed_logits, sampling_probs


@dataclass
class DraftRun:
    """One sequence to draft for: its slot, the position of feed[0], the tokens the first pass
    feeds, how many drafts, and its sampling request (the output so far)."""

    slot: int
    block_table: Optional[List[int]]
    lora_name: Optional[str]
    start: int
    feed: List[int]
    k: int
    request: SampleRequest


# forward(runs, num_prefills) -> the logits of each run's last row
Forward = Callable[[List[RunSeq], int], torch.Tensor]


def draft(forward: Forward, runs: List[DraftRun], shared: torch.Generator
          ) -> List[Tuple[List[int], Optional[torch.Tensor]]]:
    """Each run's drafts and, where it samples, the distributions [k, V] they came from."""
    drafts: List[List[int]] = [[] for _ in runs]
    probs: List[List[torch.Tensor]] = [[] for _ in runs]
    for j in range(max(r.k for r in runs)):
        active = [i for i, r in enumerate(runs) if r.k > j]
        seqs = []
        for i in active:
            r = runs[i]
            feed, start = (r.feed, r.start) if j == 0 else ([drafts[i][-1]], r.start + len(r.feed) + j - 1)
            seqs.append(RunSeq(r.slot, feed, start, (len(feed) - 1, len(feed)), r.block_table, r.lora_name))
        order = sorted(range(len(seqs)), key=lambda n: len(seqs[n].token_ids) == 1)   # chunks first
        logits = forward([seqs[n] for n in order], sum(1 for s in seqs if len(s.token_ids) > 1))
        logits = logits[torch.tensor(sorted(range(len(order)), key=lambda n: order[n]))]
        reqs = []
        for i in active:
            r = runs[i].request
            reqs.append(SampleRequest(r.params, r.prompt_ids, r.output_ids + drafts[i], r.generator))
        processed = processed_logits(logits, reqs)
        chosen = processed.argmax(dim=-1).tolist()
        sampled = [n for n, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            p = sampling_probs(processed[sampled], [reqs[n] for n in sampled])
            picks = draw(p, [reqs[n].generator or shared for n in sampled])
            for m, n in enumerate(sampled):
                chosen[n] = picks[m]
                probs[active[n]].append(p[m])
        for n, i in enumerate(active):
            drafts[i].append(chosen[n])
    return [(d, torch.stack(q) if q else None) for d, q in zip(drafts, probs)]
