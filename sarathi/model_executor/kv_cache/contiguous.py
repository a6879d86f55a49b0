"""The `contiguous` KV backend: preallocated [slots, max_model_len, Hkv, D] K and V
tensors per layer. Each slot holds a whole max-length sequence, so the budget buys
kv_cache_memory // (max_model_len * bytes_per_token) slots. The simplest backend,
and the oracle the others are tested against."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from vattention_ext.kernel import attention_reference

from .base import KVBackend, KVCacheSpec, StepBatch


@dataclass
class ContiguousStep:
    batch: StepBatch
    cache_rows: torch.Tensor      # flat row of every new token in a [slots * max_len] view of a layer


class ContiguousBackend(KVBackend):
    name = "contiguous"

    @classmethod
    def layout(cls, spec: KVCacheSpec) -> Tuple[int, int, int]:
        slots = min(spec.max_num_seqs, spec.kv_cache_memory // (spec.max_model_len * spec.bytes_per_token))
        if slots < 1:
            raise ValueError(
                f"kv_cache_memory={spec.kv_cache_memory} bytes cannot hold one sequence of "
                f"max_model_len={spec.max_model_len} ({spec.max_model_len * spec.bytes_per_token} bytes) "
                "with the contiguous backend; raise --kv-cache-memory or lower --max-model-len")
        return slots, spec.max_model_len, slots

    def __init__(self, spec: KVCacheSpec):
        super().__init__(spec)
        slots = self.layout(spec)[2]
        shape = (spec.num_layers, slots, spec.max_model_len, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=spec.device)

    def begin_step(self, batch: StepBatch) -> ContiguousStep:
        L = self.spec.max_model_len
        rows = [s * L + p for s, c, n in zip(batch.slots, batch.context_lens, batch.query_lens)
                for p in range(c, c + n)]
        return ContiguousStep(batch, torch.tensor(rows, dtype=torch.long, device=batch.device))

    def attend(self, layer, q, k, v, step: ContiguousStep, scale):
        kc, vc = self.k[layer], self.v[layer]
        kc.view(-1, *kc.shape[2:]).index_copy_(0, step.cache_rows, k)
        vc.view(-1, *vc.shape[2:]).index_copy_(0, step.cache_rows, v)
        b = step.batch
        return attention_reference(q, kc, vc, b.slots, b.context_lens, b.query_lens, scale,
                                   self.spec.window(layer), self.spec.attn_softcap)
