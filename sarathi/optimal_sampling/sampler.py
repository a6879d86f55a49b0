"""The in-engine exact form: a second model π_t next to the engine's π_θ, both run on every
step for the sequences that sample from q*, over the full vocabulary.

`OptimalSampler` is a runner-side component (model_runner.SecondModel): the runner asks it
which rows of π_t to compute in its own forward (`extra_groups`) and lets it draw the tokens
of the sequences it claims (`sample`). π_t is either another model (`--optimal-sampling-target
MODEL`, same tokenizer; its own weights and runner) or a LoRA adapter of the served model (the
base's weights with the adapter on every row, computed in the model's forward beside π_θ's
rows). Either way it keeps its own KV cache, in the same slots as π_θ's, sized by the KV
backend's `mirror` so that whatever the scheduler admits for π_θ also fits π_t (memory in
addition to --kv-cache-memory).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sarathi.core.sequence import Binding
from sarathi.model_executor.kv_cache import kv_backend_class
from sarathi.model_executor.model_runner import ModelRunner, ModelRunnerOutput, SeqPlan
from sarathi.model_executor.sampler import SampleResult, draw, logsumexp_rows
from sarathi.optimal_sampling.native import solve_rows
from sarathi.outputs import OptimalToken
from sarathi.sampling_params import InvalidParam

logger = logging.getLogger("sarathi")


class Target:
    """π_t for the sequences that name it: owns their KV in π_t."""

    name: str
    fused = False     # True: its rows run in the served model's forward

    def free_slot(self, slot: int) -> None:
        self.kv.free_slot(slot)

    def release_front(self, slot: int, pages: int) -> None:
        pass   # a model of its own keeps its pages (the engine releases none beside one)

    def close(self) -> None:
        self.kv.close()


class AdapterTarget(Target):
    """π_t = the served model plus a LoRA adapter: the same weights (its rows run in the
    model's forward, beside π_θ's), its own KV of the same geometry."""

    fused = True

    def release_front(self, slot: int, pages: int) -> None:
        self.kv.release_front(slot, pages)   # the served model's geometry and windows

    def __init__(self, runner: ModelRunner, adapter: str):
        self.name = self.adapter = adapter
        self.kv = kv_backend_class(runner.kv_backend_name)(runner.kv_spec)

    def group(self, members: List[SeqPlan], num_prefills: int):
        return [dataclasses.replace(p.run, lora_name=self.adapter) for p in members], num_prefills, self.kv


class ModelTarget(Target):
    """π_t = another model with the same tokenizer, loaded next to π_θ."""

    def __init__(self, name: str, runner: ModelRunner):
        self.name, self.runner = name, runner
        self.kv = runner.kv_backend

    def forward(self, members: List[SeqPlan], num_prefills: int) -> torch.Tensor:
        return self.runner.forward([([p.run for p in members], num_prefills, self.kv)])

    def close(self) -> None:
        self.runner.close()


def load_model_target(config, runner: ModelRunner, tokenizer, served_names: Sequence[str]) -> ModelTarget:
    """--optimal-sampling-target: its own runner, with a KV cache that mirrors the served one's slots."""
    from sarathi.model_executor.model_loader import load_hf_config, resolve_model_dir
    from sarathi.model_executor.models import model_args
    from sarathi.transformers_utils.tokenizer import get_tokenizer

    serving = config.serving_config
    name = serving.optimal_sampling_target_name or serving.optimal_sampling_target
    if name in served_names:
        raise ValueError(f"--optimal-sampling-target-name {name!r} is already the name of a served model")
    target_dir = resolve_model_dir(serving.optimal_sampling_target)
    if get_tokenizer(target_dir, config.model_config.patch_tokenizer).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--optimal-sampling-target {serving.optimal_sampling_target!r} has a different "
                         "tokenizer; q* needs both models over the same vocabulary")
    args = model_args(load_hf_config(target_dir))
    spec = runner.mirror_kv_spec(args.num_layers, args.num_kv_heads, args.head_dim)
    tconfig = config.replace(model=serving.optimal_sampling_target, enable_lora=False, lora_modules=None,
                             optimal_sampling_target=None)
    target = ModelRunner(tconfig, target_dir, max_model_len=runner.max_model_len, kv_spec=spec)
    if target.vocab_size != runner.vocab_size:
        raise ValueError(f"--optimal-sampling-target has {target.vocab_size} logits, this model {runner.vocab_size}")
    logger.info("optimal sampling target %r: %s, KV %.0f MB", name, target_dir, spec.kv_cache_memory / 1e6)
    return ModelTarget(name, target)


class OptimalSampler:
    """The runner-side component for sequences whose params carry `optimal_sampling`."""

    def __init__(self, runner: ModelRunner, adapters=None, model_target: Optional[ModelTarget] = None):
        self.runner, self.adapters = runner, adapters   # adapters: the LoRA manager (or None)
        self.models: Dict[str, ModelTarget] = {} if model_target is None else {model_target.name: model_target}
        self.runners = [t.runner for t in self.models.values()]
        self._adapter_targets: Dict[str, AdapterTarget] = {}
        self._groups: List[Tuple[Target, List[SeqPlan], int]] = []
        if adapters is not None:
            adapters.on_remove.append(self.forget)

    # ---- which targets exist ----------------------------------------------------
    def names(self) -> List[str]:
        """Names a request can give as its target: loaded models, then LoRA adapters."""
        adapters = [] if self.adapters is None else self.adapters.names()
        return list(dict.fromkeys([*self.models, *adapters]))

    def bind(self, params, lora_request=None) -> Binding:
        """A new request's target must exist (InvalidParam otherwise); it keeps it loaded."""
        if params.optimal_sampling is None:
            return Binding()
        self._target(params.optimal_sampling.target)
        return Binding(uses=frozenset([params.optimal_sampling.target]))

    def stats(self, scheduler) -> dict:
        return {}

    def _target(self, name: str) -> Target:
        target = self.models.get(name) or self._adapter_targets.get(name)
        if target is None:
            if self.adapters is None or name not in self.adapters.paths:
                raise InvalidParam("optimal_sampling", f"unknown optimal_sampling target {name!r}; targets: "
                                                       f"{self.names()}")
            target = self._adapter_targets[name] = AdapterTarget(self.runner, name)
        return target

    def claims(self, seq) -> bool:
        return seq.params.optimal_sampling is not None

    def forget(self, name: str) -> None:
        """An adapter was unloaded: its KV as a target goes too."""
        target = self._adapter_targets.pop(name, None)
        if target is not None:
            target.close()

    # ---- one step (model_runner.SecondModel) --------------------------------------
    def extra_groups(self, plan: List[SeqPlan], num_prefills: int):
        """π_t runs every chunk of its sequences (so its KV keeps up): an adapter target in the
        served model's forward, another model in a forward of its own (in `sample`)."""
        by_target: Dict[str, List[Tuple[int, SeqPlan]]] = {}
        for i, p in enumerate(plan):
            if p.seq.params.optimal_sampling is not None:
                by_target.setdefault(p.seq.params.optimal_sampling.target, []).append((i, p))
        self._groups = []
        for name, members in by_target.items():
            prefills = sum(1 for i, _ in members if i < num_prefills)
            self._groups.append((self._target(name), [p for _, p in members], prefills))
        return [t.group(members, prefills) for t, members, prefills in self._groups if t.fused]

    def sample(self, plan, rows: Dict[SeqPlan, torch.Tensor], extra_logits: torch.Tensor,
               shared: torch.Generator, batch, out: ModelRunnerOutput) -> None:
        """One token per claimed sequence from q* over the full vocabulary, with α and diagnostics."""
        target_rows: Dict[SeqPlan, torch.Tensor] = {}
        offset = 0
        for target, members, prefills in self._groups:
            if target.fused:
                block, base = extra_logits, offset
                offset += sum(p.run.num_logits for p in members)
            else:
                block, base = target.forward(members, prefills), 0
            for p in members:
                base += p.run.num_logits
                if p.samples:
                    target_rows[p] = block[base - 1]
        claimed = [p for p in plan if p in target_rows and p in rows]
        if not claimed:
            return
        params = [p.seq.params for p in claimed]
        results = sample_rows([OptimalRow(rows[p], target_rows[p], q.optimal_sampling.fixed_alpha,
                                          q.optimal_sampling.tol, batch.generator(p.seq),
                                          tuple(p.seq.blocked_token_ids), q.logprobs)
                               for p, q in zip(claimed, params)], shared)
        for p, (res, alpha, diag) in zip(claimed, results):
            out.samples[p.seq.seq_id] = res
            out.token_info[p.seq.seq_id] = OptimalToken(alpha, diag)

    def free_slot(self, slot: int) -> None:
        for target in [*self.models.values(), *self._adapter_targets.values()]:
            target.free_slot(slot)

    def release_front(self, slot: int, pages: int) -> None:
        for target in [*self.models.values(), *self._adapter_targets.values()]:
            target.release_front(slot, pages)

    def close(self) -> None:
        for target in [*self.models.values(), *self._adapter_targets.values()]:
            target.close()


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
        lse = logsumexp_rows(raw)
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
