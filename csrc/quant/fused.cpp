// The elementwise neighbours of the quantized linear layers, fused into its call on the
// decode path (qlinear_fused in qgemm.cpp): RMSNorm and the MLP's silu(gate) * up applied to
// a row just before it is quantized, the residual add applied to the output panels a
// thread has just written, and RoPE in place on the q/k heads of the fused qkv output.
// Every operation is per row, so a token's result never depends on its batch.
//
// Each gives the bits of the torch ops it replaces, so no FMA contraction here beyond the
// explicit std::fma calls (RoPE: two products, then one rounding add; the build may target
// FMA: -march=native, or the AVX2 clone below).
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "qgemm.h"

namespace sqk {
namespace {

// exp(x) as torch's vectorised CPU exp computes it (SLEEF's expf_u10 with FMA, the
// Vectorized<float>::exp of the AVX2 and AVX-512 builds), so SiLU here gives F.silu's bits:
// q = rint(x / ln 2), a two-part reduction, a degree-6 polynomial, then 2^q in two halves.
inline float pow2i(int32_t q) {
  const int32_t bits = (q + 0x7f) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float exp_sleef(float d) {
  const float qf = std::nearbyint(d * 1.442695040888963407359924681001892137426645954152985934135449406931f);
  const int32_t q = int32_t(qf);
  float s = std::fma(qf, -0.693145751953125f, d);
  s = std::fma(qf, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = std::fma(u, s, 0.00139304355252534151077271f);
  u = std::fma(u, s, 0.00833336077630519866943359f);
  u = std::fma(u, s, 0.0416664853692054748535156f);
  u = std::fma(u, s, 0.166666671633720397949219f);
  u = std::fma(u, s, 0.5f);
  u = 1.0f + std::fma(s * s, u, s);
  u = u * pow2i(q >> 1) * pow2i(q - (q >> 1));
  u = d < -104.0f ? 0.0f : u;
  return 100.0f < d ? INFINITY : u;
}

// torch's silu: x / (1 + exp(-x)).
inline float silu(float x) { return x / (1.0f + exp_sleef(-x)); }

// sum(v[0..K)) in the order torch's CPU sum adds a contiguous row (ATen SumKernel.cpp:
// vectorized_inner_sum -> row_sum -> multi_row_sum, for vectors of L lanes): four vector
// accumulators over groups of four vectors with a cascade of levels, the leftover vectors into
// the first, the four summed in order, then the scalar tail and the lanes added one by one.
constexpr int kMaxLanes = 16;

float torch_row_sum(const float* v, int64_t K, int L) {
  const int64_t nvec = K / L, size = nvec / 4;  // size: groups of four vectors
  int ceil_log2 = 0;
  while ((int64_t(1) << ceil_log2) < size) ++ceil_log2;
  const int level_power = std::max(4, ceil_log2 / 4);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  float acc[4][4][kMaxLanes] = {};
  auto add_group = [&](float(*a)[kMaxLanes], int64_t g) {
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < L; ++l) a[k][l] += v[(g * 4 + k) * L + l];
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_group(acc[0], i);
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < L; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_group(acc[0], i);
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += acc[j][k][l];
  float* part = acc[0][0];
  for (int64_t t = size * 4; t < nvec; ++t)
    for (int l = 0; l < L; ++l) part[l] += v[t * L + l];
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < L; ++l) part[l] += acc[0][k][l];
  float total = 0.0f;
  for (int64_t t = nvec * L; t < K; ++t) total += v[t];
  for (int l = 0; l < L; ++l) total += part[l];
  return total;
}

// One row of torch.rms_norm (unit_offset: Gemma's RMSNorm, x * r * (1 + w)); o doubles as
// the scratch for the squares.
inline void rms_norm_row(const float* xr, int64_t K, const float* w, float eps, bool unit_offset, int lanes,
                         float* o) {
  for (int64_t k = 0; k < K; ++k) o[k] = xr[k] * xr[k];
  const float r = 1.0f / std::sqrt(torch_row_sum(o, K, lanes) / float(K) + eps);
  if (unit_offset) {
    for (int64_t k = 0; k < K; ++k) o[k] = (xr[k] * r) * (1.0f + w[k]);
  } else {
    for (int64_t k = 0; k < K; ++k) o[k] = (xr[k] * r) * w[k];
  }
}

// Inlined into both entry points below, so each is compiled for its own target.
inline __attribute__((always_inline)) void pre_rows_body(const PreOp& pre, const float* x, int64_t ldx, int64_t K,
                                                         int64_t m0, int64_t m1, float* out) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    float* o = out + m * K;
    if (pre.kind == PreOp::RmsNorm) {
      rms_norm_row(xr, K, pre.norm_w, pre.eps, pre.unit_offset, pre.lanes, o);
      continue;
    }
    const float* up = xr + K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) o[k] = silu(xr[k]) * up[k];
  }
}

void pre_rows_base(const PreOp& pre, const float* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, float* out) {
  pre_rows_body(pre, x, ldx, K, m0, m1, out);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void pre_rows_avx2(const PreOp& pre, const float* x, int64_t ldx, int64_t K,
                                                       int64_t m0, int64_t m1, float* out) {
  pre_rows_body(pre, x, ldx, K, m0, m1, out);
}

bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

}  // namespace

void apply_pre(const PreOp& pre, const float* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, float* out) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (has_avx2()) return pre_rows_avx2(pre, x, ldx, K, m0, m1, out);
#endif
  pre_rows_base(pre, x, ldx, K, m0, m1, out);
}

void rms_norm_torch(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float eps, bool unit_offset,
                    int lanes, float* out, int64_t ldo) {
  for (int64_t m = 0; m < M; ++m) rms_norm_row(x + m * ldx, K, w, eps, unit_offset, lanes, out + m * ldo);
}

void add_residual(const float* res, int64_t ldr, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = res + m * ldr;
    float* yr = y + m * ldy;
#pragma omp simd
    for (int64_t n = n0; n < n1; ++n) yr[n] = r[n] + yr[n];
  }
}

void rope_inplace(float* x, int64_t T, int64_t H, int64_t st, int64_t sh, const float* cos, const float* sin,
                  int64_t half) {
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < H; ++h) {
      float* x1 = x + t * st + h * sh;
      float* x2 = x1 + half;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = x1[i], b = x2[i];
        const float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
        x1[i] = ac - bs;
        x2[i] = bc + as;
      }
    }
  }
}

}  // namespace sqk
