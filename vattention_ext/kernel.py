"""Python entry to the C++ attention kernel.

`AttentionPlan` is built once per engine step (from the first layer's K cache, which
gives the geometry every layer shares, and the step's slots and lengths): the C++ side
copies and validates the sequences then. `plan.run(...)` does one layer, checking the
torch tensors against the plan (O(1) per call) and handing their pointers to C++.
`attention(...)` builds a plan and runs it once.
"""
from __future__ import annotations

import operator

import torch

from . import _C
from .threads import native_threads

# The one torch dtype -> kernel element type table. float16 is a cache type only (read into
# fp32); queries are float32, or bfloat16 over a bfloat16 cache.
KERNEL_DTYPES = {torch.float32: _C.DType.F32, torch.bfloat16: _C.DType.BF16, torch.float16: _C.DType.F16}
QUERY_DTYPES = {torch.float32: (torch.float32, torch.bfloat16, torch.float16), torch.bfloat16: (torch.bfloat16,)}


def _int_list(x, name: str) -> list:
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.int64 or x.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor or a list of ints, got {x.dtype} {tuple(x.shape)}")
        return x.tolist()
    try:
        values = [operator.index(v) for v in x]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 1-D int64 tensor or a list of ints: {e}") from None
    if values and (min(values) < -(1 << 63) or max(values) >= 1 << 63):
        raise ValueError(f"{name}: values must fit in int64")
    return values


def _check_cache(c, name: str) -> None:
    if not isinstance(c, torch.Tensor) or c.dim() != 4 or not c.is_cpu:
        raise ValueError(f"{name} must be a 4-D CPU tensor [slots, max_ctx, kv_heads, head_dim]")
    if c.dtype not in KERNEL_DTYPES:
        raise ValueError(f"attention supports float32 and bfloat16, got {name} of {c.dtype}")
    if c.stride(3) != 1:
        raise ValueError(f"{name}: head_dim must be contiguous (stride 1), got strides {c.stride()}")


class AttentionPlan:
    """One step's batch for the C++ kernel: causal GQA attention for prefill chunks and
    decodes over slot-contiguous caches.

    k_cache: [num_slots, max_ctx, Hkv, D] (head_dim contiguous; fp32, bf16 or fp16), any layer's:
    every cache passed to run() must have its shape, strides and dtype. q_dtype: the queries',
    new keys' and values' and the output's dtype (default: the cache's; float32 with any cache,
    new keys and values rounded to the cache's type as stored). Sequence i lives
    in slot slots[i], has context_lens[i] tokens cached before this step and
    query_lens[i] >= 1 new tokens (prefill chunks first, then decodes). num_threads:
    default vattention_ext.threads.native_threads(). Raises ValueError on an inconsistent batch.
    """

    __slots__ = ("_core", "dtype", "cache_dtype", "cache_shape", "cache_strides", "num_tokens", "_kv_shape",
                 "_head_dim")

    def __init__(self, k_cache: torch.Tensor, slots, context_lens, query_lens, num_threads: int | None = None,
                 q_dtype: torch.dtype | None = None):
        _check_cache(k_cache, "k_cache")
        q_dtype = k_cache.dtype if q_dtype is None else q_dtype
        if k_cache.dtype not in QUERY_DTYPES.get(q_dtype, ()):
            raise ValueError(f"queries of {q_dtype} over a {k_cache.dtype} cache are not supported "
                             f"(float32 queries with any cache, or bfloat16 over bfloat16)")
        n, L, hkv, d = k_cache.shape
        s0, s1, s2, _ = k_cache.stride()
        threads = native_threads() if num_threads is None else int(num_threads)
        self._core = _C.AttentionPlan(n, L, hkv, d, s0, s1, s2, KERNEL_DTYPES[k_cache.dtype],
                                      _int_list(slots, "slots"), _int_list(context_lens, "context_lens"),
                                      _int_list(query_lens, "query_lens"), threads, KERNEL_DTYPES[q_dtype])
        self.dtype = q_dtype             # q, k_new, v_new, out
        self.cache_dtype = k_cache.dtype
        self.cache_shape = k_cache.shape
        self.cache_strides = k_cache.stride()
        self.num_tokens = self._core.num_tokens
        self._kv_shape = (self.num_tokens, hkv, d)
        self._head_dim = d

    @property
    def num_seqs(self) -> int:
        return self._core.num_seqs

    def run(self, q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None, k_cache: torch.Tensor,
            v_cache: torch.Tensor, scale: float, out: torch.Tensor | None = None, window: int = 0,
            softcap: float = 0.0) -> torch.Tensor:
        """One layer: stores k_new/v_new [T, Hkv, D] (if given) into the caches at
        positions context_lens[i]..., then returns out [T, Hq, D] = attention of q
        [T, Hq, D]. All of the plan's dtype on CPU; q, k_new, v_new are made contiguous.
        window > 0: the query at position p sees keys (p - window, p] only (sliding window);
        softcap > 0: scores become softcap * tanh(scores / softcap) before the softmax."""
        dt = self.dtype
        if (not isinstance(q, torch.Tensor) or q.dtype != dt or not q.is_cpu or q.dim() != 3
                or q.shape[0] != self.num_tokens or q.shape[2] != self._head_dim):
            if isinstance(q, torch.Tensor) and q.dim() == 3 and q.shape[0] != self.num_tokens:
                raise ValueError(f"query_lens sum to {self.num_tokens} but q has {q.shape[0]} tokens")
            raise ValueError(f"q must be a CPU {dt} tensor [{self.num_tokens}, heads, {self._head_dim}], got "
                             f"{getattr(q, 'dtype', type(q))} {tuple(getattr(q, 'shape', ()))}")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if (not isinstance(c, torch.Tensor) or c.dtype != self.cache_dtype or not c.is_cpu
                    or c.shape != self.cache_shape or c.stride() != self.cache_strides):
                raise ValueError(f"{name} must be a CPU {self.cache_dtype} tensor of the plan's shape "
                                 f"{tuple(self.cache_shape)} "
                                 f"and strides {self.cache_strides}, got {getattr(c, 'dtype', type(c))} "
                                 f"{tuple(getattr(c, 'shape', ()))} {c.stride() if isinstance(c, torch.Tensor) else ''}")
        if (k_new is None) != (v_new is None):
            raise ValueError("give both k_new and v_new or neither")
        q = q.contiguous()
        if k_new is not None:
            for name, t in (("k_new", k_new), ("v_new", v_new)):
                if not isinstance(t, torch.Tensor) or t.dtype != dt or not t.is_cpu or t.shape != self._kv_shape:
                    raise ValueError(f"{name} must be a CPU {dt} tensor {list(self._kv_shape)}, got "
                                     f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
            kp, vp = k_new.data_ptr(), v_new.data_ptr()
        else:
            kp = vp = 0
        if out is None:
            out = torch.empty_like(q)
        elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != dt or not out.is_cpu
              or not out.is_contiguous()):
            raise ValueError("out must be a contiguous CPU tensor shaped and typed like q")
        self._core.run(q.data_ptr(), kp, vp, out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), q.shape[1],
                       float(scale), int(window), float(softcap))
        return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots, context_lens, query_lens,
              scale: float, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
              out: torch.Tensor | None = None, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Causal GQA attention for a batch of prefill chunks and decodes: one AttentionPlan,
    run once (see AttentionPlan for the arguments). Returns out [T, Hq, D] (same dtype
    as q). On CPU: fp32 queries over fp32, bf16 or fp16 caches, bf16 over bf16. Uses
    native_threads() threads."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(getattr(q, 'shape', ()))}")
    if q.dtype not in QUERY_DTYPES:
        raise ValueError(f"attention supports float32 and bfloat16 queries, got {q.dtype}")
    _check_cache(k_cache, "k_cache")
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"k_cache: head_dim must match q ({q.shape[2]}) and be contiguous")
    if k_cache.dtype not in QUERY_DTYPES[q.dtype]:
        raise ValueError(f"k_cache of {k_cache.dtype} cannot take {q.dtype} queries")
    plan = AttentionPlan(k_cache, slots, context_lens, query_lens, q_dtype=q.dtype)
    return plan.run(q, k_new, v_new, k_cache, v_cache, scale, out=out, window=window, softcap=softcap)


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots, context_lens,
                        query_lens, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """The same computation with torch, one sequence at a time (any device): the test
    oracle and the fallback where the C++ kernel does not apply (CUDA without flash-attn).
    SDPA, or the scores written out when they are soft-capped."""
    out = torch.empty_like(q)
    start = 0
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    for slot, ctx, n in zip(list(map(int, slots)), list(map(int, context_lens)), list(map(int, query_lens))):
        # Keys before the first query's window are never touched: their pages may be unmapped.
        lo = max(0, ctx + 1 - window) if window else 0
        k = k_cache[slot, lo : ctx + n].transpose(0, 1).to(q.dtype)  # [Hkv, L, D]; a half cache read in q's type
        v = v_cache[slot, lo : ctx + n].transpose(0, 1).to(q.dtype)
        qs = q[start : start + n].transpose(0, 1)  # [Hq, n, D]
        # query r (position ctx + r) sees keys 0 .. ctx + r, or the last `window` of them
        keys = torch.arange(lo, ctx + n, device=q.device)[None, :]
        pos = (ctx + torch.arange(n, device=q.device))[:, None]
        mask = keys <= pos
        if window:
            mask &= keys > pos - window
        if softcap:
            kr, vr = k.repeat_interleave(Hq // Hkv, 0), v.repeat_interleave(Hq // Hkv, 0)
            scores = torch.tanh((qs.float() @ kr.float().transpose(1, 2)) * scale / softcap) * softcap
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            o = (probs @ vr.float()).to(q.dtype)[None]
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                qs.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale,
                enable_gqa=Hq != Hkv)
        out[start : start + n] = o[0].transpose(0, 1)
        start += n
    return out
