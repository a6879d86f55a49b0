"""The in-engine exact form: a second model π_t next to the engine's π_θ, both run on every
step for the sequences that sample from q*, over the full vocabulary.

π_t is either another model (`--optimal-sampling-target MODEL`, same tokenizer; its own
weights) or a LoRA adapter of the served model (the base's weights with the adapter on every
row). Either way it keeps its own KV cache, in the same slots as π_θ's, sized so that whatever
the scheduler admits for π_θ also fits π_t (it is memory in addition to --kv-cache-memory).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sarathi.model_executor.kv_cache import KVCacheSpec, kv_backend_class
from sarathi.model_executor.model_runner import ModelRunner, RunSeq
from sarathi.model_executor.sampler import SampleResult, draw
from sarathi.optimal_sampling.native import solve_rows

logger = logging.getLogger("sarathi")


class Target:
    """π_t for the sequences that name it: owns their KV in π_t. A target on the engine's own
    runner (AdapterTarget) gives `group`, rows for the model's forward; another model
    (ModelTarget) runs them itself with `execute`."""

    name: str

    def free_slot(self, slot: int) -> None:
        self.kv.free_slot(slot)

    def close(self) -> None:
        self.kv.close()


class AdapterTarget(Target):
    """π_t = the served model plus a LoRA adapter: the same weights (its rows run in the
    model's forward, beside π_θ's), its own KV."""

    def __init__(self, runner: ModelRunner, adapter: str):
        self.name, self.runner, self.adapter = adapter, runner, adapter
        spec = runner.kv_spec
        self.kv = kv_backend_class(runner.kv_backend_name)(spec)  # same geometry, same budget

    def group(self, seqs: List[RunSeq], num_prefills: int):
        """The rows to run beside the model's in one forward (ModelRunner.execute's extra)."""
        return [dataclasses.replace(s, lora_name=self.adapter) for s in seqs], num_prefills, self.kv


class ModelTarget(Target):
    """π_t = another model with the same tokenizer, loaded next to π_θ."""

    def __init__(self, name: str, runner: ModelRunner):
        self.name, self.runner = name, runner
        self.kv = runner.kv_backend

    def execute(self, seqs: List[RunSeq], num_prefills: int) -> torch.Tensor:
        return self.runner.execute(seqs, num_prefills)

    def free_slot(self, slot: int) -> None:
        self.runner.free_slot(slot)

    def close(self) -> None:
        self.runner.close()


def mirror_kv_memory(backend: str, main: KVCacheSpec, main_layout: Tuple[int, int, int], target: KVCacheSpec,
                     page_size: Optional[int]) -> int:
    """KV bytes π_t needs so that anything the scheduler admits for π_θ fits π_t too."""
    num_blocks, block_size, slots = main_layout
    bpt = target.bytes_per_token
    if backend == "paged":       # π_θ's block tables index π_t's blocks: the same count of the same size
        return num_blocks * block_size * bpt
    if backend == "contiguous":
        return slots * target.max_model_len * bpt
    # vattention: each slot rounds up to whole pages, at most one extra page per slot
    token_bytes = target.num_kv_heads * target.head_dim * target.elem_size
    tokens_per_page = page_size // token_bytes
    if tokens_per_page < 1:
        raise ValueError(f"--optimal-sampling-target: the page size {page_size} is smaller than one of its "
                         f"tokens' K ({token_bytes} bytes)")
    pages = math.ceil(num_blocks * block_size / tokens_per_page) + slots
    return pages * page_size * 2 * target.num_layers


@dataclass
class OptimalRow:
    """One sequence that samples from q* this step."""

    logits_theta: torch.Tensor     # [V] float32
    logits_t: torch.Tensor
    alpha: Optional[float]          # None: solve for α*
    tol: float
    generator: Optional[torch.Generator]
    blocked: Tuple[int, ...]
    logprobs: Optional[int]


def sample_rows(rows: Sequence[OptimalRow], shared: torch.Generator) -> List[Tuple[SampleResult, float, Dict]]:
    """Draw one token from q* per row: (result with log q* values, α used, diagnostics).

    α*, the diagnostics and the draw are whole-vocabulary float64 passes in C++
    (native.solve_rows), a row per thread, the same bits in any batch, at one uniform number from
    the row's generator. A row with α fixed at 0 or 1 samples exactly as the plain sampler does
    (q* is then one model's own distribution)."""
    theta = torch.stack([r.logits_theta for r in rows]).float()
    target = torch.stack([r.logits_t for r in rows]).float()
    for i, r in enumerate(rows):
        if r.blocked:
            theta[i, list(r.blocked)] = float("-inf")
            target[i, list(r.blocked)] = float("-inf")
    ends = [r.alpha in (0.0, 1.0) for r in rows]
    uniforms = [None if end else float(torch.rand(1, generator=r.generator or shared, dtype=torch.float64))
                for r, end in zip(rows, ends)]
    res = solve_rows(theta, target, [r.alpha for r in rows], [r.tol for r in rows], uniforms)
    tokens, logq = list(res.tokens), list(res.logq)
    for i, r in enumerate(rows):
        if tokens[i] < 0 and not ends[i]:  # disjoint supports: q* is the arithmetic mixture (kl.q_star)
            a = res.alphas[i]
            mixture = (1.0 - a) * theta[i].softmax(-1) + a * target[i].softmax(-1)
            tokens[i] = draw(mixture[None], [r.generator or shared])[0]
            logq[i] = math.log(float(mixture[tokens[i]]))
    at_end = [i for i, end in enumerate(ends) if end]
    if at_end:
        raw = torch.stack([theta[i] if rows[i].alpha == 0.0 else target[i] for i in at_end])
        drawn = draw(raw.softmax(-1), [rows[i].generator or shared for i in at_end])
        lse = torch.logsumexp(raw, -1)
        for j, i in enumerate(at_end):
            tokens[i], logq[i] = drawn[j], float(raw[j, drawn[j]] - lse[j])
    out = []
    for i, r in enumerate(rows):
        top: List[Tuple[int, float]] = []
        rank = 0
        if r.logprobs is not None:  # the whole log q* row, only where asked for
            a = res.alphas[i]
            lt, lh = torch.log_softmax(theta[i], -1), torch.log_softmax(target[i], -1)
            row = torch.log_softmax(lt if a == 0.0 else lh if a == 1.0 else (1.0 - a) * lt + a * lh, -1)
            rank = int((row > row[tokens[i]]).sum()) + 1
            if r.logprobs:
                vals, ids = row.topk(r.logprobs)
                top = list(zip(ids.tolist(), vals.tolist()))
        out.append((SampleResult(tokens[i], logq[i], rank, top), res.alphas[i], res.diagnostics[i]))
    return out
