"""CPU kernels for weight-only quantized linear layers: y = x @ W.T with W in 4-/8-bit blocks.

Logical weight format (what loaders hand to `pack`): W [N out, K in] in blocks of `block`
(16 or 32) elements along K,

    W[n, k] = scale[n, k // block] * q[n, k] + min[n, k // block]      (min None: 0)

with q uint8 in [0, 15] (bits=4) or int8 in [-128, 127] (bits=8), [-16, 15] (bits=5, block 32:
GGUF Q5_0; [0, 31] with a min: Q5_K) or [-32, 31] (bits=6, block 16: GGUF Q6_K), scale / min
float32 [N, ceil(K / block)]. K need not be a multiple of the block. GGUF's K-quants may also pass their fp16 super-block
scales (`super_scale`, `super_min`: [N, K / 256]); the sub-block scales are then stored as the
file's integers (Q6_K: 6.5625 bits/weight, as in the file; Q4_K 4.625, Q5_K 5.625).

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
the vpdpbusd operand order; bits 4: two k-groups per byte; bits 8: q + 128; bits 5 / 6: q + 16 /
q + 32 as bits 4 nibbles and a plane of the high bits; K-quants: one record per super-block of
256 with integer sub-scales and fp16 super-scales), then 16 scales
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
_BITS = (4, 5, 6, 8)
_BLOCKS = (16, 32)
_SUPER = 256  # elements of a GGUF K-quant super-block
_HIGH_BITS_BLOCK = {5: 32, 6: 16}  # bits 5 / 6: their one block size (a 64-byte high-bit plane)


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
    k_super = False      # GGUF K-quant super-blocks: integer sub-scales (and mins) under fp16 d (and dmin)

    def __init__(self, data: torch.Tensor, bits: int, block: int, out_features: int, in_features: int,
                 has_min: bool, half_scales: bool, implied_min: bool = False, int_min: bool = False,
                 k_super: bool = False):
        self.bits = int(bits)
        self.block = int(block)
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        self.has_min = bool(has_min)
        self.half_scales = bool(half_scales)
        self.implied_min = bool(implied_min)
        self.int_min = bool(int_min)
        self.k_super = bool(k_super)
        if self.implied_min and (self.bits != 4 or not self.has_min):
            raise ValueError("an implied min (-8 * scale) needs bits=4 and has_min")
        if self.int_min and (not self.has_min or self.implied_min):
            raise ValueError("int8 min multipliers need has_min (and no implied min)")
        if self.k_super and (self.implied_min or self.int_min or not self.half_scales):
            raise ValueError("K-quant super-blocks have fp16 super-scales and stored integer mins")
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
        """How the record holds the scales and mins (the kernels' argument): 0 floats (or no min),
        1 implied min, 2 int8 z, 3 K-quant super-blocks."""
        return 3 if self.k_super else 1 if self.implied_min else 2 if self.int_min else 0

    @property
    def shape(self):
        return (self.out_features, self.in_features)

    def nbytes(self) -> int:
        """Bytes one qlinear call streams from the weight (q, scales, mins, panel/K padding)."""
        return self.data.numel()

    def _parts(self):
        if self.k_super:
            return self._super_parts()
        P, nb, rec = self.data.shape
        B = self.block
        qb = PANEL * B * self.bits // 8
        sb = 2 if self.half_scales else 4
        sdt = torch.float16 if self.half_scales else torch.float32
        d = self.data
        q = _unpack_q(d[:, :, :qb], self.bits, B, _offset(self.bits, self.has_min))
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

    def _super_parts(self):
        P, nrec, rec = self.data.shape
        B, subs = self.block, _SUPER // self.block
        qb = PANEL * B * self.bits // 8
        d = self.data
        q = _unpack_q(d[:, :, :subs * qb].reshape(P, nrec * subs, qb), self.bits, B, _offset(self.bits, self.has_min))

        def ints(off, dtype):  # [P, nrec, subs, 16] bytes -> float [P * 16, nrec * subs]
            v = d[:, :, off:off + subs * PANEL].contiguous().view(dtype).float().reshape(P, nrec, subs, PANEL)
            return v.permute(0, 3, 1, 2).reshape(P * PANEL, nrec * subs)

        def halves(off):  # 16 fp16 per record -> float [P * 16, nrec * subs], repeated per sub-block
            v = d[:, :, off:off + 2 * PANEL].contiguous().view(torch.float16).float().permute(0, 2, 1)
            return v.reshape(P * PANEL, nrec).repeat_interleave(subs, dim=1)

        sc_off = subs * qb
        d_off = sc_off + subs * PANEL * (2 if self.has_min else 1)
        scale = halves(d_off) * ints(sc_off, torch.int8 if self.bits == 6 else torch.uint8)
        mn = -(halves(d_off + 2 * PANEL) * ints(sc_off + subs * PANEL, torch.uint8)) if self.has_min else None
        return q, scale, mn

    def unpack(self):
        """(q, scale, min) in the logical format, as given to `pack` (K-quant super-blocks: each sub-block's
        scale and min as its float, super-scale x integer)."""
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
                f"min={'-8 x scale' if self.implied_min else '-scale x int8' if self.int_min else self.has_min}, "
                f"{'K-quant super-blocks' if self.k_super else 'fp16' if self.half_scales else 'fp32'} "
                f"scales, {self.nbytes()} bytes)")


def _offset(bits: int, has_min: bool) -> int:
    """u - q as stored: bits 8 and the signed bits 5 / 6 (Q5_0, Q6_K) are offset binary; with a min
    (Q5_K) bits 5 holds q in [0, 31] as it is."""
    return 128 if bits == 8 else 1 << (bits - 1) if bits in (5, 6) and not has_min else 0


def _unpack_q(raw: torch.Tensor, bits: int, B: int, offset: int) -> torch.Tensor:
    """q sections [P, nb, q bytes] -> logical q int16 [P * 16, nb * B] (the layout in csrc/quant/qgemm.h)."""
    P, nb, _ = raw.shape
    G, H = B // 4, B // 8
    if bits == 8:
        g = raw.reshape(P, nb, G, PANEL, 4).to(torch.int16) - 128
    else:
        lo = raw[:, :, :H * 64].reshape(P, nb, H, PANEL, 4)
        g = torch.cat([lo & 15, lo >> 4], dim=2).to(torch.int16)  # [P, nb, G, 16, 4]
        if bits > 4:
            hb = bits - 4
            hp = raw[:, :, H * 64:H * 64 + 64].reshape(P, nb, 1, PANEL, 4).to(torch.int16)
            shifts = (hb * torch.arange(G, dtype=torch.int16)).view(1, 1, G, 1, 1)
            g = (g | (((hp >> shifts) & ((1 << hb) - 1)) << 4)) - offset
    return g.permute(0, 3, 1, 2, 4).reshape(P * PANEL, nb * B)


def _pack_q(q: torch.Tensor, bits: int, B: int, P: int, nb: int, off: int) -> torch.Tensor:
    """Logical q [N, K] -> q sections uint8 [P, nb, q bytes] holding q + off (padding: q = 0)."""
    N, K = q.shape
    G = B // 4
    qpad = torch.full((P * PANEL, nb * B), off, dtype=torch.uint8)
    qpad[:N, :K] = (q.to(torch.int16) + off).to(torch.uint8)
    t = qpad.view(P, PANEL, nb, G, 4).permute(0, 2, 3, 1, 4)  # [P, nb, G, 16, 4]
    if bits == 8:
        return t.reshape(P, nb, -1)
    low = t & 15
    parts = [(low[:, :, :G // 2] | (low[:, :, G // 2:] << 4)).reshape(P, nb, -1)]
    if bits > 4:  # the high-bit plane: group g's bits at bit (bits - 4) * g of each lane byte
        hb = bits - 4
        high = (t >> 4).to(torch.int32) << (hb * torch.arange(G, dtype=torch.int32)).view(1, 1, G, 1, 1)
        parts.append(high.sum(dim=2).to(torch.uint8).reshape(P, nb, -1))
    return torch.cat(parts, dim=2)


def _super_ints(values: torch.Tensor, sup: torch.Tensor, lo: int, hi: int) -> Optional[torch.Tensor]:
    """values [N, nb] = sup [N, nb / subs] (repeated per sub-block) x integers in [lo, hi], exactly? -> them."""
    s = sup.repeat_interleave(values.shape[1] // sup.shape[1], dim=1)
    nz = s != 0
    ints = torch.where(nz, values / torch.where(nz, s, torch.ones_like(s)), torch.zeros_like(s)).round()
    ok = bool(((ints >= lo) & (ints <= hi)).all()) and bool(torch.equal(s * ints, values))
    return ints if ok else None


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
         block: int = 32, *, super_scale: Optional[torch.Tensor] = None,
         super_min: Optional[torch.Tensor] = None, native: Optional[bool] = None) -> PackedWeight:
    """Repack a logical quantized weight (see the module docstring) into the kernel layout.

    q: [N, K] uint8 in [0, 15] (bits=4) or int8 (bits=5: [-16, 15], 6: [-32, 31], 8); scale, min:
    float32 [N, ceil(K / block)], finite. super_scale / super_min (GGUF Q6_K: bits 6, no min; Q4_K /
    Q5_K: bits 4 / 5 with a min, Q5_K's q in [0, 31]): [N, K / 256] fp16 values; when every scale is
    super_scale times an int8 (Q6_K) or 0..63 (Q4_K / Q5_K) and every min -(super_min times 0..63),
    exactly, the integers are stored
    in K-quant super-blocks; otherwise the plain layout. native (default: the kernel path is AVX-512)
    keeps the 5- / 6-bit blocks and super-blocks; False packs them as int8 / fp32-scale blocks, which
    the AVX2 and scalar paths read faster than they expand the others. Raises ValueError naming what
    is wrong.
    Cost: a few vectorised torch passes over the weight (~10 ms for 576 x 3072 on one core); do it
    once at load time."""
    if bits not in _BITS:
        raise ValueError(f"bits must be 4, 5, 6 or 8, got {bits!r}")
    if block not in _BLOCKS:
        raise ValueError(f"block must be 16 or 32, got {block!r}")
    q5k = bits == 5 and min is not None and super_scale is not None  # GGUF Q5_K: q in [0, 31] with a min
    if bits in _HIGH_BITS_BLOCK and (block != _HIGH_BITS_BLOCK[bits] or (min is not None and not q5k)):
        raise ValueError(f"bits={bits} needs block {_HIGH_BITS_BLOCK[bits]} and no min (bits=5 with a min: "
                         "only as K-quant super-blocks)")
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 2 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q must be a non-empty 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    N, K = q.shape
    nb = -(-K // block)
    _check_tensor("q", q, torch.uint8 if bits == 4 else torch.int8, (N, K))
    if bits == 4 and int(q.max()) > 15:
        raise ValueError(f"q values must be in [0, 15] for bits=4, got max {int(q.max())}")
    lo = -_offset(bits, min is not None) if bits in (5, 6) else 0
    if bits in (5, 6) and not (lo <= int(q.min()) and int(q.max()) < lo + (1 << bits)):
        raise ValueError(f"q values must be in [{lo}, {lo + (1 << bits) - 1}] for bits={bits}")
    _check_tensor("scale", scale, torch.float32, (N, nb))
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("scale has non-finite values")
    if min is not None:
        _check_tensor("min", min, torch.float32, (N, nb))
        if not bool(torch.isfinite(min).all()):
            raise ValueError("min has non-finite values")

    if native is None:
        native = kernel_isa() == "avx512vnni"
    if not native:
        bits, super_scale, super_min = 8 if bits in (5, 6) else bits, None, None
    P = -(-N // PANEL)
    if super_scale is not None:
        w = _pack_super(q, scale, min, bits, block, super_scale, super_min, P)
        if w is not None:
            return w
        if q5k:
            raise ValueError("bits=5 with a min needs scales and mins that are the super-scales times 0..63")
    Np = P * PANEL
    parts = [_pack_q(q, bits, block, P, nb, _offset(bits, False))]  # offset binary: the unsigned vpdpbusd operand

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


def _pack_super(q, scale, mn, bits, block, sup, sup_min, P) -> Optional[PackedWeight]:
    """GGUF Q6_K / Q4_K super-blocks (layout in csrc/quant/qgemm.h), or None when the weight is not one."""
    N, K = q.shape
    if not ((bits == 6 and mn is None) or (bits in (4, 5) and block == 32 and mn is not None and sup_min is not None)):
        return None
    nrec = K // _SUPER
    if K % _SUPER or sup.shape != (N, nrec) or (sup_min is not None and sup_min.shape != (N, nrec)):
        return None
    if not _exact_half(sup) or (mn is not None and not _exact_half(sup_min)):
        return None
    sc = _super_ints(scale, sup, -128, 127) if bits == 6 else _super_ints(scale, sup, 0, 63)
    m = None if mn is None else _super_ints(-mn, sup_min, 0, 63)
    if sc is None or (mn is not None and m is None):
        return None
    subs = _SUPER // block

    def per_record(v: torch.Tensor, dtype) -> torch.Tensor:  # [N, nrec * k] -> bytes [P, nrec, k * 16]
        k = v.shape[1] // nrec
        pad = torch.zeros(P * PANEL, v.shape[1], dtype=torch.float32)
        pad[:N] = v
        t = pad.view(P, PANEL, nrec, k).permute(0, 2, 3, 1).to(dtype).contiguous()
        return t.view(torch.uint8).reshape(P, nrec, -1)

    ints = torch.int8 if bits == 6 else torch.uint8
    parts = [_pack_q(q, bits, block, P, nrec * subs, _offset(bits, mn is not None)).reshape(P, nrec, -1),
             per_record(sc, ints)]
    if m is not None:
        parts.append(per_record(m, torch.uint8))
    parts.append(per_record(sup, torch.float16))
    if sup_min is not None and mn is not None:
        parts.append(per_record(sup_min, torch.float16))
    data = torch.cat(parts, dim=2).contiguous()
    w = PackedWeight(data, bits, block, N, K, mn is not None, True, k_super=True)
    assert data.shape[2] == int(_C.record_bytes(bits, block, mn is not None, True, 3)), data.shape
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
