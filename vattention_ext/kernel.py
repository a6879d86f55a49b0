"""Python entry to the C++ attention kernel: checks shapes, dtypes and strides of
torch tensors, then hands raw pointers to vattention_ext._C.attention."""
from __future__ import annotations

import torch

from . import _C

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def _index_tensor(x, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int64)
    if t.dtype != torch.int64 or t.dim() != 1 or t.device.type != "cpu":
        raise ValueError(f"{name} must be a 1-D int64 CPU tensor or a list of ints")
    return t.contiguous()


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots, context_lens, query_lens,
              scale: float, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention for a batch of prefill chunks and decodes.

    q: [T, Hq, D], the batch's new tokens in sequence order. k_cache/v_cache:
    [num_slots, max_ctx, Hkv, D] (head_dim contiguous). Sequence i lives in slot
    slots[i], has context_lens[i] tokens cached before this step and query_lens[i]
    new tokens. If k_new/v_new ([T, Hkv, D]) are given they are written into the cache
    at positions context_lens[i]... first; otherwise the cache must already hold them.
    Returns out [T, Hq, D] (same dtype as q). fp32 and bf16. Uses torch.get_num_threads() threads.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in _DTYPE_CODES:
        raise ValueError(f"attention supports float32 and bfloat16, got {q.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.dtype != q.dtype or c.device.type != "cpu":
            raise ValueError(f"{name} must be a 4-D CPU tensor [slots, max_ctx, kv_heads, head_dim] of {q.dtype}")
        if c.stride(3) != 1 or c.shape[3] != q.shape[2]:
            raise ValueError(f"{name}: head_dim must match q ({q.shape[2]}) and be contiguous")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if q.device.type != "cpu":
        raise ValueError("the C++ attention kernel runs on CPU tensors only")
    q = q.contiguous()
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if (k_new is None) != (v_new is None):
        raise ValueError("give both k_new and v_new or neither")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.shape != (T, Hkv, D) or t.dtype != q.dtype or t.device.type != "cpu":
                raise ValueError(f"{name} must be [{T}, {Hkv}, {D}] {q.dtype} on CPU, got {tuple(t.shape)} {t.dtype}")
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    slots = _index_tensor(slots, "slots")
    context_lens = _index_tensor(context_lens, "context_lens")
    query_lens = _index_tensor(query_lens, "query_lens")
    if not (len(slots) == len(context_lens) == len(query_lens)):
        raise ValueError("slots, context_lens and query_lens must have the same length")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor shaped and typed like q")
    _C.attention(q.data_ptr(), 0 if k_new is None else k_new.data_ptr(), 0 if v_new is None else v_new.data_ptr(),
                 out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                 k_cache.stride(2), k_cache.shape[0], k_cache.shape[1], slots.data_ptr(), context_lens.data_ptr(),
                 query_lens.data_ptr(), len(slots), T, Hq, Hkv, D, float(scale), _DTYPE_CODES[q.dtype],
                 torch.get_num_threads())
    return out


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots, context_lens,
                        query_lens, scale: float) -> torch.Tensor:
    """The same computation with torch SDPA, one sequence at a time (any device): the
    test oracle and the fallback where the C++ kernel does not apply (CUDA without flash-attn)."""
    out = torch.empty_like(q)
    start = 0
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    for slot, ctx, n in zip(list(map(int, slots)), list(map(int, context_lens)), list(map(int, query_lens))):
        k = k_cache[slot, : ctx + n].transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[slot, : ctx + n].transpose(0, 1)
        qs = q[start : start + n].transpose(0, 1)  # [Hq, n, D]
        # query r (position ctx + r) sees keys 0 .. ctx + r
        mask = torch.arange(ctx + n, device=q.device)[None, :] <= (ctx + torch.arange(n, device=q.device))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            qs.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale,
            enable_gqa=Hq != Hkv)
        out[start : start + n] = o[0].transpose(0, 1)
        start += n
    return out
