// Exact optimal-sampling math over the full vocabulary, one row per (sequence, step):
// α* with KL(q_α‖π_θ) = KL(q_α‖π_t) for q_α ∝ π_θ^(1−α) π_t^α, and the diagnostics at the
// α used. Float64 throughout. See sarathi/optimal_sampling/native.py for the contract.
//
// Each row is computed by one thread, in one fixed order, whatever the batch and thread
// count: the same logits give the same bits in any batch. α* is found by Newton steps inside a
// bisection bracket (~3 passes over the vocabulary instead of bisection's ~22), then reported on
// the grid of the largest power of two <= tol, as bisection's result is: the model's logits
// themselves can differ in their last bits between two batchings (matmul blocking), and a
// continuous α* would carry that noise into alpha_history (another replica, a retried request).
#include "optimal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "work_pool.h"

namespace osk {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Everything a row does is inlined into two copies of it, one compiled for AVX2 + FMA (picked
// at run time where the CPU has them) and one for the build's baseline. The loops over the
// vocabulary are written with 4-double GCC vectors: one ymm register in the first copy, two
// xmm in the second; lane k takes the tokens y = k mod 4, in order, and lanes are summed as
// (l0 + l1) + (l2 + l3).
#define OSK_INLINE inline __attribute__((always_inline))

typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));  // lane masks: -1 true, 0 false
typedef float v4f __attribute__((vector_size(16)));

OSK_INLINE v4d splat(double x) { return v4d{x, x, x, x}; }
OSK_INLINE v4l finite(v4d x) { return (x - x) == splat(0.0); }  // false for ±inf and NaN
OSK_INLINE v4d sel(v4l m, v4d a, v4d b) { return m ? a : b; }
OSK_INLINE v4d vmax(v4d a, v4d b) { return a > b ? a : b; }
OSK_INLINE v4d vmin(v4d a, v4d b) { return a < b ? a : b; }
OSK_INLINE double hsum(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }
OSK_INLINE double hmax(v4d v) { return std::max(std::max(v[0], v[1]), std::max(v[2], v[3])); }

// exp(x) for finite x: clamped to [-708, 709] (no overflow, no subnormals); n = round(x / ln 2)
// by the 1.5 * 2^52 trick (which also leaves n's integer bits in the low mantissa), r = x − n ln 2
// in two parts, the degree-12 Taylor polynomial on |r| <= ln2 / 2 (relative error ~2e-16),
// times 2^n built in the exponent field.
OSK_INLINE v4d exp4(v4d x) {
  const double magic = 6755399441055744.0;  // 2^52 + 2^51
  x = vmax(vmin(x, splat(709.0)), splat(-708.0));
  const v4d t = x * 1.4426950408889634 + magic;
  const v4d n = t - magic;
  const v4d r = (x - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
  v4d p = splat(1.0 / 479001600.0);
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const v4l e = ((v4l)t - int64_t(0x4338000000000000LL) + 1023) << 52;
  return p * (v4d)e;
}

// Four values of a row from y on, as doubles; lanes past the vocabulary read -inf (outside
// every support).
OSK_INLINE v4d load4(const float* x, int64_t y, int64_t V) {
  if (y + 4 <= V) {
    v4f f;
    std::memcpy(&f, x + y, sizeof f);
    return __builtin_convertvector(f, v4d);
  }
  v4d r = splat(-kInf);
  for (int64_t k = 0; y + k < V; ++k) r[k] = x[y + k];
  return r;
}

// Which tokens q lives on: π_θ's support (α = 0), π_t's (α = 1), or the common one.
enum class Support { Theta, Target, Both };

struct Sums {
  double s0 = 0, s1 = 0, s2 = 0;  // Σ e, Σ e·d, Σ e·d² with e = exp(m − shift)
};

struct Row {
  const float* a;  // log π_θ [V] as given (float32, normalised to float32 precision)
  const float* b;  // log π_t  [V]
  int64_t V;
  double za = 0, zb = 0;  // log Σ exp: a − za and b − zb are normalised in float64
  double max_a = -kInf, max_b = -kInf;  // of a − za and b − zb over the common support
  bool any_common = false, identical = true;

  // f(a, b) for every 4 tokens, a and b the normalised log-probabilities.
  template <typename F>
  OSK_INLINE void each(F&& f) const {
    const v4d za4 = splat(za), zb4 = splat(zb);
    for (int64_t y = 0; y < V; y += 4) f(load4(a, y, V) - za4, load4(b, y, V) - zb4);
  }
};

// log Σ exp(x) over the finite x, given their maximum.
OSK_INLINE double log_sum_exp(const float* x, int64_t V, double max) {
  v4d s = splat(0.0);
  const v4d m = splat(max);
  for (int64_t y = 0; y < V; y += 4) {
    const v4d v = load4(x, y, V);
    const v4l keep = finite(v);
    s += sel(keep, exp4(sel(keep, v - m, splat(0.0))), splat(0.0));
  }
  return max + std::log(hsum(s));
}

OSK_INLINE void scan(Row& r) {
  const v4d ninf = splat(-kInf);
  v4d ma = ninf, mb = ninf, fa = ninf, fb = ninf;
  v4l any = v4l{0, 0, 0, 0}, differ = any;
  r.each([&](v4d a, v4d b) {  // za = zb = 0 still: the raw values
    const v4l ok_a = finite(a), ok_b = finite(b), both = ok_a & ok_b;
    differ |= (a != b) & ~((a != a) & (b != b));
    fa = vmax(fa, sel(ok_a, a, ninf));
    fb = vmax(fb, sel(ok_b, b, ninf));
    any |= both;
    ma = vmax(ma, sel(both, a, ninf));
    mb = vmax(mb, sel(both, b, ninf));
  });
  const double max_fa = hmax(fa), max_fb = hmax(fb);
  r.za = max_fa > -kInf ? log_sum_exp(r.a, r.V, max_fa) : 0.0;
  r.zb = max_fb > -kInf ? log_sum_exp(r.b, r.V, max_fb) : 0.0;
  r.max_a = hmax(ma) - r.za;
  r.max_b = hmax(mb) - r.zb;
  r.any_common = (any[0] | any[1] | any[2] | any[3]) != 0;
  r.identical = (differ[0] | differ[1] | differ[2] | differ[3]) == 0;
}

// The sums at α over the common support, shifted by `shift` ≥ every m_y = a_y + α·d_y.
OSK_INLINE Sums sums_at(const Row& r, double alpha, double shift) {
  v4d s0 = splat(0.0), s1 = s0, s2 = s0;
  const v4d zero = s0;
  r.each([&](v4d a, v4d b) {
    const v4l keep = finite(a) & finite(b);
    const v4d d = sel(keep, b - a, zero);
    const v4d e = sel(keep, exp4(sel(keep, a + alpha * d - shift, zero)), zero);
    s0 += e;
    s1 += e * d;
    s2 += e * d * d;
  });
  return {hsum(s0), hsum(s1), hsum(s2)};
}

// The exact maximum of m_y over the common support.
OSK_INLINE double max_mix(const Row& r, double alpha) {
  v4d m = splat(-kInf);
  r.each([&](v4d a, v4d b) { m = vmax(m, sel(finite(a) & finite(b), a + alpha * (b - a), splat(-kInf))); });
  return hmax(m);
}

// (1 − α)·max a + α·max b bounds every m_y from above, so no exp overflows; only if that bound
// is so loose that every exp underflowed does the exact maximum take its place.
OSK_INLINE Sums eval(const Row& r, double alpha) {
  Sums s = sums_at(r, alpha, (1.0 - alpha) * r.max_a + alpha * r.max_b);
  if (!(s.s0 > 1e-280)) s = sums_at(r, alpha, max_mix(r, alpha));
  return s;
}

// α* by Newton steps inside a bisection bracket. Δ(α) = s1/s0 is non-decreasing with slope
// Var_q[d] = s2/s0 − (s1/s0)²; Δ(0) ≤ 0 ≤ Δ(1).
OSK_INLINE double solve(const Row& r, double tol, int max_iter) {
  double lo = 0.0, hi = 1.0, x = 0.5;
  for (int it = 0; it < max_iter; ++it) {
    const Sums s = eval(r, x);
    const double gap = s.s1 / s.s0;
    if (gap == 0.0) return x;
    if (gap < 0) lo = x;
    else hi = x;
    const double slope = s.s2 / s.s0 - gap * gap;
    double next = slope > 0 ? x - gap / slope : std::nan("");
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    const double step = std::fabs(next - x);
    x = next;
    if (step <= 1e-3 * tol || hi - lo <= tol) break;
  }
  return x;
}

// Diagnostics of q_α: Σ q·(lq − a), Σ q·(lq − b), −Σ q·lq, Σ q²/π_θ, Σ q²/π_t. A token
// outside q's support or with q = 0 adds nothing; one where q > 0 and a model rules it out
// makes that model's sums infinite.
template <Support S>
OSK_INLINE v4l in_support(v4d a, v4d b) {
  return S == Support::Theta ? finite(a) : S == Support::Target ? finite(b) : finite(a) & finite(b);
}
template <Support S>
OSK_INLINE v4d mix(v4d a, v4d b, double alpha) {
  return S == Support::Theta ? a : S == Support::Target ? b : a + alpha * (b - a);
}

constexpr int64_t kBlock = 64;  // tokens per block of q's mass, for the inverse-CDF draw

// log q_α for 4 tokens (-1000 outside the support: exp gives 0 there) and q itself.
template <Support S>
OSK_INLINE v4d log_q4(v4d a, v4d b, double alpha, double log_z) {
  return sel(in_support<S>(a, b), mix<S>(a, b, alpha) - log_z, splat(-1000.0));
}
OSK_INLINE v4d q_of(v4d lq) { return sel(lq > -708.0, exp4(lq), splat(0.0)); }

// Diagnostics of q_α: Σ q·(lq − a), Σ q·(lq − b), −Σ q·lq, Σ q²/π_θ, Σ q²/π_t. A token
// outside q's support or with q = 0 adds nothing; one where q > 0 and a model rules it out
// makes that model's sums infinite. Also q's mass per block of kBlock tokens (into blocks)
// for the draw; returns log Z (q = exp(mix − log Z)).
template <Support S>
OSK_INLINE double diagnose(const Row& r, double alpha, double* out, double* blocks) {
  const v4d zero = splat(0.0), ninf = splat(-kInf), inf = splat(kInf);
  v4d shift4 = ninf;
  r.each([&](v4d a, v4d b) { shift4 = vmax(shift4, sel(in_support<S>(a, b), mix<S>(a, b, alpha), ninf)); });
  const double shift = hmax(shift4);
  v4d z = zero;
  r.each([&](v4d a, v4d b) {
    const v4l keep = in_support<S>(a, b);
    z += sel(keep, exp4(sel(keep, mix<S>(a, b, alpha) - shift, zero)), zero);
  });
  const double log_z = shift + std::log(hsum(z));
  v4d kl_a = zero, kl_b = zero, ent = zero, sec_a = zero, sec_b = zero, block = zero;
  const v4d za4 = splat(r.za), zb4 = splat(r.zb);
  for (int64_t y = 0; y < r.V; y += 4) {
    const v4d a = load4(r.a, y, r.V) - za4, b = load4(r.b, y, r.V) - zb4;
    const v4l fa = finite(a), fb = finite(b);
    const v4d lq = log_q4<S>(a, b, alpha, log_z);
    const v4d q = q_of(lq);
    const v4l pos = q > zero;
    const v4d ra = sel(fa, lq - a, zero), rb = sel(fb, lq - b, zero);
    kl_a += sel(pos, sel(fa, q * ra, inf), zero);
    kl_b += sel(pos, sel(fb, q * rb, inf), zero);
    ent -= sel(pos, q * lq, zero);
    sec_a += sel(pos, sel(fa, q * exp4(ra), inf), zero);
    sec_b += sel(pos, sel(fb, q * exp4(rb), inf), zero);
    block += q;
    if ((y + 4) % kBlock == 0 || y + 4 >= r.V) {
      blocks[y / kBlock] = hsum(block);
      block = zero;
    }
  }
  out[0] = hsum(kl_a);
  out[1] = hsum(kl_b);
  out[2] = hsum(ent);
  out[3] = hsum(sec_a);
  out[4] = hsum(sec_b);
  return log_z;
}

// The inverse-CDF draw at u in [0, 1): the block where the running mass passes u · total,
// then the token inside it (blocks and tokens in vocabulary order), with its log q. Never a
// token with q = 0.
template <Support S>
OSK_INLINE void draw(const Row& r, double alpha, double log_z, const double* blocks, double u, int64_t* token,
                     double* logq) {
  const int64_t nb = (r.V + kBlock - 1) / kBlock;
  double total = 0;
  for (int64_t k = 0; k < nb; ++k) total += blocks[k];
  const double target = u * total;
  double cum = 0;
  int64_t k = 0;
  while (k + 1 < nb && !(cum + blocks[k] > target)) cum += blocks[k++];
  int64_t last = -1;
  double last_lq = 0;
  for (int64_t kk = k; kk < nb && last < 0; ++kk) {  // the block found, else (rounding) the next ones
    for (int64_t y = kk * kBlock; y < std::min(r.V, (kk + 1) * kBlock); y += 4) {
      const v4d lq = log_q4<S>(load4(r.a, y, r.V) - splat(r.za), load4(r.b, y, r.V) - splat(r.zb), alpha, log_z);
      const v4d q = q_of(lq);
      for (int l = 0; l < 4 && y + l < r.V; ++l) {
        if (!(q[l] > 0)) continue;
        last = y + l;
        last_lq = lq[l];
        if (cum + q[l] > target) {
          *token = last;
          *logq = last_lq;
          return;
        }
        cum += q[l];
      }
    }
  }
  if (last < 0)  // rounding left target past every token: the last one with mass
    for (int64_t y = 0; y < r.V; y += 4) {
      const v4d lq = log_q4<S>(load4(r.a, y, r.V) - splat(r.za), load4(r.b, y, r.V) - splat(r.zb), alpha, log_z);
      const v4d q = q_of(lq);
      for (int l = 0; l < 4 && y + l < r.V; ++l)
        if (q[l] > 0) {
          last = y + l;
          last_lq = lq[l];
        }
    }
  *token = last;
  *logq = last_lq;
}

// One row: α (NaN: solve, written back), its diagnostics and, where u is not NaN, a token.
struct RowArgs {
  const float* a;
  const float* b;
  int64_t vocab;
  double* alpha;
  double tol;
  int max_iter;
  double* diag;
  double u;
  int64_t* token;
  double* logq;
  double* blocks;  // scratch: one double per kBlock tokens
};

template <Support S>
OSK_INLINE void finish(const Row& r, double a, const RowArgs& x) {
  const double log_z = diagnose<S>(r, a, x.diag, x.blocks);
  if (!std::isnan(x.u)) draw<S>(r, a, log_z, x.blocks, x.u, x.token, x.logq);
}

OSK_INLINE void row_body(const RowArgs& x) {
  Row r{x.a, x.b, x.vocab};
  scan(r);
  double a = *x.alpha;
  x.diag[5] = r.any_common ? 0.0 : 1.0;
  *x.token = -1;
  *x.logq = std::nan("");
  if (std::isnan(a)) {
    if (!r.any_common || r.identical) a = 0.5;  // Δ ≡ 0 or no geometric mixture: by symmetry
    else {
      int e = 0;
      std::frexp(x.tol, &e);
      const double grid = std::ldexp(1.0, e - 1);  // tol = m 2^e, m in [0.5, 1): grid <= tol
      a = std::min(1.0, std::max(0.0, std::nearbyint(solve(r, x.tol, x.max_iter) / grid) * grid));
    }
    *x.alpha = a;
  }
  const Support sup = a <= 0.0 ? Support::Theta : a >= 1.0 ? Support::Target : Support::Both;
  if (sup == Support::Both && !r.any_common) {
    for (int k = 0; k < 5; ++k) x.diag[k] = std::nan("");  // the caller's arithmetic-mixture case
    return;
  }
  if (sup == Support::Theta) finish<Support::Theta>(r, a, x);
  else if (sup == Support::Target) finish<Support::Target>(r, a, x);
  else finish<Support::Both>(r, a, x);
}

using RowFn = void (*)(const RowArgs&);

void row_generic(const RowArgs& x) { row_body(x); }

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void row_avx2(const RowArgs& x) { row_body(x); }
#endif

RowFn row_kernel() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (avx2) return &row_avx2;
#endif
  return &row_generic;
}

[[noreturn]] void fail(const std::string& m) { throw std::invalid_argument("optimal_rows: " + m); }

}  // namespace

void optimal_rows(const float* logits_theta, const float* logits_t, int64_t rows, int64_t vocab, int64_t ld,
                  double* alpha, const double* tol, double* diag, const double* u, int64_t* token, double* logq,
                  int max_iter, int threads) {
  if (rows < 0 || vocab < 1) fail("need rows >= 0 and vocab >= 1");
  if (ld < vocab) fail("row stride " + std::to_string(ld) + " below the vocabulary size " + std::to_string(vocab));
  if (max_iter < 1) fail("max_iter must be >= 1");
  if (threads < 1) fail("threads must be >= 1");
  for (int64_t i = 0; i < rows; ++i) {
    const double a = alpha[i];
    if (!std::isnan(a) && !(a >= 0.0 && a <= 1.0)) fail("alpha " + std::to_string(a) + " outside [0, 1]");
    if (std::isnan(a) && !(tol[i] > 0.0)) fail("tol must be positive");
    if (!std::isnan(u[i]) && !(u[i] >= 0.0 && u[i] < 1.0)) fail("u must be in [0, 1) or NaN");
  }
  if (rows == 0) return;
  const RowFn row = row_kernel();
  vattn::WorkPool::shared().run(rows, threads, [&](int64_t i) {
    thread_local std::vector<double> blocks;
    blocks.resize((vocab + kBlock - 1) / kBlock);
    row({logits_theta + i * ld, logits_t + i * ld, vocab, alpha + i, tol[i], max_iter, diag + i * kDiagFields, u[i],
         token + i, logq + i, blocks.data()});
  });
}

}  // namespace osk
