"""Runs one scheduled step through the model: builds the flat batch, owns the KV backend.

The runner never decides policy: it gets (slot, cached length, new tokens) per
sequence and returns the logits rows the engine asked for.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sarathi.config import EngineConfig, torch_dtype
from sarathi.model_executor.kv_cache import KVCacheSpec, StepBatch, kv_backend_class
from sarathi.model_executor.layers.linear import Linear
from sarathi.model_executor.model_loader import gguf_source, load_hf_config, load_model, pick_quantization
from vattention_ext.threads import set_native_threads

_DEFAULT_THREADS = torch.get_num_threads()  # torch's default (the cores), before a runner changes it

logger = logging.getLogger("sarathi")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class RunSeq:
    """One sequence of a step, in batch order (prefills first)."""

    slot: int
    token_ids: List[int]        # the tokens to run this step
    context_len: int            # tokens already in the cache
    logits_rows: Tuple[int, int]  # which of this sequence's rows to return logits for: [start, end)
    block_table: Optional[List[int]] = None
    lora_name: Optional[str] = None   # the LoRA adapter this sequence runs with (None: the base)


class ModelRunner:
    """The model, its KV backend and the device; `execute` runs one step."""

    def __init__(self, config: EngineConfig, model_dir: Path, max_model_len: Optional[int] = None,
                 kv_memory: Optional[int] = None, page_size: Optional[int] = None):
        """kv_memory / page_size override the config's (a second model sized to mirror the first)."""
        threads = config.num_threads or _DEFAULT_THREADS
        torch.set_num_threads(threads)
        self.hf_config = load_hf_config(model_dir)
        self.max_model_len = max_model_len or config.max_model_len or \
            self.hf_config.get("max_position_embeddings", 2048)
        self.device = pick_device(config.device)
        self.dtype = torch_dtype(config.dtype, self.device.type)
        gguf_path = gguf_source(config.model)
        self.quantization = pick_quantization(config.quantization, self.hf_config, gguf_path)
        self.model = load_model(model_dir, self.hf_config, self.dtype, self.device, self.quantization, gguf_path)
        self.kernel_isa = self._kernel_isa()
        self._split_threads(threads)
        self.formats = self.weight_formats()
        logger.info("model %s: %s weights (%s), %.0f MB, kernels: %s", model_dir.name, self.quantization,
                    self.formats, self.weight_bytes() / 1e6, self.kernel_isa)
        a = self.model.args
        self.vocab_size = a.vocab_size
        self.scale = 1.0 / math.sqrt(a.head_dim)
        self._kv_spec = KVCacheSpec(
            num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, dtype=self.dtype,
            device=self.device, max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs,
            kv_cache_memory=kv_memory or config.kv_cache_memory, block_size=config.block_size,
            page_size=page_size or config.page_size, async_mapping=config.async_kv_mapping)
        self.kv_backend_name = config.kv_cache_backend
        self._kv = kv_backend_class(config.kv_cache_backend)(self._kv_spec)
        self.needs_block_tables = self._kv.needs_block_tables
        self.kv_bytes_per_token = self._kv_spec.bytes_per_token
        self.lora = None
        if config.enable_lora:
            from sarathi.lora.manager import LoRAManager

            max_cpu = config.max_cpu_loras or max(config.max_loras, len(config.lora_modules))
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, max_cpu, self.device)

    _float_matmuls_seen = False  # a runner in this process does its matmuls in torch

    def _split_threads(self, threads: int) -> None:
        """The native kernels (attention, quantized linears, LoRA) take `threads`. When every
        linear layer of the model is quantized, the matmuls all run on them and torch's own ops
        (norms, activations, sampling) get one thread: its OpenMP team spins after each region
        and holds the core our pool's helper waits for (measured: +25 % decode throughput on 2
        cores). A runner whose matmuls are torch's keeps torch at `threads`, for every runner."""
        set_native_threads(threads)
        linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        native = self.device.type == "cpu" and bool(linears) and all(m.qweight is not None for m in linears)
        if not native:
            ModelRunner._float_matmuls_seen = True
        self.torch_threads = 1 if native and not ModelRunner._float_matmuls_seen else threads
        torch.set_num_threads(self.torch_threads)

    def _kernel_isa(self) -> str:
        if self.quantization == "none" or self.device.type != "cpu":
            return "torch"
        from sarathi.model_executor.quantization.kernels import kernel_isa
        return kernel_isa()

    def _linears(self):
        from sarathi.model_executor.layers.linear import Linear
        return [m for m in self.model.modules() if isinstance(m, Linear)]

    def weight_formats(self) -> str:
        """The formats of the linear layers' weights, e.g. 'gguf Q4_1, gguf Q8_0'."""
        names = {m.qweight.source if m.qweight is not None else str(self.dtype).replace("torch.", "")
                 for m in self._linears()}
        return ", ".join(sorted(names))

    def weight_bytes(self) -> int:
        """Bytes of the weights a forward pass reads: float parameters plus quantized blocks."""
        floats = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return floats + sum(m.qweight.nbytes() for m in self._linears() if m.qweight is not None)

    @property
    def kv_spec(self) -> KVCacheSpec:
        return self._kv_spec

    @property
    def kv_backend(self):
        return self._kv

    def page_size(self) -> Optional[int]:
        """The vattention backend's page bytes (None for the others)."""
        stats = self._kv.stats()
        return stats.get("kv_page_size")

    def kv_layout(self) -> Tuple[int, int, int]:
        """(num_blocks, block_size, num_slots) for the scheduler's KVManager."""
        return type(self._kv).layout(self._kv_spec)

    def kv_block_bytes(self) -> Tuple[int, int]:
        """(bytes per block, bytes per token) in one layer: how tokens fall into blocks."""
        return type(self._kv).block_bytes(self._kv_spec)

    @property
    def supports_prefix_caching(self) -> bool:
        return self._kv.supports_prefix_caching

    def retain_block(self, slot: int, page: int, block: int) -> int:
        return self._kv.retain(slot, page, block)

    def release_blocks(self, handles: List[int]) -> None:
        self._kv.release(handles)

    def share_prefix(self, slot: int, table: List[int], handles: List[int], copy_src: Optional[int]) -> None:
        self._kv.share_prefix(slot, table, handles, copy_src)

    def kv_stats(self) -> Dict[str, int]:
        return self._kv.stats()

    @torch.inference_mode()
    def execute(self, seqs: List[RunSeq], num_prefills: int, kv=None,
                extra: Sequence[Tuple[List[RunSeq], int, object]] = ()) -> torch.Tensor:
        """Run the step; returns float32 logits for the requested rows, in order. kv: another
        KV backend of the same geometry to read and write instead of this runner's own.

        extra: more groups (seqs, num_prefills, kv backend) run in the same forward: every
        linear layer multiplies all groups' rows at once (the weights are read once) and each
        group attends over its own KV. Their logits rows follow the first group's, in order."""
        groups = [(seqs, num_prefills, self._kv if kv is None else kv), *extra]
        ids: List[int] = []
        positions, spans, lora_names, query_lens = [], [], [], []
        start = 0
        for g_seqs, g_prefills, g_kv in groups:
            batch = StepBatch(
                slots=[s.slot for s in g_seqs], context_lens=[s.context_len for s in g_seqs],
                query_lens=[len(s.token_ids) for s in g_seqs],
                block_tables=[s.block_table for s in g_seqs] if self.needs_block_tables else None,
                num_prefills=g_prefills, device=self.device)
            n = sum(batch.query_lens)
            spans.append((start, start + n, g_kv, g_kv.begin_step(batch)))
            start += n
            ids.extend(t for s in g_seqs for t in s.token_ids)
            positions.append(batch.positions())
            lora_names.extend(s.lora_name for s in g_seqs)
            query_lens.extend(batch.query_lens)
        if self.lora is not None:
            self.lora.prepare(lora_names, query_lens)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        scale = self.scale

        if len(spans) == 1:
            _, _, one_kv, one_step = spans[0]

            def attend(layer, q, k, v):
                return one_kv.attend(layer, q, k, v, one_step, scale)
        else:
            def attend(layer, q, k, v):
                return torch.cat([g_kv.attend(layer, q[a:b], k[a:b], v[a:b], step, scale)
                                  for a, b, g_kv, step in spans])

        hidden = self.model(input_ids, positions[0] if len(positions) == 1 else torch.cat(positions), attend)
        rows, start = [], 0
        for g_seqs, _, _ in groups:
            for s in g_seqs:
                rows.extend(range(start + s.logits_rows[0], start + s.logits_rows[1]))
                start += len(s.token_ids)
        if not rows:
            return torch.empty(0, self.vocab_size)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

    def free_slot(self, slot: int) -> None:
        self._kv.free_slot(slot)

    def close(self) -> None:
        """Release the KV memory now (the engine is shutting down)."""
        self._kv.close()
