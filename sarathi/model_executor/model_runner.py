"""Runs one scheduled step through the model: builds the flat batch, owns the KV cache.

The runner never decides policy: it gets (slot, cached length, new tokens) per
sequence and returns the logits rows the engine asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from sarathi.model_executor.kv_cache import KVCacheSpec, StepBatch, kv_cache_class
from sarathi.model_executor.model_loader import load_model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
            "half": torch.float16, "bfloat16": torch.bfloat16}[name]


@dataclass
class RunSeq:
    """One sequence of a step, in batch order (prefills first)."""

    slot: int
    token_ids: List[int]        # the tokens to run this step
    context_len: int            # tokens already in the cache
    logits_rows: Tuple[int, int]  # which of this sequence's rows to return logits for: [start, end)
    block_table: Optional[List[int]] = None


class ModelRunner:
    def __init__(self, model_dir: Path, dtype: str, device: str, max_model_len: int, max_num_seqs: int,
                 kv_cache_memory: int, kv_cache_backend: str, block_size: int, page_size: Optional[int],
                 async_mapping: bool = True, num_threads: Optional[int] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = load_model(model_dir, self.dtype, self.device)
        a = self.model.args
        self.scale = 1.0 / math.sqrt(a.head_dim)
        self.kv_spec = KVCacheSpec(
            num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, dtype=self.dtype,
            device=self.device, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_memory, block_size=block_size, page_size=page_size,
            async_mapping=async_mapping)
        self.kv_cache = kv_cache_class(kv_cache_backend)(self.kv_spec)

    def kv_layout(self) -> Tuple[int, int, int]:
        return type(self.kv_cache).layout(self.kv_spec)

    @torch.inference_mode()
    def execute(self, seqs: List[RunSeq], num_prefills: int) -> torch.Tensor:
        """Run the step; returns float32 logits for the requested rows, in order."""
        ids = [t for s in seqs for t in s.token_ids]
        batch = StepBatch(
            slots=[s.slot for s in seqs], context_lens=[s.context_len for s in seqs],
            query_lens=[len(s.token_ids) for s in seqs],
            block_tables=[s.block_table for s in seqs] if seqs and seqs[0].block_table is not None else None,
            num_prefills=num_prefills, device=self.device)
        self.kv_cache.begin_step(batch)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        cache, scale = self.kv_cache, self.scale

        def attend(layer, q, k, v):
            return cache.attend(layer, q, k, v, batch, scale)

        hidden = self.model(input_ids, batch.positions(), attend)
        rows, start = [], 0
        for s in seqs:
            rows.extend(range(start + s.logits_rows[0], start + s.logits_rows[1]))
            start += len(s.token_ids)
        if not rows:
            return torch.empty(0, self.model.args.vocab_size)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

    def free_slot(self, slot: int) -> None:
        self.kv_cache.free_slot(slot)
