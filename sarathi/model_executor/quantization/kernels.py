"""CPU kernels for weight-only quantized linear layers: y = x @ W.T with W in 4-/8-bit blocks.

Logical weight format (what loaders hand to `pack`): W [N out, K in] in blocks of `block`
(16 or 32) elements along K,

    W[n, k] = scale[n, k // block] * q[n, k] + min[n, k // block]      (min None: 0)

with q uint8 in [0, 15] (bits=4) or int8 in [-128, 127] (bits=8), scale / min float32
[N, ceil(K / block)]. K need not be a multiple of the block.

How `qlinear` computes it: each row of x is quantized per block to int8 (scale d = max|x| / 127,
q_x = round(x / d), like llama.cpp's Q8_0; also the block sums d * sum(q_x) for mins), then

    y[m, n] = sum_blocks  d_w * d_x * sum(q_w * q_x)  +  min_w * d_x * sum(q_x)

with exact int32 block dot products (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw + vpmaddwd, or
scalar). The only approximation is the activation rounding, |x - d_x q_x| <= d_x / 2 per
element, so for every output

    |y[m, n] - (x @ W.T)[m, n]|  <=  sum_blocks (max_{k in b} |x[m, k]| / 254) * sum_{k in b} |W[n, k]|
                                     + fp32 rounding  (~ (K / block + 8) * 2^-24 * sum_k (|scale q| + |min|) |x|)

and when every block of x is exactly d * (integers in [-127, 127]) with max |integer| = 127,
the result equals the dequantised matmul up to fp32 rounding. A block holding a NaN / inf
makes its row's outputs NaN; a block with max |x| < 2^-96 counts as zero.

Packed layout (see csrc/quant/qgemm.h): output columns in panels of 16; the buffer is
[panels][K blocks][record], a record = the block's q bytes for 16 columns (4 k per 32-bit lane,
the vpdpbusd operand order; bits 4: two k-groups per byte; bits 8: q + 128), then 16 scales
and 16 mins (fp16 when every scale and min is exactly an fp16 number, as for GGUF's own
blocks; else fp32). One contiguous stream per panel; threads split the panels.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from sarathi.model_executor.quantization import _C
from vattention_ext.threads import native_threads

PANEL = int(_C.PANEL)
_F32 = torch.float32
_STRIDED = torch.strided
_BITS = (4, 8)
_BLOCKS = (16, 32)


class PackedWeight:
    """A weight in the kernels' layout. Plain data (ints + one uint8 tensor): picklable,
    `torch.save`-able. Build it with `pack`."""

    bits: int
    block: int
    out_features: int
    in_features: int
    has_min: bool
    half_scales: bool
    implied_min = False  # min = -8 * scale exactly (GGUF Q4_0), not stored
    int_min = False      # min = -(scale * z) with z an int8 per column and block (zero points), z stored

    def __init__(self, data: torch.Tensor, bits: int, block: int, out_features: int, in_features: int,
                 has_min: bool, half_scales: bool, implied_min: bool = False, int_min: bool = False):
        self.bits = int(bits)
        self.block = int(block)
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        self.has_min = bool(has_min)
        self.half_scales = bool(half_scales)
        self.implied_min = bool(implied_min)
        self.int_min = bool(int_min)
        if self.implied_min and (self.bits != 4 or not self.has_min):
            raise ValueError("an implied min (-8 * scale) needs bits=4 and has_min")
        if self.int_min and (not self.has_min or self.implied_min):
            raise ValueError("int8 min multipliers need has_min (and no implied min)")
        self.data = data

    @property
    def data(self) -> torch.Tensor:
        """uint8 [panels, K blocks, record bytes], contiguous (the native code checks its size)."""
        return self._data

    @data.setter
    def data(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or not t.is_cpu or not t.is_contiguous():
            raise ValueError("PackedWeight.data must be a contiguous uint8 CPU tensor")
        self._data = t

    @property
    def min_kind(self) -> int:
        """How the record holds the mins (the kernels' argument): 0 floats or none, 1 implied, 2 int8 z."""
        return 1 if self.implied_min else 2 if self.int_min else 0

    @property
    def shape(self):
        return (self.out_features, self.in_features)

    def nbytes(self) -> int:
        """Bytes one qlinear call streams from the weight (q, scales, mins, panel/K padding)."""
        return self.data.numel()

    def _parts(self):
        P, nb, rec = self.data.shape
        B, G = self.block, self.block // 4
        qb = PANEL * B * self.bits // 8
        sb = 2 if self.half_scales else 4
        sdt = torch.float16 if self.half_scales else torch.float32
        d = self.data
        if self.bits == 4:
            raw = d[:, :, :qb].reshape(P, nb, G // 2, PANEL, 4)
            g = torch.cat([raw & 15, raw >> 4], dim=2).to(torch.int16)  # [P, nb, G, 16, 4]
        else:
            g = d[:, :, :qb].reshape(P, nb, G, PANEL, 4).to(torch.int16) - 128
        q = g.permute(0, 3, 1, 2, 4).reshape(P * PANEL, nb * B)
        scale = d[:, :, qb:qb + PANEL * sb].contiguous().view(sdt).float().permute(0, 2, 1).reshape(P * PANEL, nb)
        mn = None
        if self.implied_min:
            mn = scale * -8.0
        elif self.int_min:
            off = qb + PANEL * sb
            z = d[:, :, off:off + PANEL].contiguous().view(torch.int8).float().permute(0, 2, 1).reshape(P * PANEL, nb)
            mn = -(scale * z)
        elif self.has_min:
            mn = d[:, :, qb + PANEL * sb:qb + 2 * PANEL * sb].contiguous().view(sdt).float()
            mn = mn.permute(0, 2, 1).reshape(P * PANEL, nb)
        return q, scale, mn

    def unpack(self):
        """(q, scale, min) in the logical format, as given to `pack`."""
        N, K = self.out_features, self.in_features
        q, scale, mn = self._parts()
        q = q[:N, :K]
        q = q.to(torch.uint8) if self.bits == 4 else q.to(torch.int8)
        return q.contiguous(), scale[:N].contiguous(), None if mn is None else mn[:N].contiguous()

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: scale * q + min, the exact logical values (read back from the packed bytes)."""
        N, K = self.out_features, self.in_features
        q, scale, mn = self._parts()
        w = q.float() * scale.repeat_interleave(self.block, dim=1)
        if mn is not None:
            w = w + mn.repeat_interleave(self.block, dim=1)
        return w[:N, :K].contiguous()

    def __repr__(self) -> str:
        return (f"PackedWeight({self.out_features}x{self.in_features}, bits={self.bits}, block={self.block}, "
                f"min={'-8 x scale' if self.implied_min else '-scale x int8' if self.int_min else self.has_min}, {'fp16' if self.half_scales else 'fp32'} "
                f"scales, {self.nbytes()} bytes)")


def _check_tensor(name: str, t, dtype, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _exact_half(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.float16).to(torch.float32), t))


def pack(q: torch.Tensor, scale: torch.Tensor, min: Optional[torch.Tensor], bits: int,
         block: int = 32) -> PackedWeight:
    """Repack a logical quantized weight (see the module docstring) into the kernel layout.

    q: [N, K] uint8 in [0, 15] (bits=4) or int8 (bits=8); scale, min: float32 [N, ceil(K / block)],
    finite. Raises ValueError naming what is wrong. Cost: a few vectorised torch passes over the
    weight (~10 ms for 576 x 3072 on one core); do it once at load time."""
    if bits not in _BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if block not in _BLOCKS:
        raise ValueError(f"block must be 16 or 32, got {block!r}")
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 2 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q must be a non-empty 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    N, K = q.shape
    nb = -(-K // block)
    _check_tensor("q", q, torch.uint8 if bits == 4 else torch.int8, (N, K))
    if bits == 4 and int(q.max()) > 15:
        raise ValueError(f"q values must be in [0, 15] for bits=4, got max {int(q.max())}")
    _check_tensor("scale", scale, torch.float32, (N, nb))
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("scale has non-finite values")
    if min is not None:
        _check_tensor("min", min, torch.float32, (N, nb))
        if not bool(torch.isfinite(min).all()):
            raise ValueError("min has non-finite values")

    P = -(-N // PANEL)
    Np, Kp, G = P * PANEL, nb * block, block // 4
    if bits == 8:
        qs = (q.to(torch.int16) + 128).to(torch.uint8)  # offset binary: the unsigned vpdpbusd operand
        fill = 128
    else:
        qs, fill = q, 0
    qpad = torch.full((Np, Kp), fill, dtype=torch.uint8)
    qpad[:N, :K] = qs
    t = qpad.view(P, PANEL, nb, G, 4).permute(0, 2, 3, 1, 4)  # [P, nb, G, 16, 4]
    if bits == 4:
        t = t[:, :, :G // 2] | (t[:, :, G // 2:] << 4)
    parts = [t.reshape(P, nb, -1)]

    # GGUF Q4_0, (q - 8) * d: the min is -8 * scale, computed by the kernel instead of streamed.
    implied = bits == 4 and min is not None and bool(torch.equal(min, scale * -8.0))
    # GPTQ / AWQ zero points: min = -(scale * z) with an integer z (8-bit GPTQ: zero - 128), computed
    # by the kernel from one int8 per column and block instead of a float. Both only where the
    # kernel's float32 product gives exactly these mins (equal values; a zero's sign may differ).
    z = None
    if min is not None and not implied:
        nz = scale != 0
        zc = torch.where(nz, -min / torch.where(nz, scale, torch.ones_like(scale)), torch.zeros_like(scale)).round()
        if bool(((zc >= -128) & (zc <= 127)).all()) and bool(torch.equal(-(scale * zc), min)):
            z = zc
    half = _exact_half(scale) and (min is None or implied or z is not None or _exact_half(min))
    sdt = torch.float16 if half else torch.float32
    for s in (scale,) if min is None or implied or z is not None else (scale, min):
        spad = torch.zeros(Np, nb, dtype=torch.float32)
        spad[:N] = s
        parts.append(spad.view(P, PANEL, nb).permute(0, 2, 1).to(sdt).contiguous().view(torch.uint8))
    if z is not None:
        zpad = torch.zeros(Np, nb, dtype=torch.int8)
        zpad[:N] = z.to(torch.int8)
        parts.append(zpad.view(P, PANEL, nb).permute(0, 2, 1).contiguous().view(torch.uint8))
    data = torch.cat(parts, dim=2).contiguous()
    w = PackedWeight(data, bits, block, N, K, min is not None, half, implied, z is not None)
    rec = int(_C.record_bytes(bits, block, min is not None, half, w.min_kind))
    assert data.shape == (P, nb, rec), (data.shape, rec)
    return w


def qlinear(x: torch.Tensor, w: PackedWeight, bias: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, *, num_threads: Optional[int] = None,
            isa: Optional[str] = None) -> torch.Tensor:
    """y = x @ W.T (+ bias): x float32 [M, K] -> float32 [M, N].

    x may be non-contiguous (rows with unit stride are used in place, else copied). out, if
    given, is float32 [M, N] with unit column stride (any row stride >= N, e.g. a column slice
    of a wider buffer); it may alias x (x is fully read before out is written), not bias.
    num_threads defaults to vattention_ext.threads.native_threads(); isa forces a kernel path ("scalar",
    "avx2", "avx512vnni"; default: `kernel_isa()`). Python overhead ~2-3 us per call
    (~1.5 us less with out=)."""
    if not isinstance(w, PackedWeight):
        raise ValueError(f"w must be a PackedWeight (from pack), got {type(w).__name__}")
    if (not isinstance(x, torch.Tensor) or x.dtype is not _F32 or not x.is_cpu or x.layout is not _STRIDED
            or x.ndim != 2):
        raise ValueError("x must be a float32 CPU tensor of shape [M, K], got "
                         + (f"{x.dtype} {x.device} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
    M, K = x.shape
    N = w.out_features
    if K != w.in_features:
        raise ValueError(f"x has {K} input features, the weight has {w.in_features}")
    sx = x.stride()
    if sx[1] != 1 or (M > 1 and sx[0] < K):
        x = x.contiguous()
        sx = (K, 1)
    if bias is not None:
        if (not isinstance(bias, torch.Tensor) or bias.dtype is not _F32 or not bias.is_cpu or bias.ndim != 1
                or bias.shape[0] != N):
            raise ValueError(f"bias must be a float32 CPU tensor of shape ({N},)")
        bias = bias.contiguous()
    if out is None:
        out = x.new_empty(M, N)  # x is float32 CPU: ~0.2 us cheaper than torch.empty(..., dtype=)
        ldo = N
    else:
        if (not isinstance(out, torch.Tensor) or out.dtype is not _F32 or not out.is_cpu
                or out.layout is not _STRIDED or out.shape != (M, N)):
            raise ValueError(f"out must be a float32 CPU tensor of shape ({M}, {N}) with unit column stride")
        so = out.stride()
        if (N > 1 and so[1] != 1) or (M > 1 and so[0] < N):
            raise ValueError(f"out must be a float32 CPU tensor of shape ({M}, {N}) with unit column stride")
        ldo = so[0] if M > 1 else N
    if M == 0:
        return out
    d = w._data
    _C.qlinear(x.data_ptr(), M, K, sx[0] if M > 1 else K, d.data_ptr(), d.numel(), N, w.bits, w.block,
               w.has_min, w.half_scales, w.min_kind, 0 if bias is None else bias.data_ptr(), out.data_ptr(), ldo,
               native_threads() if num_threads is None else int(num_threads), isa or "")
    return out


def kernel_isa() -> str:
    """The kernel path qlinear runs: "avx512vnni", "avx2" or "scalar" (the CPU's best, capped by
    the environment variable SARATHI_QUANT_ISA=scalar|avx2|avx512vnni)."""
    return _C.kernel_isa()


def available_isas() -> List[str]:
    """Every kernel path this CPU can run, lowest first (for tests and benchmarks)."""
    return list(_C.available_isas())


def int8_peak_gops(isa: Optional[str] = None, seconds: float = 0.2) -> float:
    """A measured single-thread int8 multiply-add peak estimate (GOP/s, 2 ops per MAC)."""
    return float(_C.int8_peak_gops(isa or "", seconds))
