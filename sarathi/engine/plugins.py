"""The engine's feature rooms, wired onto the runner at start-up, asked about each new request.

A request plug-in answers `bind(params, lora_request) -> Binding` (core.sequence: the adapter,
the cache salt, names it keeps loaded, futures the request waits for before it is scheduled;
raising ValueError / InvalidParam fails that request alone, at admission) and
`stats(scheduler) -> dict`. Runner-side parts plug into the runner's own seams: `runner.adapters`
(the LoRA manager), `runner.second_models` (optimal sampling; a proposer would go there too) and
`runner.masks` (structured outputs' grammars) and `runner.proposer` (speculative decoding's
drafts and their verification). A new feature is a new entry here; the engine only
calls `attach`, `bind` and `stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, List, Optional

from sarathi.config import EngineConfig
from sarathi.core.sequence import Binding
from sarathi.lora.manager import LoRAManager
from sarathi.lora.request import LoRARequest
from sarathi.model_executor.model_runner import ModelRunner, split_threads
from sarathi.optimal_sampling.sampler import OptimalSampler, load_model_target
from sarathi.spec_decode.draft_model import load_draft_model
from sarathi.spec_decode.speculator import Speculator
from sarathi.structured_outputs import StructuredOutputManager


@dataclass
class Plugins:
    lora: Optional[LoRAManager]          # --enable-lora: adapters for the runner's rows
    optimal_sampling: OptimalSampler     # a second model beside the runner (its targets may be none)
    structured_outputs: StructuredOutputManager   # grammars: compiled off the step loop, a mask in the runner
    speculative: Optional[Speculator] = None     # --speculative-config: drafts proposed and verified in the runner

    @property
    def num_lookahead_tokens(self) -> int:
        """KV positions the scheduler maps past each step for a runner-side component that
        writes ahead (an early-exit drafter)."""
        return self.speculative.num_lookahead_tokens if self.speculative else 0

    @classmethod
    def attach(cls, config: EngineConfig, runner: ModelRunner, tokenizer, served_names: List[str],
               eos_token_ids: Collection[int]) -> "Plugins":
        lora_config, serving = config.lora_config, config.serving_config
        lora = LoRAManager.from_config(lora_config, runner.model, runner.device) if lora_config.enable_lora else None
        runner.adapters = lora
        target = load_model_target(config, runner, tokenizer, served_names) \
            if serving.optimal_sampling_target else None
        optimal = OptimalSampler(runner, lora, target)
        runner.second_models.append(optimal)
        spec = config.speculative_decoding_config.speculative_config
        if spec is not None and serving.optimal_sampling_target:
            raise ValueError("--speculative-config cannot be combined with --optimal-sampling-target: "
                             "optimal sampling draws from a mix of two models that drafts are not verified against")
        draft = load_draft_model(config, runner, tokenizer, spec.model) \
            if spec is not None and spec.method == "draft_model" else None
        if draft is not None:
            runner.second_models.append(draft)
        torch_threads = split_threads(config.parallel_config.num_threads,
                                      [runner, *optimal.runners, *(draft.runners if draft else ())])
        so = config.structured_outputs_config
        structured = StructuredOutputManager(
            so.structured_outputs_backend, tokenizer, runner.vocab_size, eos_token_ids,
            so.structured_outputs_compile_timeout, so.structured_outputs_max_bytes,
            num_threads=config.parallel_config.num_threads or torch_threads)
        runner.masks.append(structured)
        speculative = None
        if spec is not None:
            speculative = runner.proposer = Speculator(spec, runner, draft)
        return cls(lora, optimal, structured, speculative)

    @property
    def requests(self) -> list:
        """The request plug-ins, in the order they are asked."""
        return [p for p in (self.lora, self.optimal_sampling, self.structured_outputs, self.speculative)
                if p is not None]

    def bind(self, params, lora_request: Optional[LoRARequest]) -> Binding:
        """A new request's adapter, prefix-cache salt, names it keeps loaded and holds, from every plug-in."""
        bound = [plugin.bind(params, lora_request) for plugin in self.requests]
        adapter = next((b.adapter for b in bound if b.adapter is not None), None)
        if lora_request is not None and adapter is None:
            raise ValueError("this engine was started without --enable-lora; it serves no adapters")
        salt = "\0".join([*(b.cache_salt for b in bound), params.cache_salt or ""])
        return Binding(adapter, salt, frozenset().union(*(b.uses for b in bound)),
                       tuple(h for b in bound for h in b.holds))

    def stats(self, scheduler) -> dict:
        out: dict = {}
        for plugin in self.requests:
            out.update(plugin.stats(scheduler))
        return out
