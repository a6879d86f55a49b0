// GGUF's 5- and 6-bit blocks and K-quant super-blocks at their own size (layouts in qgemm.h).
//
// Decode (M <= 8) on AVX-512 reads the packed bits directly: per block, the low nibbles and the
// high-bit plane are merged into the unsigned operand u of vpdpbusd (one ternary-logic op per
// 64 bytes), the int32 accumulator starts at -offset * sum(q_x) (offset 16 / 32 for the signed
// Q5_0 / Q6_K values, 0 for Q4_K / Q5_K), and a K-quant sub-block's float scale d * sc (and min
// -(dmin * m)) is formed in the kernel. Every other case (prefill; AVX2 and scalar, where the
// loader packs these types as int8 / 4-bit blocks unless asked not to) expands one or two panels
// at a time into the block form of f.expanded() and runs that format's kernel. Both do
// the float operations of the expanded block form in the same order (the integer sums are
// exact, d * sc is exact in fp32), so every path and batch size gives the same bits as the
// same weight loaded as int8 / 4-bit blocks.
// GCC 12 warns (falsely) inside its own AVX-512 helpers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "qgemm.h"

#define SQK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

namespace sqk {

// ---------------------------------------------------------------- expansion (every ISA)

#define SQK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SQK_INLINE inline __attribute__((always_inline))

namespace {

// One block's q section (bits 4 / 5 / 6, block B) -> the expanded q bytes: bits 4 as they are;
// bits 5 / 6 as bits 8 offset binary, q + 128 = u - offset + 128 (no byte overflows: u <= 63).
SQK_INLINE void expand_q(int bits, int B, int offset, const uint8_t* src, uint8_t* dst) {
  const int G = B / 4, H = G / 2;
  if (bits == 4) {
    std::memcpy(dst, src, size_t(H) * 64);
    return;
  }
  const uint8_t* hp = src + H * 64;
  const int hb = bits - 4;
  const uint8_t hmask = uint8_t((1 << hb) - 1), add = uint8_t(128 - offset);
  for (int g = 0; g < G; ++g) {
    const uint8_t* lo = src + (g % H) * 64;
    const int shift = g < H ? 0 : 4, hs = hb * g;
    uint8_t* out = dst + g * 64;
    for (int i = 0; i < 64; ++i)  // loop-invariant shifts: vectorized for the caller's ISA
      out[i] = uint8_t(uint8_t(((lo[i] >> shift) & 15) | (((hp[i] >> hs) & hmask) << 4)) + add);
  }
}

SQK_INLINE float half_at(const uint8_t* p, int j) {
  uint16_t h;
  std::memcpy(&h, p + 2 * j, 2);
  return half_to_float(h);
}

SQK_AVX512 void expand_q_avx512(int bits, int B, int offset, const uint8_t* src, uint8_t* dst);

// One panel's records; AVX512: expand_q's q bytes by the decode kernel's unpacking instead.
template <bool AVX512>
SQK_INLINE void expand_body(const WeightFormat& f, const uint8_t* src, int64_t nrec, uint8_t* dst) {
  auto q = [&](const uint8_t* s, uint8_t* d) {
    if constexpr (AVX512)
      expand_q_avx512(f.bits, f.block, f.offset(), s, d);
    else
      expand_q(f.bits, f.block, f.offset(), s, d);
  };
  const WeightFormat e = f.expanded();
  const int64_t qb = f.qbytes(), eqb = e.qbytes(), erec = e.record(), rec = f.record();
  if (!f.k_super) {
    for (int64_t r = 0; r < nrec; ++r, src += rec, dst += erec) {
      q(src, dst);
      std::memcpy(dst + eqb, src + qb, size_t(erec - eqb));  // the scales (bits 5 / 6 have no min)
    }
    return;
  }
  const int64_t subs = f.subs();
  for (int64_t r = 0; r < nrec; ++r, src += rec) {
    const uint8_t* sc = src + subs * qb;
    const uint8_t* mn = sc + subs * kPanel;
    const uint8_t* dp = sc + subs * kPanel * (f.has_min ? 2 : 1);
    float d[kPanel], dmin[kPanel] = {};
    for (int j = 0; j < kPanel; ++j) {
      d[j] = half_at(dp, j);
      if (f.has_min) dmin[j] = half_at(dp + 2 * kPanel, j);
    }
    for (int64_t s = 0; s < subs; ++s, dst += erec) {
      q(src + s * qb, dst);
      float scale[kPanel], mins[kPanel];
      for (int j = 0; j < kPanel; ++j) {
        const uint8_t v = sc[s * kPanel + j];
        scale[j] = d[j] * (f.bits == 6 ? float(int8_t(v)) : float(v));
        mins[j] = -(dmin[j] * float(mn[s * kPanel + j]));
      }
      std::memcpy(dst + eqb, scale, sizeof scale);
      if (f.has_min) std::memcpy(dst + eqb + sizeof scale, mins, sizeof mins);
    }
  }
}

// The same code compiled for each ISA (the byte loops vectorize 2-4x wider than the baseline's).
SQK_AVX512 void expand_avx512(const WeightFormat& f, const uint8_t* src, int64_t nrec, uint8_t* dst) {
  expand_body<true>(f, src, nrec, dst);
}
SQK_AVX2 void expand_avx2(const WeightFormat& f, const uint8_t* src, int64_t nrec, uint8_t* dst) {
  expand_body<false>(f, src, nrec, dst);
}

}  // namespace

void expand_panel(const WeightFormat& f, const uint8_t* src, int64_t nrec, uint8_t* dst) {
  expand_body<false>(f, src, nrec, dst);
}

namespace {

// Panels [p0, p1) through the expanded format's kernel, expanded as many at a time as its
// micro-kernel covers (a thread's buffer: nb expanded records a panel, 160 KiB for a Q6_K panel
// with K = 8192).
template <Isa I>
void gemm_expanded(const Ctx& c, int64_t p0, int64_t p1) {
  const WeightFormat& f = c.fmt;
  const WeightFormat e = f.expanded();
  const Kernels k = plain_kernels(e, I);
  auto expand = I == Isa::Avx512Vnni ? expand_avx512 : I == Isa::Avx2 ? expand_avx2 : expand_panel;
  const int64_t nrec = c.nb * f.block / f.elems(), step = std::max(1, k.panels_per_step);
  const int64_t ebytes = c.nb * e.record();  // one expanded panel
  thread_local std::vector<uint8_t> buf;
  buf.resize(size_t(step * ebytes));
  for (int64_t p = p0; p < p1; p += step) {
    const int64_t np = std::min(step, p1 - p);
    for (int64_t i = 0; i < np; ++i) expand(f, c.w + (p + i) * nrec * f.record(), nrec, buf.data() + i * ebytes);
    Ctx pc = c;
    pc.fmt = e;
    pc.w = buf.data();
    pc.N = std::min<int64_t>(np * kPanel, c.N - p * kPanel);
    pc.y = c.y + p * kPanel;
    pc.bias = c.bias ? c.bias + p * kPanel : nullptr;
    k.gemm(pc, 0, np);
  }
}

// ---------------------------------------------------------------- AVX-512 decode

SQK_AVX512 SQK_INLINE __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The high bits of group g moved to bit 4 (bits 5) or bits 4-5 (bits 6) of each byte; the
// other bits are cleared by the caller's mask. 16-bit shifts: a byte's bits 4-5 come from its own bits.
template <int BITS>
SQK_AVX512 SQK_INLINE __m512i high_bits(__m512i hp, int g) {
  const int from = (BITS - 4) * g;  // the group's lowest high bit
  if (from < 4) return _mm512_sll_epi16(hp, _mm_cvtsi32_si128(4 - from));
  return _mm512_srl_epi16(hp, _mm_cvtsi32_si128(from - 4));
}

SQK_AVX512 void expand_q_avx512(int bits, int B, int offset, const uint8_t* src, uint8_t* dst) {
  const int H = B / 8;
  if (bits == 4) {
    std::memcpy(dst, src, size_t(H) * 64);
    return;
  }
  const __m512i m4 = _mm512_set1_epi8(0x0f), mh = _mm512_set1_epi8(bits == 5 ? 0x10 : 0x30);
  const __m512i add = _mm512_set1_epi8(char(128 - offset));
  const __m512i hp = _mm512_loadu_si512(src + H * 64);
  for (int h = 0; h < H; ++h) {
    const __m512i raw = _mm512_loadu_si512(src + h * 64);
    const __m512i lo = bits == 5 ? high_bits<5>(hp, h) : high_bits<6>(hp, h);
    const __m512i hi = bits == 5 ? high_bits<5>(hp, h + H) : high_bits<6>(hp, h + H);
    const __m512i u0 = _mm512_ternarylogic_epi32(_mm512_and_si512(raw, m4), lo, mh, 0xF8);
    const __m512i u1 = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(raw, 4), m4), hi, mh, 0xF8);
    _mm512_storeu_si512(dst + h * 64, _mm512_add_epi8(u0, add));
    _mm512_storeu_si512(dst + (h + H) * 64, _mm512_add_epi8(u1, add));
  }
}

constexpr int64_t kPfDist = 2048;
constexpr int kGemvRows = 8;

// One panel for all MR (= M) rows. SUPER: K-quant records (sub-blocks of B under fp16 d / dmin);
// else plain bits 5 / 6 records with HALF or fp32 scales.
template <int BITS, int B, bool SUPER, bool MIN, bool HALF, int MR>
SQK_AVX512 void gemv(const Ctx& c, int64_t p) {
  constexpr int G = B / 4, H = G / 2;
  constexpr int QB = kPanel * B * BITS / 8;
  constexpr int SUBS = SUPER ? WeightFormat::kSuper / B : 1;
  constexpr int S = MR == 1 ? 2 : 1;  // int32 accumulators per row (two chains at M = 1)
  constexpr bool kOffset = BITS != 4 && !MIN;  // signed q stored u = q + 2^(BITS - 1)
  constexpr int32_t kDiv = 128 >> (BITS - 1);  // xc / kDiv = -offset * sum(q_x)
  const int64_t nb = c.nb, rec = c.fmt.record(), nrec = nb / SUBS;
  const int64_t pf_step = (rec / SUBS + 63) / 64 * 64;
  const uint8_t* wp = c.w + p * nrec * rec;
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const __m512i mh = _mm512_set1_epi8(BITS == 5 ? 0x10 : 0x30);
  for (int64_t r = 0; r < nrec; ++r, wp += rec) {
    const uint8_t* scp = wp + SUBS * QB;  // SUPER: sub-scales, sub-mins, d, dmin
    __m512 dsup = _mm512_setzero_ps(), dmin = _mm512_setzero_ps();
    if constexpr (SUPER) {
      const uint8_t* dp = scp + SUBS * kPanel * (MIN ? 2 : 1);
      dsup = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dp)));
      if constexpr (MIN) dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dp + 32)));
    }
    for (int s = 0; s < SUBS; ++s) {
      const char* pf = reinterpret_cast<const char*>(wp) + kPfDist + s * pf_step;
      for (int64_t o = 0; o < pf_step; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
      const int64_t b = r * SUBS + s;
      const uint8_t* q = wp + s * QB;
      __m512i ia[MR][S];
      for (int i = 0; i < MR; ++i) {
        if constexpr (kOffset)
          ia[i][0] = _mm512_set1_epi32(c.xc[i * nb + b] / kDiv);
        else
          ia[i][0] = _mm512_setzero_si512();
        if constexpr (S == 2) ia[i][S - 1] = _mm512_setzero_si512();
      }
      const int8_t* xb = c.xq + b * B;
      const __m512i hp = BITS == 4 ? _mm512_setzero_si512() : _mm512_loadu_si512(q + H * 64);
      for (int h = 0; h < H; ++h) {
        const __m512i raw = _mm512_loadu_si512(q + h * 64);
        __m512i lo = _mm512_and_si512(raw, m4);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
        if constexpr (BITS != 4) {  // u = nibble | (high bits & mask)
          lo = _mm512_ternarylogic_epi32(lo, high_bits<BITS>(hp, h), mh, 0xF8);
          hi = _mm512_ternarylogic_epi32(hi, high_bits<BITS>(hp, h + H), mh, 0xF8);
        }
        for (int i = 0; i < MR; ++i) {
          const int8_t* xr = xb + i * c.Kp;
          ia[i][0] = _mm512_dpbusd_epi32(ia[i][0], lo, bcast4(xr + 4 * h));
          ia[i][S - 1] = _mm512_dpbusd_epi32(ia[i][S - 1], hi, bcast4(xr + 4 * (h + H)));
        }
      }
      __m512 dw, mw = _mm512_setzero_ps();
      if constexpr (SUPER) {
        const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scp + s * kPanel));
        const __m512i sc = BITS == 6 ? _mm512_cvtepi8_epi32(sc8) : _mm512_cvtepu8_epi32(sc8);
        dw = _mm512_mul_ps(dsup, _mm512_cvtepi32_ps(sc));
        if constexpr (MIN) {
          const __m128i m8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scp + (SUBS + s) * kPanel));
          mw = _mm512_xor_ps(_mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m8))), _mm512_set1_ps(-0.f));
        }
      } else if constexpr (HALF) {
        dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + QB)));
      } else {
        dw = _mm512_loadu_ps(reinterpret_cast<const float*>(q + QB));
      }
      for (int i = 0; i < MR; ++i) {
        const __m512i isum = S == 2 ? _mm512_add_epi32(ia[i][0], ia[i][S - 1]) : ia[i][0];
        const __m512 sx = _mm512_mul_ps(dw, _mm512_set1_ps(c.xd[i * nb + b]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sx, acc[i]);
      }
      if constexpr (MIN)
        for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(c.xs[i * nb + b]), acc[i]);
    }
  }
  const int64_t n0 = p * kPanel;
  const int64_t cols = std::min<int64_t>(kPanel, c.N - n0);
  const __mmask16 mask = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  const __m512 bias = c.bias ? _mm512_maskz_loadu_ps(mask, c.bias + n0) : _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(c.y + i * c.ldy + n0, mask, _mm512_add_ps(acc[i], bias));
}

template <int BITS, int B, bool SUPER, bool MIN, bool HALF, int R>
SQK_AVX512 void gemv_rows(const Ctx& c, int64_t p0, int64_t p1) {
  if constexpr (R > 0) {
    if (c.M == R) {
      for (int64_t p = p0; p < p1; ++p) gemv<BITS, B, SUPER, MIN, HALF, R>(c, p);
    } else {
      gemv_rows<BITS, B, SUPER, MIN, HALF, R - 1>(c, p0, p1);
    }
  }
}

template <int BITS, int B, bool SUPER, bool MIN, bool HALF>
void gemm_avx512(const Ctx& c, int64_t p0, int64_t p1) {
  if (c.M > kGemvRows) return gemm_expanded<Isa::Avx512Vnni>(c, p0, p1);
  gemv_rows<BITS, B, SUPER, MIN, HALF, kGemvRows>(c, p0, p1);
}

GemmFn avx512_gemm(const WeightFormat& f) {
  if (f.k_super) {
    if (f.bits == 6) return gemm_avx512<6, 16, true, false, true>;
    return f.bits == 5 ? gemm_avx512<5, 32, true, true, true> : gemm_avx512<4, 32, true, true, true>;
  }
  if (f.bits == 6) return f.half_scales ? gemm_avx512<6, 16, false, false, true> : gemm_avx512<6, 16, false, false, false>;
  return f.half_scales ? gemm_avx512<5, 32, false, false, true> : gemm_avx512<5, 32, false, false, false>;
}

}  // namespace

Kernels kquant_kernels(const WeightFormat& f, Isa isa) {
  Kernels k = plain_kernels(f.expanded(), isa);  // keeps its activation quantization (same block)
  k.panels_per_step = 1;
  k.gemv_rows = 0;
  switch (isa) {
    case Isa::Avx512Vnni: k.gemm = avx512_gemm(f); break;
    case Isa::Avx2: k.gemm = gemm_expanded<Isa::Avx2>; break;
    default: k.gemm = gemm_expanded<Isa::Scalar>; break;
  }
  return k;
}

}  // namespace sqk
