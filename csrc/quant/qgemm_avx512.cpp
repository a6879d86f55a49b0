// AVX-512 VNNI kernels: vpdpbusd (u8 weights x s8 activations -> s32, 4 k per lane) on
// 16-column panels, one fp32 FMA per block and output vector.
//
// Micro-kernel: MR activation rows x NP panels (16 columns each) in registers. Per block of
// B inputs: G = B / 4 groups; each group's weight vector (64 bytes = 16 columns x 4 k) is
// loaded once and used for all MR rows; each row's 4 activation bytes are broadcast from
// memory. The block's int32 sums are then scaled: acc += float(isum) * (d_w * d_x)
// (+ min_w * d_x * sum(q_x)). bits 8 weights are stored offset binary (q + 128), so the
// int32 accumulator starts at -128 * sum(q_x), which makes the block sum exact.
// GCC 12 warns (falsely) inside its own _mm512_reduce_* helpers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qgemm.h"

#define SQK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))
#define SQK_INLINE inline __attribute__((always_inline))

namespace sqk {
namespace {

SQK_AVX512 SQK_INLINE __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <bool HALF>
SQK_AVX512 SQK_INLINE __m512 load16f(const uint8_t* p) {
  if constexpr (HALF)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

// The 16 columns' minimums of a block record at p (after the q bytes): MIN 1 stored floats,
// 2 -8 * scale (GGUF Q4_0), 3 -(scale * z) with int8 z (zero points). Each is exact where the
// packer chose it (kernels.pack checks the same float operations), so every MIN gives one result.
template <int MIN, bool HALF>
SQK_AVX512 SQK_INLINE __m512 min16(const uint8_t* mins, __m512 dw);

template <int BITS, int B, int MIN, bool HALF>
struct Fmt {
  static constexpr int G = B / 4;
  static constexpr int QB = kPanel * B * BITS / 8;
  static constexpr int SB = HALF ? 2 : 4;
  static constexpr int REC = QB + kPanel * SB * (MIN == 1 ? 2 : 1) + (MIN == 3 ? kPanel : 0);
};

template <int MIN, bool HALF>
SQK_AVX512 SQK_INLINE __m512 min16(const uint8_t* mins, __m512 dw) {
  if constexpr (MIN == 1) return load16f<HALF>(mins);
  if constexpr (MIN == 2) return _mm512_mul_ps(dw, _mm512_set1_ps(-8.f));
  const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins))));
  return _mm512_xor_ps(_mm512_mul_ps(dw, z), _mm512_set1_ps(-0.f));
}

// Rows [m0, m0 + MR) x panels [p0, p0 + NP) -> y.
template <int BITS, int B, int MIN, bool HALF, int MR, int NP>
SQK_AVX512 void micro(const Ctx& c, int64_t p0, int64_t m0, const uint8_t* pf, int64_t pf_step) {
  using F = Fmt<BITS, B, MIN, HALF>;
  const int64_t nb = c.nb;
  const uint8_t* wp[NP];
  for (int p = 0; p < NP; ++p) wp[p] = c.w + (p0 + p) * nb * F::REC;
  const int8_t* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = c.xq + (m0 + i) * c.Kp;
  const float* xd = c.xd + m0 * nb;
  const float* xs = c.xs + m0 * nb;
  const int32_t* xc = c.xc + m0 * nb;

  __m512 acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0f);

  for (int64_t b = 0; b < nb; ++b) {
    if (pf) {
      for (int64_t o = 0; o < pf_step; o += 64) _mm_prefetch(reinterpret_cast<const char*>(pf) + o, _MM_HINT_T0);
      pf += pf_step;
    }
    __m512i ia[MR][NP];
    for (int i = 0; i < MR; ++i)
      for (int p = 0; p < NP; ++p)
        ia[i][p] = BITS == 8 ? _mm512_set1_epi32(xc[i * nb + b]) : _mm512_setzero_si512();
    const int64_t xo = b * B;
    if constexpr (BITS == 4) {
      for (int h = 0; h < F::G / 2; ++h) {
        __m512i lo[NP], hi[NP];
        for (int p = 0; p < NP; ++p) {
          const __m512i raw = _mm512_loadu_si512(wp[p] + h * 64);
          lo[p] = _mm512_and_si512(raw, m4);
          hi[p] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
        }
        for (int i = 0; i < MR; ++i) {
          const __m512i xl = bcast4(xr[i] + xo + 4 * h);
          const __m512i xh = bcast4(xr[i] + xo + 4 * (h + F::G / 2));
          for (int p = 0; p < NP; ++p) {
            ia[i][p] = _mm512_dpbusd_epi32(ia[i][p], lo[p], xl);
            ia[i][p] = _mm512_dpbusd_epi32(ia[i][p], hi[p], xh);
          }
        }
      }
    } else {
      for (int g = 0; g < F::G; ++g) {
        __m512i wv[NP];
        for (int p = 0; p < NP; ++p) wv[p] = _mm512_loadu_si512(wp[p] + g * 64);
        for (int i = 0; i < MR; ++i) {
          const __m512i xv = bcast4(xr[i] + xo + 4 * g);
          for (int p = 0; p < NP; ++p) ia[i][p] = _mm512_dpbusd_epi32(ia[i][p], wv[p], xv);
        }
      }
    }
    for (int p = 0; p < NP; ++p) {
      const __m512 dw = load16f<HALF>(wp[p] + F::QB);
      for (int i = 0; i < MR; ++i) {
        const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(xd[i * nb + b]));
        acc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][p]), s, acc[i][p]);
      }
      if constexpr (MIN != 0) {
        const __m512 mw = min16<MIN, HALF>(wp[p] + F::QB + kPanel * F::SB, dw);
        for (int i = 0; i < MR; ++i) acc[i][p] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[i * nb + b]), acc[i][p]);
      }
      wp[p] += F::REC;
    }
  }

  for (int p = 0; p < NP; ++p) {
    const int64_t n0 = (p0 + p) * kPanel;
    const int64_t cols = std::min<int64_t>(kPanel, c.N - n0);
    const __mmask16 mask = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
    const __m512 bias = c.bias ? _mm512_maskz_loadu_ps(mask, c.bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i)
      _mm512_mask_storeu_ps(c.y + (m0 + i) * c.ldy + n0, mask, _mm512_add_ps(acc[i][p], bias));
  }
}

// The M % MR leftover rows: micro<R> for R = rem.
template <int BITS, int B, int MIN, bool HALF, int NP, int R>
SQK_AVX512 void tail(const Ctx& c, int64_t p0, int64_t m, int64_t rem, const uint8_t* pf, int64_t step) {
  if constexpr (R > 0) {
    if (rem == R)
      micro<BITS, B, MIN, HALF, R, NP>(c, p0, m, pf, step);
    else
      tail<BITS, B, MIN, HALF, NP, R - 1>(c, p0, m, rem, pf, step);
  }
}

// All rows for panels [p0, p0 + NP), MR at a time. While they run, the next NP panels'
// weights (the next contiguous strip) are prefetched, spread evenly over the row tiles, so
// the memory stream overlaps the compute instead of stalling the first tile of each strip.
template <int BITS, int B, int MIN, bool HALF, int MR, int NP>
SQK_AVX512 void rows(const Ctx& c, int64_t p0, int64_t p_end, int64_t m_begin, int64_t m_end) {
  using F = Fmt<BITS, B, MIN, HALF>;
  const int64_t tiles = (m_end - m_begin + MR - 1) / MR;
  const int64_t strip = int64_t(NP) * c.nb * F::REC;
  const uint8_t* next = p0 + NP < p_end ? c.w + (p0 + NP) * c.nb * F::REC : nullptr;
  // Bytes to prefetch per block of each tile (whole cache lines).
  const int64_t step = next ? ((strip + tiles * c.nb - 1) / (tiles * c.nb) + 63) / 64 * 64 : 0;
  auto pf = [&](int64_t tile) -> const uint8_t* {
    return next && tile * c.nb * step < strip ? next + tile * c.nb * step : nullptr;
  };
  int64_t m = m_begin, t = 0;
  for (; m + MR <= m_end; m += MR, ++t) micro<BITS, B, MIN, HALF, MR, NP>(c, p0, m, pf(t), step);
  if (m < m_end) tail<BITS, B, MIN, HALF, NP, MR - 1>(c, p0, m, m_end - m, pf(t), step);
}

// Decode (M <= kGemvRows rows: memory bound): all MR rows against one panel at a time, the
// weights one sequential stream read once, prefetched a fixed kPfDist bytes ahead of the loads.
// micro()'s tiles (4 rows x 2 panels, the next strip prefetched in whole) read a panel once per
// 4 rows and, with long K (8192: 73 KB panels), prefetched past L1 and evicted the activations.
// At MR = 1 a block's int32 dot product is split over two accumulators (low / high nibble
// groups; even / odd groups for bits 8) to halve the chain of dependent vpdpbusd; with MR >= 2
// the rows' chains interleave. The integer sums are exact and the float operations per row and
// block are those of micro(), so the bits are the same.
constexpr int64_t kPfDist = 2048;
constexpr int kGemvRows = 8;

template <int BITS, int B, int MIN, bool HALF, int MR>
SQK_AVX512 void gemv(const Ctx& c, int64_t p) {
  using F = Fmt<BITS, B, MIN, HALF>;
  constexpr int S = MR == 1 ? 2 : 1;  // int32 accumulators per row
  const int64_t nb = c.nb;
  const uint8_t* wp = c.w + p * nb * F::REC;
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  constexpr int kLines = (F::REC + 63) / 64;
  for (int64_t b = 0; b < nb; ++b) {
    for (int l = 0; l < kLines; ++l) _mm_prefetch(reinterpret_cast<const char*>(wp) + kPfDist + 64 * l, _MM_HINT_T0);
    __m512i ia[MR][S];
    for (int i = 0; i < MR; ++i) {
      ia[i][0] = BITS == 8 ? _mm512_set1_epi32(c.xc[i * nb + b]) : _mm512_setzero_si512();
      if constexpr (S == 2) ia[i][S - 1] = _mm512_setzero_si512();
    }
    const int8_t* xb = c.xq + b * B;
    if constexpr (BITS == 4) {
      for (int h = 0; h < F::G / 2; ++h) {
        const __m512i raw = _mm512_loadu_si512(wp + h * 64);
        const __m512i lo = _mm512_and_si512(raw, m4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
        for (int i = 0; i < MR; ++i) {
          const int8_t* xr = xb + i * c.Kp;
          ia[i][0] = _mm512_dpbusd_epi32(ia[i][0], lo, bcast4(xr + 4 * h));
          ia[i][S - 1] = _mm512_dpbusd_epi32(ia[i][S - 1], hi, bcast4(xr + 4 * (h + F::G / 2)));
        }
      }
    } else {
      for (int g = 0; g < F::G; g += 2) {
        const __m512i w0 = _mm512_loadu_si512(wp + g * 64);
        const __m512i w1 = _mm512_loadu_si512(wp + (g + 1) * 64);
        for (int i = 0; i < MR; ++i) {
          const int8_t* xr = xb + i * c.Kp;
          ia[i][0] = _mm512_dpbusd_epi32(ia[i][0], w0, bcast4(xr + 4 * g));
          ia[i][S - 1] = _mm512_dpbusd_epi32(ia[i][S - 1], w1, bcast4(xr + 4 * (g + 1)));
        }
      }
    }
    const __m512 dw = load16f<HALF>(wp + F::QB);
    for (int i = 0; i < MR; ++i) {
      const __m512i isum = S == 2 ? _mm512_add_epi32(ia[i][0], ia[i][S - 1]) : ia[i][0];
      const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(c.xd[i * nb + b]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc[i]);
    }
    if constexpr (MIN != 0) {
      const __m512 mw = min16<MIN, HALF>(wp + F::QB + kPanel * F::SB, dw);
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(c.xs[i * nb + b]), acc[i]);
    }
    wp += F::REC;
  }
  const int64_t n0 = p * kPanel;
  const int64_t cols = std::min<int64_t>(kPanel, c.N - n0);
  const __mmask16 mask = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  const __m512 bias = c.bias ? _mm512_maskz_loadu_ps(mask, c.bias + n0) : _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(c.y + i * c.ldy + n0, mask, _mm512_add_ps(acc[i], bias));
}

// Panels [p0, p1) for M = R rows (R <= kGemvRows), gemv<R>.
template <int BITS, int B, int MIN, bool HALF, int R>
SQK_AVX512 void gemv_rows(const Ctx& c, int64_t p0, int64_t p1) {
  if constexpr (R > 0) {
    if (c.M == R) {
      for (int64_t p = p0; p < p1; ++p) gemv<BITS, B, MIN, HALF, R>(c, p);
    } else {
      gemv_rows<BITS, B, MIN, HALF, R - 1>(c, p0, p1);
    }
  }
}

// Register tile: 4 rows x 2 panels = 8 int32 + 8 fp32 accumulators (measured best of 3x3,
// 4x2, 5x2, 6x2, 8x1 on Zen 5: ~700 GOP/s per thread with the weights in cache).
constexpr int kMR = 4;
constexpr int kNP = 2;
// Rows per chunk: quantized activations of a chunk (chunk x Kp bytes) stay <= 256 KiB in L2.
constexpr int64_t kXChunkBytes = 256 << 10;

// Panels [p0, p1) for all rows. Rows go in chunks whose quantized activations (chunk x Kp
// bytes) stay in L2 next to this thread's weights; each chunk sweeps all the panels.
template <int BITS, int B, int MIN, bool HALF>
SQK_AVX512 void gemm(const Ctx& c, int64_t p0, int64_t p1) {
  if (c.M <= kGemvRows) {  // decode: memory bound, the weights as one sequential stream
    gemv_rows<BITS, B, MIN, HALF, kGemvRows>(c, p0, p1);
    return;
  }
  const int64_t chunk = std::max<int64_t>(kMR, kXChunkBytes / c.Kp / kMR * kMR);
  for (int64_t m0 = 0; m0 < c.M; m0 += chunk) {
    const int64_t m1 = std::min(c.M, m0 + chunk);
    int64_t p = p0;
    for (; p + kNP <= p1; p += kNP) rows<BITS, B, MIN, HALF, kMR, kNP>(c, p, p1, m0, m1);
    for (; p < p1; ++p) rows<BITS, B, MIN, HALF, kMR, 1>(c, p, p1, m0, m1);
  }
}

// Per block: max |x| (and a non-finite check), then q = round(x * 127 / max) -- the same
// float operations as quantize_block_ref, so every path quantizes identically.
template <int B>
SQK_AVX512 void quantize(const float* x, int64_t ldx, const Ctx& c, int64_t m0, int64_t m1) {
  constexpr int V = B / 16;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* q = const_cast<int8_t*>(c.xq) + m * c.Kp;
    float* xd = const_cast<float*>(c.xd) + m * c.nb;
    float* xs = const_cast<float*>(c.xs) + m * c.nb;
    int32_t* xc = const_cast<int32_t*>(c.xc) + m * c.nb;
    for (int64_t b = 0; b < c.nb; ++b) {
      __m512 v[V];
      __m512 amax = _mm512_setzero_ps(), fin = _mm512_setzero_ps();
      for (int j = 0; j < V; ++j) {
        const int64_t k0 = b * B + j * 16;
        const int64_t left = c.K - k0;
        const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
        v[j] = _mm512_maskz_loadu_ps(mk, xr + k0);
        amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, v[j]));
        fin = _mm512_add_ps(fin, _mm512_mul_ps(v[j], _mm512_setzero_ps()));  // NaN iff a value is inf / NaN
      }
      const float mx = _mm512_reduce_max_ps(amax);
      const float nanflag = _mm512_reduce_add_ps(fin);
      if (nanflag != 0.f || !(mx >= 0x1p-96f)) {  // non-finite (nanflag is NaN) or ~zero block
        std::memset(q + b * B, 0, B);
        xd[b] = nanflag != nanflag ? std::nanf("") : 0.f;
        xs[b] = 0.f;
        xc[b] = 0;
        continue;
      }
      const float d = mx / 127.f;
      const __m512 id = _mm512_set1_ps(127.f / mx);
      __m512i sum = _mm512_setzero_si512();
      for (int j = 0; j < V; ++j) {
        const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], id));
        sum = _mm512_add_epi32(sum, qi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * B + j * 16), _mm512_cvtsepi32_epi8(qi));
      }
      const int32_t s = _mm512_reduce_add_epi32(sum);
      xd[b] = d;
      xs[b] = d * float(s);
      xc[b] = -128 * s;
    }
  }
}

template <int BITS, int B, int MIN, bool HALF>
Kernels make() {
  return Kernels{quantize<B>, gemm<BITS, B, MIN, HALF>, kNP, kGemvRows};
}

template <int BITS, int B>
Kernels pick_min_half(const WeightFormat& f) {
  if (f.int_min) return f.half_scales ? make<BITS, B, 3, true>() : make<BITS, B, 3, false>();
  if constexpr (BITS == 4) {
    if (f.implied_min) return f.half_scales ? make<BITS, B, 2, true>() : make<BITS, B, 2, false>();
  }
  if (f.has_min) return f.half_scales ? make<BITS, B, 1, true>() : make<BITS, B, 1, false>();
  return f.half_scales ? make<BITS, B, 0, true>() : make<BITS, B, 0, false>();
}

SQK_AVX512 int32_t peak_loop(int64_t iters, int32_t seed) {
  // 12 independent vpdpbusd chains: enough to cover the latency on current cores.
  __m512i acc[12];
  const __m512i a = _mm512_set1_epi32(seed | 0x01010101), b = _mm512_set1_epi32(seed ^ 0x03030303);
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  }
  __m512i s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, acc[i]);
  uint32_t lanes[16], r = 0;  // the sums wrap: add them unsigned (no signed-overflow UB)
  _mm512_storeu_si512(lanes, s);
  for (uint32_t v : lanes) r += v;
  return int32_t(r & 0x7fffffff);
}

}  // namespace

Kernels avx512_kernels(const WeightFormat& f) {
  if (f.bits == 4) return f.block == 32 ? pick_min_half<4, 32>(f) : pick_min_half<4, 16>(f);
  return f.block == 32 ? pick_min_half<8, 32>(f) : pick_min_half<8, 16>(f);
}

int32_t peak_loop_avx512(int64_t iters, int32_t seed) { return peak_loop(iters, seed); }

}  // namespace sqk
