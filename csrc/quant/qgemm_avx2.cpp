// AVX2 kernels (llama.cpp's approach): vpmaddubsw (u8 x s8 -> s16 pairs) and vpmaddwd
// (-> s32), one fp32 FMA per block and output vector. 8 columns per ymm: a 16-column
// panel is two halves (bytes 0-31 and 32-63 of each 64-byte group).
//
// bits 4: the nibbles (0..15) are the unsigned operand, the activations the signed one;
//   a block's 8 (B = 32) vpmaddubsw results are summed in s16 (each <= 2 * 15 * 127 =
//   3810, so 8 of them <= 30480 < 32767) and widened once per block.
// bits 8: stored q + 128; the sign trick makes the unsigned operand |q| (0..128) and the
//   signed one x * sign(q) (|x| <= 127), so a pair is <= 2 * 128 * 127 = 32512: no
//   saturation, widened to s32 right away.
// Micro-kernel: MR rows x NC half-panels (16 ymm registers: MR = 4 x 1, or 1 x 2 for M = 1).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qgemm.h"

#define SQK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SQK_INLINE inline __attribute__((always_inline))

namespace sqk {
namespace {

SQK_AVX2 SQK_INLINE __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <bool HALF>
SQK_AVX2 SQK_INLINE __m256 load8f(const uint8_t* p, int half) {
  if constexpr (HALF)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + half * 16)));
  else
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + half * 8);
}

// Half a panel's minimums (see the AVX-512 file's min16): MIN 1 stored floats, 2 -8 * scale,
// 3 -(scale * z) with int8 z.
template <int MIN, bool HALF>
SQK_AVX2 SQK_INLINE __m256 min8(const uint8_t* mins, int half, __m256 dw) {
  if constexpr (MIN == 1) return load8f<HALF>(mins, half);
  if constexpr (MIN == 2) return _mm256_mul_ps(dw, _mm256_set1_ps(-8.f));
  const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mins + half * 8));
  const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(z8));
  return _mm256_xor_ps(_mm256_mul_ps(dw, z), _mm256_set1_ps(-0.f));
}

template <int BITS, int B, int MIN, bool HALF>
struct Fmt {
  static constexpr int G = B / 4;
  static constexpr int QB = kPanel * B * BITS / 8;
  static constexpr int SB = HALF ? 2 : 4;
  static constexpr int REC = QB + kPanel * SB * (MIN == 1 ? 2 : 1) + (MIN == 3 ? kPanel : 0);
};

// Rows [m0, m0 + MR) x NC half-panels starting at half-panel v0 (panel v0 / 2, half v0 % 2).
template <int BITS, int B, int MIN, bool HALF, int MR, int NC>
SQK_AVX2 void micro(const Ctx& c, int64_t v0, int64_t m0, const uint8_t* pf, int64_t pf_step) {
  using F = Fmt<BITS, B, MIN, HALF>;
  const int64_t nb = c.nb;
  const uint8_t* wp[NC];
  int hf[NC];
  for (int v = 0; v < NC; ++v) {
    wp[v] = c.w + ((v0 + v) / 2) * nb * F::REC;
    hf[v] = int((v0 + v) % 2);
  }
  const int8_t* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = c.xq + (m0 + i) * c.Kp;
  const float* xd = c.xd + m0 * nb;
  const float* xs = c.xs + m0 * nb;

  __m256 acc[MR][NC];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NC; ++v) acc[i][v] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);

  for (int64_t b = 0; b < nb; ++b) {
    if (pf) {
      for (int64_t o = 0; o < pf_step; o += 64) _mm_prefetch(reinterpret_cast<const char*>(pf) + o, _MM_HINT_T0);
      pf += pf_step;
    }
    __m256i ia[MR][NC];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NC; ++v) ia[i][v] = _mm256_setzero_si256();
    const int64_t xo = b * B;
    if constexpr (BITS == 4) {
      const __m256i m4 = _mm256_set1_epi8(0x0f);
      for (int h = 0; h < F::G / 2; ++h) {
        __m256i lo[NC], hi[NC];
        for (int v = 0; v < NC; ++v) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[v] + h * 64 + hf[v] * 32));
          lo[v] = _mm256_and_si256(raw, m4);
          hi[v] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        for (int i = 0; i < MR; ++i) {
          const __m256i xl = bcast4(xr[i] + xo + 4 * h);
          const __m256i xh = bcast4(xr[i] + xo + 4 * (h + F::G / 2));
          for (int v = 0; v < NC; ++v) {
            ia[i][v] = _mm256_add_epi16(ia[i][v], _mm256_maddubs_epi16(lo[v], xl));
            ia[i][v] = _mm256_add_epi16(ia[i][v], _mm256_maddubs_epi16(hi[v], xh));
          }
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NC; ++v) ia[i][v] = _mm256_madd_epi16(ia[i][v], ones);
    } else {
      const __m256i off = _mm256_set1_epi8(char(0x80));
      for (int g = 0; g < F::G; ++g) {
        __m256i ws[NC], wa[NC];
        for (int v = 0; v < NC; ++v) {
          ws[v] = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[v] + g * 64 + hf[v] * 32)), off);
          wa[v] = _mm256_abs_epi8(ws[v]);  // |-128| = 0x80 = 128 as unsigned
        }
        for (int i = 0; i < MR; ++i) {
          const __m256i xv = bcast4(xr[i] + xo + 4 * g);
          for (int v = 0; v < NC; ++v) {
            const __m256i p16 = _mm256_maddubs_epi16(wa[v], _mm256_sign_epi8(xv, ws[v]));
            ia[i][v] = _mm256_add_epi32(ia[i][v], _mm256_madd_epi16(p16, ones));
          }
        }
      }
    }
    for (int v = 0; v < NC; ++v) {
      const __m256 dw = load8f<HALF>(wp[v] + F::QB, hf[v]);
      for (int i = 0; i < MR; ++i) {
        const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(xd[i * nb + b]));
        acc[i][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][v]), s, acc[i][v]);
      }
      if constexpr (MIN != 0) {
        const __m256 mw = min8<MIN, HALF>(wp[v] + F::QB + kPanel * F::SB, hf[v], dw);
        for (int i = 0; i < MR; ++i) acc[i][v] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[i * nb + b]), acc[i][v]);
      }
      wp[v] += F::REC;
    }
  }

  for (int v = 0; v < NC; ++v) {
    const int64_t n0 = (v0 + v) * 8;
    const int64_t cols = std::min<int64_t>(8, c.N - n0);
    if (cols <= 0) continue;
    if (cols == 8) {
      const __m256 bias = c.bias ? _mm256_loadu_ps(c.bias + n0) : _mm256_setzero_ps();
      for (int i = 0; i < MR; ++i) _mm256_storeu_ps(c.y + (m0 + i) * c.ldy + n0, _mm256_add_ps(acc[i][v], bias));
    } else {
      for (int i = 0; i < MR; ++i) {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, acc[i][v]);
        float* yr = c.y + (m0 + i) * c.ldy + n0;
        for (int64_t j = 0; j < cols; ++j) yr[j] = tmp[j] + (c.bias ? c.bias[n0 + j] : 0.f);
      }
    }
  }
}

// Panel by panel: both halves for all rows; meanwhile the next panel's weights are
// prefetched, spread over this panel's micro-kernel calls.
template <int BITS, int B, int MIN, bool HALF>
SQK_AVX2 void gemm(const Ctx& c, int64_t p0, int64_t p1) {
  using F = Fmt<BITS, B, MIN, HALF>;
  const int64_t halves = (c.N + 7) / 8;  // skip an all-padding last half-panel
  const int64_t strip = c.nb * F::REC;
  const int64_t tiles = c.M == 1 ? 1 : (c.M + 3) / 4;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* next = p + 1 < p1 ? c.w + (p + 1) * strip : nullptr;
    const int64_t v0 = 2 * p, v1 = std::min(2 * p + 2, halves);
    const int64_t calls = c.M == 1 ? 1 : (v1 - v0) * tiles;
    const int64_t step = next ? ((strip + calls * c.nb - 1) / (calls * c.nb) + 63) / 64 * 64 : 0;
    int64_t call = 0;
    auto pf = [&]() -> const uint8_t* {
      const int64_t off = (call++) * c.nb * step;
      return next && off < strip ? next + off : nullptr;
    };
    if (c.M == 1) {
      if (v1 - v0 == 2)
        micro<BITS, B, MIN, HALF, 1, 2>(c, v0, 0, pf(), step);
      else
        micro<BITS, B, MIN, HALF, 1, 1>(c, v0, 0, pf(), step);
      continue;
    }
    for (int64_t v = v0; v < v1; ++v) {
      int64_t m = 0;
      for (; m + 4 <= c.M; m += 4) micro<BITS, B, MIN, HALF, 4, 1>(c, v, m, pf(), step);
      switch (c.M - m) {
        case 3: micro<BITS, B, MIN, HALF, 3, 1>(c, v, m, pf(), step); break;
        case 2: micro<BITS, B, MIN, HALF, 2, 1>(c, v, m, pf(), step); break;
        case 1: micro<BITS, B, MIN, HALF, 1, 1>(c, v, m, pf(), step); break;
        default: break;
      }
    }
  }
}

SQK_AVX2 SQK_INLINE __m256 masked_load8(const float* p, int64_t left) {
  if (left >= 8) return _mm256_loadu_ps(p);
  if (left <= 0) return _mm256_setzero_ps();
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(left)), idx);
  return _mm256_maskload_ps(p, mask);
}

SQK_AVX2 SQK_INLINE float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

SQK_AVX2 SQK_INLINE float hsum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

SQK_AVX2 SQK_INLINE int32_t hsum8i(__m256i v) {
  __m128i m = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 0xb1));
  return _mm_cvtsi128_si32(m);
}

// Same float operations as quantize_block_ref (max, d = max / 127, q = rne(x * (127 / max))).
template <int B>
SQK_AVX2 void quantize(const float* x, int64_t ldx, const Ctx& c, int64_t m0, int64_t m1) {
  constexpr int V = B / 8;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* q = const_cast<int8_t*>(c.xq) + m * c.Kp;
    float* xd = const_cast<float*>(c.xd) + m * c.nb;
    float* xs = const_cast<float*>(c.xs) + m * c.nb;
    int32_t* xc = const_cast<int32_t*>(c.xc) + m * c.nb;
    for (int64_t b = 0; b < c.nb; ++b) {
      __m256 v[V];
      __m256 amax = _mm256_setzero_ps(), fin = _mm256_setzero_ps();
      for (int j = 0; j < V; ++j) {
        const int64_t k0 = b * B + j * 8;
        v[j] = masked_load8(xr + k0, c.K - k0);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        fin = _mm256_add_ps(fin, _mm256_mul_ps(v[j], _mm256_setzero_ps()));
      }
      const float mx = hmax8(amax);
      const float nanflag = hsum8(fin);
      if (nanflag != 0.f || !(mx >= 0x1p-96f)) {
        std::memset(q + b * B, 0, B);
        xd[b] = nanflag != nanflag ? std::nanf("") : 0.f;
        xs[b] = 0.f;
        xc[b] = 0;
        continue;
      }
      const float d = mx / 127.f;
      const __m256 id = _mm256_set1_ps(127.f / mx);
      __m256i sum = _mm256_setzero_si256();
      for (int j = 0; j < V; j += 2) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));
        const __m256i bb = _mm256_cvtps_epi32(_mm256_mul_ps(v[j + 1], id));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, bb));
        const __m256i s16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, bb), 0xd8);  // a0..7 b0..7
        const __m128i s8 = _mm_packs_epi16(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * B + j * 8), s8);
      }
      const int32_t s = hsum8i(sum);
      xd[b] = d;
      xs[b] = d * float(s);
      xc[b] = -128 * s;
    }
  }
}

template <int BITS, int B, int MIN, bool HALF>
Kernels make() {
  return Kernels{quantize<B>, gemm<BITS, B, MIN, HALF>, 1};
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

// The 4-bit inner step: vpmaddubsw + vpaddw (32 multiply-adds) in 6 independent chains
// with distinct operands; the signed operand changes every iteration, so nothing is hoisted.
SQK_AVX2 int32_t peak_loop(int64_t iters, int32_t seed) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  const __m256i a0 = _mm256_set1_epi32((seed & 0x07070707) | 0x01010101), one = _mm256_set1_epi8(1);
  const __m256i a1 = _mm256_add_epi8(a0, one), a2 = _mm256_add_epi8(a1, one), a3 = _mm256_add_epi8(a2, one),
                a4 = _mm256_add_epi8(a3, one), a5 = _mm256_add_epi8(a4, one);
  __m256i b = _mm256_set1_epi32(0x01ff01ff);
  for (int64_t it = 0; it < iters; ++it) {
    b = _mm256_add_epi8(b, one);
    c0 = _mm256_add_epi16(c0, _mm256_maddubs_epi16(a0, b));
    c1 = _mm256_add_epi16(c1, _mm256_maddubs_epi16(a1, b));
    c2 = _mm256_add_epi16(c2, _mm256_maddubs_epi16(a2, b));
    c3 = _mm256_add_epi16(c3, _mm256_maddubs_epi16(a3, b));
    c4 = _mm256_add_epi16(c4, _mm256_maddubs_epi16(a4, b));
    c5 = _mm256_add_epi16(c5, _mm256_maddubs_epi16(a5, b));
  }
  const __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(c0, c1), _mm256_add_epi16(c2, c3)),
                                     _mm256_add_epi16(c4, c5));
  uint32_t lanes[8], r = 0;  // the sums wrap: add them unsigned (no signed-overflow UB)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), s);
  for (uint32_t v : lanes) r += v;
  return int32_t(r & 0x7fffffff);
}

}  // namespace

Kernels avx2_kernels(const WeightFormat& f) {
  if (f.bits == 4) return f.block == 32 ? pick_min_half<4, 32>(f) : pick_min_half<4, 16>(f);
  return f.block == 32 ? pick_min_half<8, 32>(f) : pick_min_half<8, 16>(f);
}

int32_t peak_loop_avx2(int64_t iters, int32_t seed) { return peak_loop(iters, seed); }

}  // namespace sqk
