#include "attention.h"

#include "checked.h"
#include "work_pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vattn {
namespace {

constexpr int64_t kKeyBlock = 128;    // keys scored at once (scores stay in L1)
constexpr int64_t kQueryBlock = 16;   // query rows per work item in prefill chunks
constexpr int64_t kMaxGroup = 64;     // query heads per KV head we support
constexpr int64_t kMaxHeadDim = 512;
constexpr int64_t kMaxThreads = 1024;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// IEEE half, kept as its bits: an element of an F16 K/V cache.
struct Half {
  uint16_t bits;
};

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: man x 2^-24, normalised
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as torch's Tensor.half() and F16C's vcvtps2ph.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7fffffff;
  if (x > 0x7f800000u) return uint16_t(sign | 0x7e00);  // nan
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // >= 65520 (and inf): inf
  if (x < 0x38800000u) {                                  // below 2^-14: subnormal or zero
    if (x < 0x33000000u) return uint16_t(sign);           // <= 2^-25 rounds to zero
    const uint32_t e = x >> 23, m = (x & 0x7fffff) | 0x800000, shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (r & 1))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = (x >> 13) - (112u << 10);
  const uint32_t rem = x & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;  // a carry into the exponent is right
  return uint16_t(sign | r);
}

inline float load(const Half* p, int64_t i) { return half_to_float(p[i].bits); }
inline void store(Half* p, int64_t i, float v) { p[i].bits = float_to_half(v); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest even
  p[i] = uint16_t(bits >> 16);
}

// exp(x) for x <= 0 (scores minus their running max), Cephes-style range reduction
// and polynomial: within a few ulp of expf and written so the compiler vectorises it.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  int32_t e = (int32_t(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof s);
  return y * s;
}

// One query row of G heads sharing one KV head, over keys [0, n_keys): online
// softmax in blocks of kKeyBlock keys, accumulation in fp32.
// DC: head_dim fixed at compile time (64, 128) so the D loops fully unroll; 0 = runtime D.
// Always inlined into attend_row (the build's target) and attend_row_avx2 below.
template <typename T, int DC>
inline __attribute__((always_inline)) void attend_row_body(
    const float* q /*[G, D] fp32, pre-scaled*/, const T* k, const T* v, int64_t stride_token, int64_t n_keys,
    int64_t G, int64_t D_runtime, float softcap, float* scores /*[G, kKeyBlock]*/, float* acc /*[G, D]*/,
    float* out /*[G, D]*/) {
  const int64_t D = DC ? DC : D_runtime;
  float m[kMaxGroup], l[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t start = 0; start < n_keys; start += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n_keys - start);
    for (int64_t j = 0; j < nb; ++j) {
      const T* kj = k + (start + j) * stride_token;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * load(kj, d);
        scores[g * kKeyBlock + j] = softcap > 0.0f ? softcap * std::tanh(dot / softcap) : dot;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * kKeyBlock;
      float mb = m[g];
      for (int64_t j = 0; j < nb; ++j) mb = std::max(mb, s[j]);
      const float corr = exp_nonpositive(m[g] - mb);  // 0 on the first block (m = -inf)
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nb; ++j) {
        s[j] = exp_nonpositive(s[j] - mb);
        sum += s[j];
      }
      l[g] = l[g] * corr + sum;
      m[g] = mb;
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
    }
    for (int64_t j = 0; j < nb; ++j) {
      const T* vj = v + (start + j) * stride_token;
      for (int64_t g = 0; g < G; ++g) {
        const float p = scores[g * kKeyBlock + j];
        float* ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += p * load(vj, d);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / l[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
  }
}

template <typename T, int DC>
void attend_row(const float* q, const T* k, const T* v, int64_t stride_token, int64_t n_keys, int64_t G,
                int64_t D_runtime, float softcap, float* scores, float* acc, float* out) {
  attend_row_body<T, DC>(q, k, v, stride_token, n_keys, G, D_runtime, softcap, scores, acc, out);
}

// A portable x86-64 build (SSE2 only) also carries the row kernel compiled for
// AVX2+FMA, chosen at run time when the CPU has them: prefill attention is about 1.7x
// faster with it. A build that already targets AVX2 (-march=native) needs no second copy.
#if defined(__GNUC__) && defined(__x86_64__) && !(defined(__AVX2__) && defined(__FMA__))
#define VATTN_DISPATCH_AVX2 1
template <typename T, int DC>
__attribute__((target("avx2,fma"))) void attend_row_avx2(const float* q, const T* k, const T* v,
                                                         int64_t stride_token, int64_t n_keys, int64_t G,
                                                         int64_t D_runtime, float softcap, float* scores,
                                                         float* acc, float* out) {
  attend_row_body<T, DC>(q, k, v, stride_token, n_keys, G, D_runtime, softcap, scores, acc, out);
}
#else
#define VATTN_DISPATCH_AVX2 0
#endif

template <typename T>
using RowFn = void (*)(const float*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, float, float*, float*,
                       float*);

template <typename T>
RowFn<T> row_kernel(int64_t head_dim) {
#if VATTN_DISPATCH_AVX2
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (avx2)
    return head_dim == 64    ? &attend_row_avx2<T, 64>
           : head_dim == 128 ? &attend_row_avx2<T, 128>
                             : &attend_row_avx2<T, 0>;
#endif
  return head_dim == 64 ? &attend_row<T, 64> : head_dim == 128 ? &attend_row<T, 128> : &attend_row<T, 0>;
}

// ---------------------------------------------------------------------------------------
// Blocked AVX2+FMA kernel: the query vectors of several rows at once (prefill chunks), or
// of one row (decodes), over blocks of kKeyBlock keys. A token's result must not depend on
// its batch (a prompt prefilled in one chunk or several, after a prefix-cache hit or not,
// offline or served must give the same bits), so the arithmetic for one (query vector,
// key) pair and one (query vector, output element) is fixed, whatever else shares the
// work item:
//   score  = 8 lanes over head_dim (lane c accumulates d = c, c+8, ... with FMA, in
//            order), then the tree ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7));
//   block  = keys [b*kKeyBlock, ...) up to the row's causal limit; max over them (exact),
//            corr = exp(m_old - m_new), p = exp(s - m_new); the block's sum in 8 lanes
//            (lane c takes keys j = c mod 8, in order; past the limit adds +0) and the
//            same tree; l = fma(l, corr, sum); acc *= corr;
//   output = acc[d] = fma(p_j, v_j[d], acc[d]) for j in order, then acc * (1 / l).
// Register blocking (three query vectors x four keys for scores, three query vectors x 32
// elements for P.V) only decides which pairs are computed together; a query vector blocked
// with a longer row's may take extra fma(0, v, acc) steps, which leave acc unchanged.
#if defined(__GNUC__) && defined(__x86_64__)
#define VATTN_BLOCKED 1
#define VATTN_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

constexpr int64_t kMaxVectors = 64;  // query vectors (rows x heads of a group) per pass

VATTN_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
VATTN_AVX2_INLINE __m256 load8(const uint16_t* p) {  // bf16 -> fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
VATTN_AVX2_INLINE __m256 load8(const Half* p) {  // fp16 -> fp32 (exact)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// A key of zeros: stands in for the keys past the last one when scoring four at a time.
template <typename T>
const T* zeros() {
  alignas(32) static const T z[kMaxHeadDim] = {};
  return z;
}

// exp for lanes <= 0, the polynomial of exp_nonpositive with explicit FMAs.
VATTN_AVX2_INLINE __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Four dot products from their 8-lane accumulators, each reduced by the fixed tree.
VATTN_AVX2_INLINE __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// Scores of NQ (1 to 3) query vectors against 4 keys.
template <typename T, int DC, int NQ>
VATTN_AVX2_INLINE void score_4keys(const float* const* q, const T* const* k, int64_t D_runtime, float* const* s) {
  const int64_t D = DC ? DC : D_runtime;
  __m256 a[NQ][4];
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < 4; ++j) a[i][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = load8(k[j] + d);
    for (int i = 0; i < NQ; ++i) {
      const __m256 qv = _mm256_loadu_ps(q[i] + d);
      for (int j = 0; j < 4; ++j) a[i][j] = _mm256_fmadd_ps(qv, kv[j], a[i][j]);
    }
  }
  for (int i = 0; i < NQ; ++i) _mm_storeu_ps(s[i], reduce4(a[i][0], a[i][1], a[i][2], a[i][3]));
}

// acc[i][d0, d0 + 8W) += sum_j p[i][j] * v_j[d0, d0 + 8W) for NV query vectors, j in order.
template <typename T, int NV, int W>
VATTN_AVX2_INLINE void pv_block(const float* const* p, const T* v, int64_t stride_token, int64_t nb, int64_t d0,
                                float* const* acc) {
  __m256 a[NV][W];
  for (int i = 0; i < NV; ++i)
    for (int w = 0; w < W; ++w) a[i][w] = _mm256_loadu_ps(acc[i] + d0 + 8 * w);
  for (int64_t j = 0; j < nb; ++j) {
    const T* vj = v + j * stride_token + d0;
    __m256 vv[W];
    for (int w = 0; w < W; ++w) vv[w] = load8(vj + 8 * w);
    for (int i = 0; i < NV; ++i) {
      const __m256 pj = _mm256_broadcast_ss(p[i] + j);
      for (int w = 0; w < W; ++w) a[i][w] = _mm256_fmadd_ps(pj, vv[w], a[i][w]);
    }
  }
  for (int i = 0; i < NV; ++i)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(acc[i] + d0 + 8 * w, a[i][w]);
}

// nv query vectors (rows x G heads, row-major) of one sequence and KV head; row r of them
// sees keys [0, n0 + r + 1) -- n0 = context_len + first row. q: [nv][D] fp32 pre-scaled;
// out: [nv][D] fp32. Scratch: P [nv][kKeyBlock], acc [nv][D].
template <typename T, int DC>
__attribute__((target("avx2,fma,f16c"))) void attend_vectors(const float* q, int64_t nv, int64_t G, int64_t n0,
                                                        const T* k, const T* v, int64_t stride_token,
                                                        int64_t D_runtime, float softcap, float* P, float* acc,
                                                        float* out) {
  const int64_t D = DC ? DC : D_runtime;
  const int64_t rows = nv / G;
  float m[kMaxVectors], l[kMaxVectors];
  for (int64_t i = 0; i < nv; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
  std::fill(acc, acc + nv * D, 0.0f);
  const int64_t n_max = n0 + rows;  // keys seen by the last row
  for (int64_t start = 0; start < n_max; start += kKeyBlock) {
    const int64_t nb_all = std::min(kKeyBlock, n_max - start);
    // Rows whose causal limit ends before this block skip it (as they would alone).
    const int64_t first_row = std::max<int64_t>(0, start - n0);
    const int64_t i0 = first_row * G;
    // Scores, four keys at a time; keys past nb_all read zeros and are masked below.
    for (int64_t j = 0; j < nb_all; j += 4) {
      const T* kp[4];
      for (int c = 0; c < 4; ++c) kp[c] = j + c < nb_all ? k + (start + j + c) * stride_token : zeros<T>();
      for (int64_t i = i0; i < nv; i += 3) {
        const float* qp[3];
        float* sp[3];
        const int64_t n = std::min<int64_t>(3, nv - i);
        for (int64_t c = 0; c < n; ++c) {
          qp[c] = q + (i + c) * D;
          sp[c] = P + (i + c) * kKeyBlock + j;
        }
        if (n == 3) score_4keys<T, DC, 3>(qp, kp, D, sp);
        else if (n == 2) score_4keys<T, DC, 2>(qp, kp, D, sp);
        else score_4keys<T, DC, 1>(qp, kp, D, sp);
      }
    }
    // Online softmax per query vector over its own keys of the block.
    const int64_t nb_pad = (nb_all + 7) & ~int64_t(7);
    for (int64_t i = i0; i < nv; ++i) {
      const int64_t nb = std::min(kKeyBlock, n0 + i / G + 1 - start);
      float* s = P + i * kKeyBlock;
      if (softcap > 0.0f)
        for (int64_t j = 0; j < nb; ++j) s[j] = softcap * std::tanh(s[j] / softcap);
      float mb = m[i];
      for (int64_t j = 0; j < nb; ++j) mb = std::max(mb, s[j]);
      const float corr = _mm256_cvtss_f32(exp8(_mm256_set1_ps(m[i] - mb)));
      const __m256 mbv = _mm256_set1_ps(mb);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < nb_pad; j += 8) {
        const __m256 lane = _mm256_add_ps(_mm256_set1_ps(float(j)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps(float(nb)), _CMP_LT_OQ);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mbv)), keep);
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      const __m128 h = reduce4(sum, sum, sum, sum);
      l[i] = std::fma(l[i], corr, _mm_cvtss_f32(h));
      m[i] = mb;
      const __m256 cv = _mm256_set1_ps(corr);
      float* ai = acc + i * D;
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(ai + d, _mm256_mul_ps(_mm256_loadu_ps(ai + d), cv));
    }
    // P.V: three query vectors at a time, 32 output elements per pass over the block's V (12
    // accumulators); 8 at a time for a head_dim that is not a multiple of 32.
    const T* vb = v + start * stride_token;
    for (int64_t i = i0; i < nv; i += 3) {
      const int64_t n = std::min<int64_t>(3, nv - i);
      const int64_t nb = std::min(kKeyBlock, n0 + (i + n - 1) / G + 1 - start);  // the longest row of them
      const float* pp[3];
      float* ap[3];
      for (int64_t c = 0; c < n; ++c) {
        pp[c] = P + (i + c) * kKeyBlock;
        ap[c] = acc + (i + c) * D;
      }
      int64_t d0 = 0;
      for (; d0 + 32 <= D; d0 += 32) {
        if (n == 3) pv_block<T, 3, 4>(pp, vb, stride_token, nb, d0, ap);
        else if (n == 2) pv_block<T, 2, 4>(pp, vb, stride_token, nb, d0, ap);
        else pv_block<T, 1, 4>(pp, vb, stride_token, nb, d0, ap);
      }
      for (; d0 < D; d0 += 8)
        for (int64_t c = 0; c < n; ++c) pv_block<T, 1, 1>(pp + c, vb, stride_token, nb, d0, ap + c);
    }
  }
  for (int64_t i = 0; i < nv; ++i) {
    const __m256 inv = _mm256_set1_ps(1.0f / l[i]);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(out + i * D + d, _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + d), inv));
  }
}

template <typename T>
using VectorsFn = void (*)(const float*, int64_t, int64_t, int64_t, const T*, const T*, int64_t, int64_t, float,
                           float*, float*, float*);

// The blocked kernel where the CPU has AVX2+FMA and head_dim is a multiple of 8; null
// otherwise (every row then takes the one-row kernel).
template <typename T>
VectorsFn<T> vectors_kernel(int64_t head_dim) {
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  if (!avx2 || head_dim % 8 != 0) return nullptr;
  return head_dim == 64 ? &attend_vectors<T, 64> : head_dim == 128 ? &attend_vectors<T, 128> : &attend_vectors<T, 0>;
}
#else
#define VATTN_BLOCKED 0
#endif

[[noreturn]] void fail(const std::string& m) { throw std::invalid_argument("attention: " + m); }

std::string seq_text(size_t i) { return "sequence " + std::to_string(i) + ": "; }

}  // namespace

AttentionPlan::AttentionPlan(const CacheGeometry& cache, DType dtype, std::vector<int64_t> slots,
                             std::vector<int64_t> context_lens, std::vector<int64_t> query_lens, int64_t num_threads,
                             DType q_dtype)
    : cache_(cache),
      dtype_(dtype),
      q_dtype_(q_dtype),
      slots_(std::move(slots)),
      context_lens_(std::move(context_lens)),
      query_lens_(std::move(query_lens)),
      num_threads_(num_threads) {
  const CacheGeometry& c = cache_;
  if (dtype != DType::F32 && dtype != DType::BF16 && dtype != DType::F16) fail("dtype must be F32, BF16 or F16");
  if (!(q_dtype == DType::F32 || (q_dtype == DType::BF16 && dtype == DType::BF16)))
    fail("queries must be F32, or BF16 over a BF16 cache");
  if (c.num_slots < 0 || c.max_ctx < 0) fail("num_slots and max_ctx must be >= 0");
  if (c.num_kv_heads <= 0 || c.head_dim <= 0) fail("num_kv_heads and head_dim must be positive");
  if (c.head_dim > kMaxHeadDim) fail("head_dim " + std::to_string(c.head_dim) + " above 512");
  if (c.stride_slot < 0 || c.stride_token < 0 || c.stride_head < 0) fail("cache strides must be >= 0");
  if (c.num_slots > 0 && c.max_ctx > 0) {
    // The last element of a cache must be addressable: offsets below cannot overflow.
    int64_t last = checked_mul(c.num_slots - 1, c.stride_slot, "attention: cache extent");
    last = checked_add(last, checked_mul(c.max_ctx - 1, c.stride_token, "attention: cache extent"), "attention: cache extent");
    last = checked_add(last, checked_mul(c.num_kv_heads - 1, c.stride_head, "attention: cache extent"), "attention: cache extent");
    checked_mul(checked_add(last, c.head_dim, "attention: cache extent"), 4, "attention: cache extent in bytes");
  }
  if (num_threads < 1 || num_threads > kMaxThreads)
    fail("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(num_threads));
  if (slots_.size() != context_lens_.size() || slots_.size() != query_lens_.size())
    fail("slots, context_lens and query_lens must have the same length (got " + std::to_string(slots_.size()) + ", " +
         std::to_string(context_lens_.size()) + ", " + std::to_string(query_lens_.size()) + ")");
  const size_t n = slots_.size();
  token_start_.assign(n + 1, 0);
  item_start_.assign(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = slots_[i], ctx = context_lens_[i], q = query_lens_[i];
    if (s < 0 || s >= c.num_slots)
      fail(seq_text(i) + "slot " + std::to_string(s) + " outside [0, " + std::to_string(c.num_slots) + ")");
    if (ctx < 0 || q < 1)
      fail(seq_text(i) + "context_len must be >= 0 and query_len >= 1, got " + std::to_string(ctx) + " and " +
           std::to_string(q));
    // ctx + q > max_ctx, without computing ctx + q (both are non-negative here).
    if (ctx > c.max_ctx || q > c.max_ctx - ctx)
      fail(seq_text(i) + "context_len + query_len = " + std::to_string(ctx) + " + " + std::to_string(q) +
           " exceeds the cache's max context " + std::to_string(c.max_ctx));
    token_start_[i + 1] = checked_add(token_start_[i], q, "attention: sum of query_lens");
    const int64_t blocks = (q + kQueryBlock - 1) / kQueryBlock;  // q <= max_ctx: no overflow
    item_start_[i + 1] =
        checked_add(item_start_[i], checked_mul(c.num_kv_heads, blocks, "attention: work items"), "attention: work items");
  }
}

void AttentionPlan::run(const void* q, const void* k_new, const void* v_new, void* out, void* k_cache, void* v_cache,
                        int64_t num_heads, float scale, int64_t window, float softcap) const {
  const int64_t hkv = cache_.num_kv_heads;
  if (num_heads <= 0) fail("num_heads must be positive, got " + std::to_string(num_heads));
  if (num_heads % hkv != 0)
    fail("num_heads " + std::to_string(num_heads) + " is not a multiple of num_kv_heads " + std::to_string(hkv));
  if (num_heads / hkv > kMaxGroup) fail("more than 64 query heads per KV head");
  checked_mul(checked_mul(num_tokens(), num_heads, "attention: q size"), cache_.head_dim * 4, "attention: q size");
  if ((k_new == nullptr) != (v_new == nullptr)) fail("give both k_new and v_new or neither");
  if (window < 0) fail("window must be >= 0 (0: no sliding window), got " + std::to_string(window));
  if (!(softcap >= 0.0f) || std::isinf(softcap)) fail("softcap must be finite and >= 0 (0: off)");
  if (num_tokens() == 0) return;
  if (!q || !out || !k_cache || !v_cache) fail("null pointer");
  if (q_dtype_ == DType::BF16) {
    run_typed(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_new),
              static_cast<const uint16_t*>(v_new), static_cast<uint16_t*>(out), static_cast<uint16_t*>(k_cache),
              static_cast<uint16_t*>(v_cache), num_heads, scale, window, softcap);
    return;
  }
  const float* qf = static_cast<const float*>(q);
  const float* kf = static_cast<const float*>(k_new);
  const float* vf = static_cast<const float*>(v_new);
  float* of = static_cast<float*>(out);
  if (dtype_ == DType::F32)
    run_typed(qf, kf, vf, of, static_cast<float*>(k_cache), static_cast<float*>(v_cache), num_heads, scale, window,
              softcap);
  else if (dtype_ == DType::BF16)
    run_typed(qf, kf, vf, of, static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache), num_heads, scale,
              window, softcap);
  else
    run_typed(qf, kf, vf, of, static_cast<Half*>(k_cache), static_cast<Half*>(v_cache), num_heads, scale, window,
              softcap);
}

// TQ: the queries' (and new keys' and values', and the output's) element type; T: the caches'.
template <typename TQ, typename T>
void AttentionPlan::run_typed(const TQ* q, const TQ* kn, const TQ* vn, TQ* out, T* kc, T* vc, int64_t num_heads,
                              float scale, int64_t window, float softcap) const {
  const CacheGeometry& c = cache_;
  const RowFn<T> attend = row_kernel<T>(c.head_dim);
  const int64_t Hq = num_heads, Hkv = c.num_kv_heads, D = c.head_dim, G = Hq / Hkv;
  const int64_t T_total = num_tokens(), nseq = num_seqs();
  const std::vector<int64_t>& token_start = token_start_;
  const std::vector<int64_t>& item_start = item_start_;

  WorkPool& pool = WorkPool::shared();
  const int threads = int(num_threads_);
  if (kn) {
    const int64_t per_item = 256;  // small copies: split only when there are many tokens
    pool.run((T_total + per_item - 1) / per_item, threads, [&](int64_t item) {
      for (int64_t t = item * per_item; t < std::min(T_total, (item + 1) * per_item); ++t) {
        const int64_t i = std::upper_bound(token_start.begin(), token_start.end(), t) - token_start.begin() - 1;
        const int64_t pos = context_lens_[i] + (t - token_start[i]);
        const int64_t base = slots_[i] * c.stride_slot + pos * c.stride_token;
        for (int64_t h = 0; h < Hkv; ++h) {
          T* kd = kc + base + h * c.stride_head;
          T* vd = vc + base + h * c.stride_head;
          const TQ* ks = kn + (t * Hkv + h) * D;
          const TQ* vs = vn + (t * Hkv + h) * D;
          if constexpr (std::is_same_v<TQ, T>) {
            std::memcpy(kd, ks, D * sizeof(T));
            std::memcpy(vd, vs, D * sizeof(T));
          } else {  // rounded to the cache's type as stored
            for (int64_t e = 0; e < D; ++e) {
              store(kd, e, load(ks, e));
              store(vd, e, load(vs, e));
            }
          }
        }
      }
    });
  }

  // Work items: (sequence, KV head, block of query rows).
  struct Item {
    int64_t seq, head, ctx, row_begin, row_end;  // rows of the sequence's chunk
    const T* k;
    const T* v;
  };
  auto item_of = [&](int64_t it) {
    const int64_t i = std::upper_bound(item_start.begin(), item_start.end(), it) - item_start.begin() - 1;
    const int64_t local = it - item_start[i];
    const int64_t h = local % Hkv, qb = local / Hkv;
    const int64_t offset = slots_[i] * c.stride_slot + h * c.stride_head;
    return Item{i, h, context_lens_[i], qb * kQueryBlock, std::min(query_lens_[i], (qb + 1) * kQueryBlock),
                kc + offset, vc + offset};
  };
#if VATTN_BLOCKED
  if (const VectorsFn<T> blocked = vectors_kernel<T>(D)) {
    const int64_t rows_per_pass = std::max<int64_t>(1, kMaxVectors / G);
    pool.run(item_start[nseq], threads, [&](int64_t it) {
      thread_local std::vector<float> buf;
      buf.resize(kMaxVectors * (kKeyBlock + 3 * D));
      float* qv = buf.data();
      float* P = qv + kMaxVectors * D;
      float* acc = P + kMaxVectors * kKeyBlock;
      float* ov = acc + kMaxVectors * D;
      const Item w = item_of(it);
      // A row whose window cuts keys off runs alone over its own keys: its result stays
      // what it would be in any other batch (rows that see all keys are batch-invariant anyway).
      const int64_t pass = window > 0 && w.ctx + w.row_end > window ? 1 : rows_per_pass;
      for (int64_t r0 = w.row_begin; r0 < w.row_end; r0 += pass) {
        const int64_t rows = std::min(pass, w.row_end - r0);
        for (int64_t r = 0; r < rows; ++r) {
          const TQ* qt = q + ((token_start[w.seq] + r0 + r) * Hq + w.head * G) * D;
          for (int64_t e = 0; e < G * D; ++e) qv[r * G * D + e] = load(qt, e) * scale;
        }
        const int64_t first = window > 0 ? std::max<int64_t>(0, w.ctx + r0 + 1 - window) : 0;  // rows == 1 here
        blocked(qv, rows * G, G, w.ctx + r0 - first, w.k + first * c.stride_token, w.v + first * c.stride_token,
                c.stride_token, D, softcap, P, acc, ov);
        for (int64_t r = 0; r < rows; ++r) {
          TQ* ot = out + ((token_start[w.seq] + r0 + r) * Hq + w.head * G) * D;
          for (int64_t e = 0; e < G * D; ++e) store(ot, e, ov[r * G * D + e]);
        }
      }
    });
    return;
  }
#endif
  pool.run(item_start[nseq], threads, [&](int64_t it) {
    thread_local std::vector<float> buf;
    buf.resize(G * kKeyBlock + 3 * G * D);
    float* scores = buf.data();
    float* acc = scores + G * kKeyBlock;
    float* qrow = acc + G * D;
    float* orow = qrow + G * D;
    const Item w = item_of(it);
    for (int64_t r = w.row_begin; r < w.row_end; ++r) {
      const int64_t t = token_start[w.seq] + r;
      const TQ* qt = q + (t * Hq + w.head * G) * D;
      for (int64_t e = 0; e < G * D; ++e) qrow[e] = load(qt, e) * scale;
      // Causal: the query at position ctx + r sees keys 0 .. ctx + r (the last `window` of them).
      const int64_t first = window > 0 ? std::max<int64_t>(0, w.ctx + r + 1 - window) : 0;
      attend(qrow, w.k + first * c.stride_token, w.v + first * c.stride_token, c.stride_token, w.ctx + r + 1 - first,
             G, D, softcap, scores, acc, orow);
      TQ* ot = out + (t * Hq + w.head * G) * D;
      for (int64_t e = 0; e < G * D; ++e) store(ot, e, orow[e]);
    }
  });
}

}  // namespace vattn
