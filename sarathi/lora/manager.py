"""Adapters by name: registered (a path), kept loaded in host memory (an LRU of
--max-cpu-loras), and placed in one of --max-loras device slots that every Linear's
`LoRAStack` holds. The scheduler keeps at most max_loras distinct adapters running, so a
step always finds a slot for each of its adapters.

The manager is the one owner of the registry: requests name adapters through it
(`resolve`), the prefix cache salts blocks with `cache_salt` (name and generation of the
weights in memory), the runner activates a step's rows through `prepare`."""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sarathi.config import LoRAConfig
from sarathi.core.sequence import Binding
from sarathi.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from sarathi.lora.layers import FUSED_PARTS, LoRABatch, LoRAStack
from sarathi.lora.request import LoRARequest

logger = logging.getLogger("sarathi")


class LoRAManager:
    def __init__(self, model, max_loras: int, max_lora_rank: int, max_cpu_loras: int, device: torch.device):
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.device = device
        a = model.args
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.num_layers = a.num_layers
        self.shapes: Dict[str, Tuple[int, int]] = {
            "q_proj": (a.hidden_size, q), "k_proj": (a.hidden_size, kv), "v_proj": (a.hidden_size, kv),
            "o_proj": (q, a.hidden_size), "gate_proj": (a.hidden_size, a.intermediate_size),
            "up_proj": (a.hidden_size, a.intermediate_size), "down_proj": (a.intermediate_size, a.hidden_size)}
        rank = -(-max_lora_rank // 4) * 4  # aligned for grouped_mm
        self.batch = LoRABatch(max_loras)
        self.stacks: List[Dict[str, LoRAStack]] = []
        for layer in model.layers:
            stacks = {}
            for fused, parts in FUSED_PARTS.items():
                linear = getattr(layer.self_attn if fused in ("qkv_proj", "o_proj") else layer.mlp, fused)
                cols, col = [], 0
                for name in parts:
                    width = self.shapes[name][1]
                    cols.append((name, col, width))
                    col += width
                linear.lora = stacks[fused] = LoRAStack(linear.in_features, cols, max_loras, rank, self.batch,
                                                        device)
            self.stacks.append(stacks)
        self.paths: Dict[str, str] = {}                       # every registered adapter
        # Bumped whenever an adapter's weights leave host memory (evicted, unloaded): the prefix
        # cache salts blocks with it, so KV computed by an earlier load is never reused.
        self.generation: Dict[str, int] = {}
        self._loaded: "OrderedDict[str, LoRAAdapter]" = OrderedDict()  # host-memory LRU
        self.slots: List[Optional[str]] = [None] * max_loras
        self._last_use = [0] * max_loras
        self._clock = itertools.count(1)
        self.on_remove: List[Callable[[str], None]] = []   # e.g. optimal sampling drops its target

    @classmethod
    def from_config(cls, config: LoRAConfig, model, device: torch.device) -> "LoRAManager":
        """--enable-lora's manager over the model's layers, with --lora-modules registered."""
        max_cpu = config.max_cpu_loras or max(config.max_loras, len(config.lora_modules))
        manager = cls(model, config.max_loras, config.max_lora_rank, max_cpu, device)
        for name, path in config.lora_modules.items():
            manager.add(LoRARequest(name, 0, path))
        return manager

    # ---- requests ------------------------------------------------------------
    def add(self, lora_request: LoRARequest) -> None:
        """Load an adapter under its name (ValueError: bad files, rank, targets, name taken)."""
        if not lora_request.lora_path:
            raise ValueError(f"adapter {lora_request.lora_name!r} has no lora_path to load it from")
        self.register(lora_request.lora_name, lora_request.lora_path)

    def remove(self, name: str, users: int) -> None:
        """Unload an adapter; refused while `users` requests run with it (KeyError: unknown)."""
        if name not in self.paths:
            raise KeyError(name)
        if users:
            raise ValueError(f"adapter {name!r} is in use by {users} request(s); unload it once they finish")
        self.unregister(name)
        for callback in self.on_remove:
            callback(name)

    def resolve(self, lora_request: Optional[LoRARequest]) -> Optional[str]:
        """The adapter name a request runs with; loads it on first sight when it carries a path."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError("lora_request must be a LoRARequest")
        name = lora_request.lora_name
        if name not in self.paths:
            if not lora_request.lora_path:
                raise ValueError(f"unknown LoRA adapter {name!r}")   # (never lists other tenants' adapters)
            self.add(lora_request)
        return name

    def bind(self, params, lora_request: Optional[LoRARequest]) -> Binding:
        """A new request's adapter, prefix-cache salt and the name it keeps loaded."""
        name = self.resolve(lora_request)
        if name is None:
            return Binding()
        return Binding(name, self.cache_salt(name), frozenset([name]))

    def stats(self, scheduler) -> dict:
        """Adapters running and waiting (for /metrics and the dashboard)."""
        return {"lora": {"max_lora": self.max_loras,
                         "running": sorted({s.lora_name for s in scheduler.running if s.lora_name}),
                         "waiting": sorted({s.lora_name for s in scheduler.waiting if s.lora_name})}}

    def cache_salt(self, name: str) -> str:
        """An adapter changes the KV: prefix-cache blocks are salted with its name and the
        generation of its weights in memory (KV of an evicted or unloaded load is never reused)."""
        return f"{name}#{self.generation.get(name, 0)}"

    # ---- registry ----------------------------------------------------------
    def register(self, name: str, path: str) -> LoRAAdapter:
        """Load and check an adapter (raises AdapterError); replaces nothing: names are unique."""
        if name in self.paths:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        adapter = load_adapter(name, path, self.num_layers, self.shapes, self.max_lora_rank)
        self.paths[name] = str(path)
        self._cache(adapter)
        logger.info("LoRA adapter %r: rank %d, %s, %.1f MB", name, adapter.rank, ", ".join(adapter.target_modules),
                    adapter.nbytes() / 1e6)
        return adapter

    def unregister(self, name: str) -> None:
        if name not in self.paths:
            raise KeyError(name)
        del self.paths[name]
        self._loaded.pop(name, None)
        self.generation[name] = self.generation.get(name, 0) + 1
        for i, held in enumerate(self.slots):
            if held == name:
                self.slots[i] = None

    def names(self) -> List[str]:
        return list(self.paths)

    def _cache(self, adapter: LoRAAdapter) -> None:
        self._loaded[adapter.name] = adapter
        self._loaded.move_to_end(adapter.name)
        while len(self._loaded) > self.max_cpu_loras:
            evicted, _ = self._loaded.popitem(last=False)
            self.generation[evicted] = self.generation.get(evicted, 0) + 1

    def _adapter(self, name: str) -> LoRAAdapter:
        adapter = self._loaded.get(name)
        if adapter is None:  # evicted from host memory: read it again
            adapter = load_adapter(name, self.paths[name], self.num_layers, self.shapes, self.max_lora_rank)
        self._cache(adapter)
        return adapter

    # ---- one step ------------------------------------------------------------
    def _slot_for(self, name: str, needed: set) -> int:
        if name in self.slots:
            return self.slots.index(name)
        free = [i for i, held in enumerate(self.slots) if held is None or held not in needed]
        if not free:
            raise RuntimeError(f"more than max_loras={self.max_loras} adapters in one step")
        slot = min(free, key=lambda i: (self.slots[i] is not None, self._last_use[i]))
        adapter = self._adapter(name)
        for layer, stacks in enumerate(self.stacks):
            per_module = {m: w for (li, m), w in adapter.weights.items() if li == layer}
            for stack in stacks.values():
                stack.set_slot(slot, per_module)
        self.slots[slot] = name
        return slot

    def prepare(self, names: Sequence[Optional[str]], num_rows: Sequence[int]) -> None:
        """Point every LoRA layer at this step's rows: sequence i has num_rows[i] rows."""
        needed = {n for n in names if n is not None}
        if not needed:
            self.batch.clear()
            return
        now = next(self._clock)
        slot_of = {}
        for name in needed:
            slot_of[name] = self._slot_for(name, needed)
            self._last_use[slot_of[name]] = now
        per_seq = torch.tensor([-1 if n is None else slot_of[n] for n in names], dtype=torch.long)
        self.batch.set_rows(torch.repeat_interleave(per_seq, torch.tensor(list(num_rows))).to(self.device))
