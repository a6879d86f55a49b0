"""`Linear`: the one place the model multiplies by a weight, whatever the weight's format.

Float weights are stored [in, out] (`x @ W`: ~1.4x faster than nn.Linear's [out, in] for
single-token decode on CPU, no slower at batch 64, measured). Quantized weights (GGUF blocks,
GPTQ / AWQ groups, int8) are set by the loader as a `QuantLinear`, which calls the CPU
kernels in `quantization.kernels`. Anything that adds to a layer's output (a LoRA delta)
sits on top of either.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from sarathi.model_executor.quantization.formats import QuantTensor, describe, kernel_groups


class QuantLinear(nn.Module):
    """y = x W^T for a W given as QuantTensor parts stacked along the output (a fused q/k/v has
    three): parts with one layout become one kernel call; others are called in turn."""

    def __init__(self, parts: List[QuantTensor]):
        super().__init__()
        from sarathi.model_executor.quantization import kernels

        self._kernels = kernels
        merged = kernel_groups(parts)
        self.packed = [kernels.pack(t.q, t.scale, t.min, t.bits, t.block, super_scale=t.super_scale,
                                    super_min=t.super_min) for t in merged]
        self.perms = [t.input_perm for t in merged]
        self.source = describe(parts)
        self.in_features = parts[0].q.shape[1]
        self.out_features = sum(p.q.shape[0] for p in parts)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.packed)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] (tests, and devices without a kernel)."""
        ws = []
        for p, perm in zip(self.packed, self.perms):
            w = p.dequantize()
            if perm is not None:
                full = torch.empty_like(w)
                full[:, perm] = w
                w = full
            ws.append(w)
        return torch.cat(ws)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        outs = [self._kernels.qlinear(x if perm is None else x[:, perm], p) for p, perm in zip(self.packed, self.perms)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if bias is None else y + bias


class Linear(nn.Module):
    """y = x @ weight + bias, weight [in, out]; or, once `quantize` ran, the quantized kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.qweight: Optional[QuantLinear] = None
        self.lora = None  # a sarathi.lora.layers.LoRAStack once LoRA is enabled
        self.version = 0  # bumped when the weight's storage changes (plans built from it are then stale)

    def quantize(self, parts: List[QuantTensor]) -> None:
        """Store the weight as these quantized parts (stacked along the output) instead of floats."""
        q = QuantLinear(parts)
        if (q.in_features, q.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"quantized weight is {q.out_features}x{q.in_features}, the layer is "
                             f"{self.out_features}x{self.in_features}")
        self.qweight = q
        self.weight = None
        self.version += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            y = self.qweight(x, self.bias)
        elif self.bias is None:
            y = x @ self.weight
        else:
            y = torch.addmm(self.bias, x, self.weight)
        return y if self.lora is None else self.lora(x, y)
