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
from sarathi.model_executor.sampler import SampleResult
from sarathi.optimal_sampling.kl import diagnostics_rows, solve_alpha
from vattention_ext.threads import native_threads

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

    The math is whole-vocabulary float64 passes over all rows: torch gets the native kernels'
    threads for it (an engine of quantized linears otherwise gives torch's ops one)."""
    before, want = torch.get_num_threads(), native_threads()
    if want > before:
        torch.set_num_threads(want)
    try:
        return _sample_rows(rows, shared)
    finally:
        if want > before:
            torch.set_num_threads(before)


def _sample_rows(rows: Sequence[OptimalRow], shared: torch.Generator) -> List[Tuple[SampleResult, float, Dict]]:
    theta = torch.stack([r.logits_theta for r in rows]).float()
    target = torch.stack([r.logits_t for r in rows]).float()
    for i, r in enumerate(rows):
        if r.blocked:
            theta[i, list(r.blocked)] = float("-inf")
            target[i, list(r.blocked)] = float("-inf")
    lt, lh = torch.log_softmax(theta, -1), torch.log_softmax(target, -1)
    alphas = [r.alpha for r in rows]
    auto = [i for i, a in enumerate(alphas) if a is None]
    if auto:
        solved = solve_alpha(lt[auto], lh[auto], tol=min(rows[i].tol for i in auto)).tolist()
        for i, a in zip(auto, solved):
            alphas[i] = a
    out = []
    diags = diagnostics_rows(lt, lh, alphas)
    for i, r in enumerate(rows):
        a = alphas[i]
        # At the ends q* is exactly one model's distribution, computed as the plain sampler does.
        mix = theta[i] if a == 0.0 else target[i] if a == 1.0 else (1.0 - a) * lt[i] + a * lh[i]
        probs = mix.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=r.generator or shared)
        token = int((probs / noise).argmax())
        logq = torch.log_softmax(mix, -1)
        lp = float(logq[token])
        top: List[Tuple[int, float]] = []
        rank = 0
        if r.logprobs is not None:
            rank = int((logq > logq[token]).sum()) + 1
            if r.logprobs:
                vals, ids = logq.topk(r.logprobs)
                top = list(zip(ids.tolist(), vals.tolist()))
        out.append((SampleResult(token, lp, rank, top), a, diags[i]))
    return out
