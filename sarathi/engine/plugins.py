"""The engine's feature rooms, wired onto the runner at start-up, asked about each new request.

A request plug-in answers `bind(params, lora_request) -> (adapter, cache salt, names it keeps
loaded)` (raising ValueError / InvalidParam fails that request alone, at admission) and
`stats(scheduler) -> dict`. Runner-side parts plug into the runner's own seams: `runner.adapters`
(the LoRA manager) and `runner.second_models` (optimal sampling; a proposer would go there too).
A new feature is a new entry here; the engine only calls `attach`, `bind` and `stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from sarathi.config import EngineConfig
from sarathi.lora.manager import LoRAManager
from sarathi.lora.request import LoRARequest
from sarathi.model_executor.model_runner import ModelRunner, split_threads
from sarathi.optimal_sampling.sampler import OptimalSampler, load_model_target


@dataclass
class Plugins:
    lora: Optional[LoRAManager]          # --enable-lora: adapters for the runner's rows
    optimal_sampling: OptimalSampler     # a second model beside the runner (its targets may be none)

    @classmethod
    def attach(cls, config: EngineConfig, runner: ModelRunner, tokenizer, served_names: List[str]) -> "Plugins":
        lora_config, serving = config.lora_config, config.serving_config
        lora = LoRAManager.from_config(lora_config, runner.model, runner.device) if lora_config.enable_lora else None
        runner.adapters = lora
        target = load_model_target(config, runner, tokenizer, served_names) \
            if serving.optimal_sampling_target else None
        optimal = OptimalSampler(runner, lora, target)
        runner.second_models.append(optimal)
        split_threads(config.parallel_config.num_threads, [runner, *optimal.runners])
        return cls(lora, optimal)

    @property
    def requests(self) -> list:
        """The request plug-ins, in the order they are asked."""
        return [p for p in (self.lora, self.optimal_sampling) if p is not None]

    def bind(self, params, lora_request: Optional[LoRARequest]) -> Tuple[Optional[str], str, frozenset]:
        """A new request's (adapter, prefix-cache salt, names it keeps loaded), from every plug-in."""
        bound = [plugin.bind(params, lora_request) for plugin in self.requests]
        adapter = next((a for a, _, _ in bound if a is not None), None)
        if lora_request is not None and adapter is None:
            raise ValueError("this engine was started without --enable-lora; it serves no adapters")
        salt = "\0".join([*(s for _, s, _ in bound), params.cache_salt or ""])
        return adapter, salt, frozenset().union(*(u for _, _, u in bound))

    def stats(self, scheduler) -> dict:
        out: dict = {}
        for plugin in self.requests:
            out.update(plugin.stats(scheduler))
        return out
