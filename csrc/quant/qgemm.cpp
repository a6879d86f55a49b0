// Dispatch, activation-quantization reference, the portable scalar kernel and the
// threaded driver of the quantized linear layer.
#include "qgemm.h"

#include <algorithm>
#include <ctime>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "checked.h"
#include "work_pool.h"

namespace sqk {

using vattn::checked_add;
using vattn::checked_mul;

// ---------------------------------------------------------------- ISA selection

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512vnni";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512vnni") return Isa::Avx512Vnni;
  throw std::invalid_argument("unknown quantized-kernel ISA '" + name + "' (expected scalar, avx2 or avx512vnni)");
}

Isa best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return Isa::Avx512Vnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return best;
#else
  return Isa::Scalar;
#endif
}

Isa default_isa() {
  const char* env = std::getenv("SARATHI_QUANT_ISA");
  if (!env || !*env) return best_isa();
  const Isa want = parse_isa(env);  // an unknown name is an error, not silently ignored
  return std::min(want, best_isa());
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= int(best_isa()); ++i) out.push_back(isa_name(Isa(i)));
  return out;
}

// ---------------------------------------------------------------- scalar pieces

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while (!(m & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (m & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

inline float load_scale(const uint8_t* p, int j, bool half) {
  if (half) {
    uint16_t h;
    std::memcpy(&h, p + 2 * j, 2);
    return half_to_float(h);
  }
  float f;
  std::memcpy(&f, p + 4 * j, 4);
  return f;
}

void quantize_scalar(const float* x, int64_t ldx, const Ctx& c, int64_t m0, int64_t m1) {
  const int B = c.fmt.block;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    for (int64_t b = 0; b < c.nb; ++b) {
      const int n = int(std::clamp<int64_t>(c.K - b * B, 0, B));  // k_super pads K to 256: whole blocks past K
      int32_t sum = 0;
      int8_t* q = const_cast<int8_t*>(c.xq) + m * c.Kp + b * B;
      const float d = quantize_block_ref(xr + b * B, n, B, q, &sum);
      const_cast<float*>(c.xd)[m * c.nb + b] = d;
      const_cast<float*>(c.xs)[m * c.nb + b] = d * float(sum);
      const_cast<int32_t*>(c.xc)[m * c.nb + b] = -128 * sum;
    }
  }
}

// One panel of 16 columns for all rows, straight from the packed layout.
void gemm_scalar(const Ctx& c, int64_t p0, int64_t p1) {
  const WeightFormat& f = c.fmt;
  const int B = f.block, G = B / 4;
  const int64_t rec = f.record(), qb = f.qbytes();
  int32_t wq[kPanel][32];
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* wp = c.w + p * c.nb * rec;
    const int64_t ncols = std::min<int64_t>(kPanel, c.N - p * kPanel);
    for (int64_t m = 0; m < c.M; ++m) {
      float acc[kPanel] = {};
      const int8_t* xr = c.xq + m * c.Kp;
      for (int64_t b = 0; b < c.nb; ++b) {
        const uint8_t* r = wp + b * rec;
        // Unpack the block's weights to wq[j][k] (logical q; bits 8 back to signed).
        for (int g = 0; g < G; ++g)
          for (int j = 0; j < kPanel; ++j)
            for (int t = 0; t < 4; ++t) {
              if (f.bits == 8) {
                wq[j][4 * g + t] = int32_t(r[g * 64 + j * 4 + t]) - 128;
              } else {
                const uint8_t byte = r[(g % (G / 2)) * 64 + j * 4 + t];
                wq[j][4 * g + t] = g < G / 2 ? (byte & 15) : (byte >> 4);
              }
            }
        const float dx = c.xd[m * c.nb + b], sx = c.xs[m * c.nb + b];
        const int8_t* xb = xr + b * B;
        for (int j = 0; j < kPanel; ++j) {
          int32_t s = 0;
          for (int k = 0; k < B; ++k) s += wq[j][k] * int32_t(xb[k]);
          const float dw = load_scale(r + qb, j, f.half_scales);
          acc[j] += float(s) * (dw * dx);
          if (f.has_min) {
            const uint8_t* mp = r + qb + kPanel * f.scale_bytes();
            const float mw = f.implied_min ? dw * -8.f
                             : f.int_min   ? -(dw * float(int8_t(mp[j])))
                                           : load_scale(mp, j, f.half_scales);
            acc[j] += mw * sx;
          }
        }
      }
      float* yr = c.y + m * c.ldy + p * kPanel;
      for (int64_t j = 0; j < ncols; ++j) yr[j] = acc[j] + (c.bias ? c.bias[p * kPanel + j] : 0.f);
    }
  }
}

}  // namespace

float quantize_block_ref(const float* x, int n, int B, int8_t* q, int32_t* sum) {
  float amax = 0.f;
  bool finite = true;
  for (int i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  *sum = 0;
  if (!finite || amax < 0x1p-96f) {
    std::memset(q, 0, size_t(B));
    return finite ? 0.f : std::nanf("");
  }
  const float d = amax / 127.f, id = 127.f / amax;
  int32_t s = 0;
  for (int i = 0; i < n; ++i) {
    const int v = int(std::nearbyint(x[i] * id));  // |x * id| <= 127 (+ rounding): no clamp needed
    q[i] = int8_t(v);
    s += v;
  }
  for (int i = n; i < B; ++i) q[i] = 0;
  *sum = s;
  return d;
}

Kernels scalar_kernels(const WeightFormat&) { return Kernels{quantize_scalar, gemm_scalar, 1, 0}; }

Kernels plain_kernels(const WeightFormat& f, Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return avx512_kernels(f);
    case Isa::Avx2: return avx2_kernels(f);
    default: return scalar_kernels(f);
  }
}

// ---------------------------------------------------------------- driver

namespace {

struct Scratch {
  std::vector<uint8_t> buf;
  uint8_t* get(size_t n) {
    if (buf.size() < n) {
      buf.clear();
      buf.shrink_to_fit();
      buf.resize(n);
    }
    return buf.data();
  }
  void release() {
    buf.clear();
    buf.shrink_to_fit();
  }
};

inline size_t align64(int64_t n) { return size_t((n + 63) & ~int64_t(63)); }

}  // namespace

void qlinear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t w_nbytes, int64_t N,
             const WeightFormat& fmt, const float* bias, float* y, int64_t ldy, int threads, Isa isa) {
  qlinear_fused(x, M, K, ldx, w, w_nbytes, N, fmt, bias, PreOp{}, nullptr, 0, y, ldy, threads, isa);
}

void qlinear_fused(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t w_nbytes,
                   int64_t N, const WeightFormat& fmt, const float* bias, const PreOp& pre, const float* res,
                   int64_t ldr, float* y, int64_t ldy, int threads, Isa isa) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("qlinear: " + msg); };
  if (fmt.bits < 4 || fmt.bits > 8 || fmt.bits == 7) fail("bits must be 4, 5, 6 or 8, got " + std::to_string(fmt.bits));
  if (fmt.block != 16 && fmt.block != 32) fail("block must be 16 or 32, got " + std::to_string(fmt.block));
  if (fmt.bits == 5 && (fmt.block != 32 || (fmt.has_min && !fmt.k_super)))
    fail("bits 5 (GGUF Q5_0, Q5_K) needs block 32 and no min outside K-quant super-blocks");
  if (fmt.bits == 6 && (fmt.block != 16 || fmt.has_min)) fail("bits 6 (GGUF Q6_K) needs block 16 and no min");
  if (fmt.k_super && !(fmt.half_scales && ((fmt.bits == 6 && !fmt.has_min) ||
                                           ((fmt.bits == 4 || fmt.bits == 5) && fmt.block == 32 && fmt.stored_min()))))
    fail("K-quant super-blocks are Q6_K (bits 6, block 16) or Q4_K / Q5_K (bits 4 / 5, block 32, min), fp16 "
         "super-scales");
  if (fmt.implied_min && (fmt.bits != 4 || !fmt.has_min)) fail("an implied min (-8 * scale) needs bits 4 and has_min");
  if (fmt.int_min && (!fmt.has_min || fmt.implied_min)) fail("int8 min multipliers need has_min (and no implied min)");
  if (M < 0) fail("M must be >= 0, got " + std::to_string(M));
  if (K < 1 || N < 1) fail("K and N must be >= 1, got K=" + std::to_string(K) + " N=" + std::to_string(N));
  const int64_t x_width = pre.kind == PreOp::SiluMul ? checked_mul(K, 2, "qlinear: K") : K;
  if (ldx < x_width) fail("x row stride " + std::to_string(ldx) + " < " + std::to_string(x_width));
  if (pre.kind == PreOp::RmsNorm && (!pre.norm_w || (pre.lanes != 8 && pre.lanes != 16)))
    fail("RMSNorm needs a weight and 8 or 16 lanes");
  if (res && ldr < N) fail("residual row stride " + std::to_string(ldr) + " < N " + std::to_string(N));
  if (ldy < N) fail("out row stride " + std::to_string(ldy) + " < N " + std::to_string(N));
  if (int(isa) > int(best_isa())) fail(std::string("ISA ") + isa_name(isa) + " is not supported by this CPU");
  const int64_t nrec = checked_add(K, fmt.elems() - 1, "qlinear: K") / fmt.elems();
  const int64_t nb = nrec * (fmt.elems() / fmt.block);  // activation blocks
  const int64_t panels = checked_add(N, kPanel - 1, "qlinear: N") / kPanel;
  const int64_t want = checked_mul(checked_mul(panels, nrec, "qlinear: weight size"), fmt.record(), "qlinear: weight size");
  if (w_nbytes != want)
    fail("packed weight has " + std::to_string(w_nbytes) + " bytes, the format needs " + std::to_string(want));
  if (M == 0) return;
  if (!x || !w || !y) fail("null pointer");
  // Every x and y element addressed must fit in int64 (the caller owns the memory).
  checked_add(checked_mul(M - 1, ldx, "qlinear: x size"), x_width, "qlinear: x size");
  if (res) checked_add(checked_mul(M - 1, ldr, "qlinear: residual size"), N, "qlinear: residual size");
  checked_add(checked_mul(M - 1, ldy, "qlinear: out size"), N, "qlinear: out size");
  // Helpers cost a wake-up (microseconds, far more when other processes hold the cores, and
  // a helper descheduled mid-item stalls the caller): give each thread >= ~25 us of work,
  // estimated from ~30 GB/s weight streaming and ~600 GOP/s of int8 compute per thread.
  const double est_us = double(w_nbytes) / 30e3 + 2.0 * double(M) * double(N) * double(K) / 600e3;
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, 1 + int64_t(est_us / 25.0))));

  Ctx c;
  c.fmt = fmt;
  c.w = w;
  c.N = N;
  c.K = K;
  c.M = M;
  c.nb = nb;
  c.Kp = checked_mul(nb, fmt.block, "qlinear: K");
  c.bias = bias;
  c.y = y;
  c.ldy = ldy;

  const int64_t q_bytes = checked_mul(M, c.Kp, "qlinear: activation buffer");
  const int64_t f_bytes = checked_mul(checked_mul(M, nb, "qlinear: activation buffer"), 4, "qlinear: activation buffer");
  const size_t off_d = 0, off_s = off_d + align64(f_bytes), off_c = off_s + align64(f_bytes),
               off_q = off_c + align64(f_bytes), off_pre = off_q + align64(q_bytes);
  const int64_t pre_bytes = pre.kind == PreOp::None ? 0 : checked_mul(checked_mul(M, K, "qlinear: pre buffer"), 4,
                                                                      "qlinear: pre buffer");
  thread_local Scratch scratch;
  uint8_t* buf = scratch.get(off_pre + align64(pre_bytes) + 64);
  float* pre_rows = reinterpret_cast<float*>(buf + off_pre);  // [M][K]: x after `pre`
  c.xd = reinterpret_cast<const float*>(buf + off_d);
  c.xs = reinterpret_cast<const float*>(buf + off_s);
  c.xc = reinterpret_cast<const int32_t*>(buf + off_c);
  c.xq = reinterpret_cast<const int8_t*>(buf + off_q);

  const Kernels k = fmt.native_only() ? kquant_kernels(fmt, isa) : plain_kernels(fmt, isa);

  vattn::WorkPool& pool = vattn::WorkPool::shared();
  // Quantize the activations once per call; split rows across threads only when large.
  const int64_t rows_per_item = std::max<int64_t>(1, 16384 / K);
  const int64_t qitems = (M + rows_per_item - 1) / rows_per_item;
  auto quant_item = [&](int64_t i) {
    const int64_t m0 = i * rows_per_item, m1 = std::min(M, (i + 1) * rows_per_item);
    if (pre.kind == PreOp::None) {
      k.quantize(x, ldx, c, m0, m1);
    } else {
      apply_pre(pre, x, ldx, K, m0, m1, pre_rows);
      k.quantize(pre_rows, K, c, m0, m1);
    }
  };
  if (threads == 1 || qitems == 1) {
    for (int64_t i = 0; i < qitems; ++i) quant_item(i);
  } else {
    pool.run(qitems, threads, quant_item);
  }

  // Output panels in items of whole micro-kernel steps; a few items per thread for balance.
  const int64_t step = M <= k.gemv_rows ? 1 : k.panels_per_step;
  const int64_t steps = (panels + step - 1) / step;
  const int64_t items = threads == 1 ? 1 : std::min<int64_t>(steps, int64_t(threads) * 4);
  const int64_t steps_per_item = (steps + items - 1) / items;
  const int64_t n_items = (steps + steps_per_item - 1) / steps_per_item;
  auto gemm_item = [&](int64_t i) {
    const int64_t p0 = i * steps_per_item * step;
    const int64_t p1 = std::min(panels, p0 + steps_per_item * step);
    k.gemm(c, p0, p1);
    if (res) add_residual(res, ldr, y, ldy, M, p0 * kPanel, std::min(N, p1 * kPanel));
  };
  if (n_items == 1) {
    gemm_item(0);
  } else {
    pool.run(n_items, threads, gemm_item);
  }
  // A huge prefill must not pin its activation buffer for the thread's lifetime.
  if (scratch.buf.size() > (size_t(64) << 20)) scratch.release();
}

double int8_peak_gops(Isa isa, double seconds) {
  if (int(isa) > int(best_isa())) throw std::invalid_argument(std::string("ISA ") + isa_name(isa) + " is not supported");
  int32_t (*loop)(int64_t, int32_t) = peak_loop_scalar;
  double ops = kPeakOpsScalar;
  int64_t chunk = 64;
  if (isa == Isa::Avx512Vnni) {
    loop = peak_loop_avx512;
    ops = kPeakOpsAvx512;
    chunk = 1 << 16;
  } else if (isa == Isa::Avx2) {
    loop = peak_loop_avx2;
    ops = kPeakOpsAvx2;
    chunk = 1 << 16;
  }
  auto cpu_now = [] {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return double(t.tv_sec) + double(t.tv_nsec) * 1e-9;
  };
  volatile int32_t sink = 0;
  double best = 0;
  const double end = cpu_now() + std::max(seconds, 1e-3);
  do {  // best of short runs: a run hit by an interrupt or a frequency dip does not count
    const double t0 = cpu_now();
    sink = loop(chunk, sink) & 0xffff;
    const double el = cpu_now() - t0;
    if (el > 0) best = std::max(best, ops * double(chunk) / el / 1e9);
  } while (cpu_now() < end);
  return best;
}

int32_t peak_loop_scalar(int64_t iters, int32_t seed) {
  // A plain int8 dot product as compiled for the baseline ISA.
  alignas(64) int8_t a[4096], b[4096];
  for (int i = 0; i < 4096; ++i) {
    a[i] = int8_t(i * 7 + seed);
    b[i] = int8_t(i * 13 + 5);
  }
  uint32_t total = 0;
  for (int64_t r = 0; r < iters; ++r) {
    int32_t s = 0;  // |s| <= 4096 * 128 * 128 = 2^26: no overflow
    for (int i = 0; i < 4096; ++i) s += int32_t(a[i]) * int32_t(b[i]);
    total += uint32_t(s);
    a[r & 4095] = int8_t(s & 0x7f);
  }
  return int32_t(total & 0x7fffffff);
}

}  // namespace sqk
