// Weight-only quantized linear layers on the CPU: int8 activations x 4-/8-bit weight
// blocks with integer dot products (see kernels.py for the Python side and the packed
// layout's description).
//
// Packed weight layout (built by kernels.pack, read by every kernel):
//   Output columns are grouped into panels of kPanel = 16 (N padded to 16 with zero
//   columns). The buffer is [panels][K blocks][record]; a record holds one block of B
//   input elements of one panel, in this order:
//     q bytes     16 * B * bits / 8 bytes (below)
//     scales      16 floats (fp32, or fp16 when every scale and min is exactly an fp16)
//     mins        16 floats of the same type, only when the weight has a stored float min;
//                 int_min instead: 16 int8 z with min = -(scale * z) (GPTQ / AWQ zero points);
//                 implied_min: nothing (min = -8 * scale, GGUF Q4_0's offset)
//   The B values of a block are split into G = B / 4 groups of 4 consecutive k; a group
//   is 64 bytes, column j's 4 bytes at j * 4 (the operand layout of vpdpbusd: one
//   32-bit lane per column, 4 k per lane).
//   bits = 8: G groups of 64 bytes, each byte q + 128 (offset binary, unsigned).
//   bits = 4: G / 2 chunks of 64 bytes; chunk h's low nibbles are group h and its high
//             nibbles group h + G / 2 (q in 0..15).
//   bits = 5 (block 32) / 6 (block 16): GGUF Q5_0 / Q6_K's own q, stored u = q + 16 / q + 32
//             (offset binary, like bits 8; u = q when the format has a min: Q5_K, 0..31):
//             the bits 4 chunks of u's low nibbles, then
//             one 64-byte plane of the high bits: byte j * 4 + t of it holds, for each group g,
//             bit 4 (bits 5: at bit g) or bits 4-5 (bits 6: at bits 2g, 2g + 1) of that lane's u.
//   Padding (k >= K, columns >= N) holds q = 0 (bits 8: byte 128) and zero scale/min.
//
// K-quant super-blocks (k_super: GGUF Q6_K = bits 6, block 16; Q4_K / Q5_K = bits 4 / 5, block 32
// with a min): a record covers 256 k of a panel, the file's own super-block, with its integer
// sub-scales instead of one float per sub-block:
//     256 / block q sections, each the plain record's q bytes above
//     sub-scales  [256 / block][16]: int8 (Q6_K) or uint8 6-bit (Q4_K / Q5_K)
//     sub-mins    [8][16] uint8 6-bit (Q4_K / Q5_K only)
//     d           16 fp16, then (Q4_K / Q5_K) dmin 16 fp16
//   scale of sub-block s, column j = d[j] * sc[s][j] (exact in fp32), min = -(dmin[j] * m[s][j]):
//   the floats the expanded block form holds, so every path gives the same bits.
//   Q6_K: 3360 bytes per 16 x 256 weights = 6.5625 bits/weight (the file's); Q4_K: 2368 = 4.625,
//   Q5_K: 2880 = 5.625 (the files' 4.5 / 5.5 pack the 6-bit sub-scales; here a byte each).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sqk {

constexpr int kPanel = 16;

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };

const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws std::invalid_argument
Isa best_isa();                          // what the CPU supports
Isa default_isa();                       // best_isa(), capped by SARATHI_QUANT_ISA
std::vector<std::string> available_isas();

struct WeightFormat {
  int bits = 4;
  int block = 32;
  bool has_min = false;
  bool half_scales = false;
  bool implied_min = false;  // has_min with min = -8 * scale exactly (bits 4: q - 8), not stored
  bool int_min = false;      // has_min with min = -(scale * z), z an int8 per column and block
  bool k_super = false;      // GGUF K-quant super-blocks of 256 (see above)
  static constexpr int kSuper = 256;
  int64_t qbytes() const { return int64_t(kPanel) * block * bits / 8; }  // one block of 16 columns
  int64_t scale_bytes() const { return half_scales ? 2 : 4; }
  bool stored_min() const { return has_min && !implied_min && !int_min; }
  int64_t elems() const { return k_super ? kSuper : block; }  // k per record
  int64_t subs() const { return kSuper / block; }             // k_super: sub-blocks per record
  int64_t record() const {
    if (k_super) return subs() * (qbytes() + kPanel * (has_min ? 2 : 1)) + kPanel * 2 * (has_min ? 2 : 1);
    return qbytes() + kPanel * scale_bytes() * (stored_min() ? 2 : 1) + (int_min ? kPanel : 0);
  }
  // The block form a record expands to (bits 8 / 4 records, fp32 scales for k_super).
  WeightFormat expanded() const {
    WeightFormat e = *this;
    e.k_super = false;
    if (bits == 5 || bits == 6) e.bits = 8;
    if (k_super) e.half_scales = false;
    return e;
  }
  bool native_only() const { return bits == 5 || bits == 6 || k_super; }  // run by qgemm_kquant.cpp
  int offset() const { return (bits == 5 || bits == 6) && !has_min ? 1 << (bits - 1) : 0; }  // u - q (bits 5 / 6)
};

// Everything a kernel needs, sizes validated by qlinear().
struct Ctx {
  WeightFormat fmt;
  const uint8_t* w = nullptr;  // packed weight
  int64_t N = 0, K = 0, M = 0;
  int64_t nb = 0;              // K blocks
  int64_t Kp = 0;              // nb * block: row stride of xq
  const int8_t* xq = nullptr;  // [M][Kp] quantized activations (zero beyond K)
  const float* xd = nullptr;   // [M][nb] activation block scales
  const float* xs = nullptr;   // [M][nb] d * sum(q) per block (for mins)
  const int32_t* xc = nullptr; // [M][nb] -128 * sum(q) per block (bits 8 offset correction)
  const float* bias = nullptr; // [N] or null
  float* y = nullptr;          // [M][ldy]
  int64_t ldy = 0;
};

// Activation quantization of rows [m0, m1) of x (row stride ldx) into ctx's buffers.
using QuantizeFn = void (*)(const float* x, int64_t ldx, const Ctx& c, int64_t m0, int64_t m1);
// y for all M rows and panels [p0, p1).
using GemmFn = void (*)(const Ctx& c, int64_t p0, int64_t p1);

struct Kernels {
  QuantizeFn quantize = nullptr;
  GemmFn gemm = nullptr;
  int panels_per_step = 1;  // panels a micro-kernel covers at once (work-split granularity)
  int gemv_rows = 0;        // at M <= gemv_rows the kernel streams one panel at a time (granularity 1)
};

Kernels scalar_kernels(const WeightFormat& f);
Kernels avx2_kernels(const WeightFormat& f);
Kernels avx512_kernels(const WeightFormat& f);
Kernels plain_kernels(const WeightFormat& f, Isa isa);   // one of the three above
// bits 5 / 6 and K-quant super-block records (qgemm_kquant.cpp): the ISA's activation
// quantization; decode (M <= 8) on AVX-512 straight from the packed bits, everything else by
// expanding each panel to f.expanded() records and running that format's kernel.
Kernels kquant_kernels(const WeightFormat& f, Isa isa);
// One panel's records [nrec] of format f -> f.expanded() records (nrec * subs() of them for k_super).
void expand_panel(const WeightFormat& f, const uint8_t* src, int64_t nrec, uint8_t* dst);

float half_to_float(uint16_t h);  // IEEE fp16 bits -> float (exact)

// Scalar reference quantization of one block (shared definition of the rounding).
// Returns the scale; writes q[0..n) and q[n..B) = 0; sum = sum of q.
// A block with a non-finite value gets scale NaN (so its outputs become NaN) and q = 0;
// a block with max |x| < 2^-96 is flushed to zero.
float quantize_block_ref(const float* x, int n, int B, int8_t* q, int32_t* sum);

// What a fused decode call does to x's rows before they are quantized (fused.cpp). Each
// kind gives the bits of the torch ops it replaces: the int8 activation rounding would turn a
// last-bit difference into a quantization step (measured: 0.9 points less top-1 agreement).
struct PreOp {
  enum Kind : int { None = 0, SiluMul = 1, RmsNorm = 2 };
  Kind kind = None;
  // SiluMul: x rows hold [gate (K) | up (K)]; the row quantized is silu(gate) * up, with the
  // float operations of torch's vectorised F.silu (so the same bits where torch has AVX2).
  // RmsNorm: x * (1 / sqrt(mean(x^2) + eps)) * w (unit_offset: * (1 + w)), the mean summed in
  // torch's CPU order with vectors of `lanes` floats (see rms_norm_torch).
  const float* norm_w = nullptr;
  float eps = 0.f;
  bool unit_offset = false;
  int lanes = 8;
};

// Rows [m0, m1) of x (row stride ldx; SiluMul: 2K values a row) through `pre` into out [.][K].
void apply_pre(const PreOp& pre, const float* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1, float* out);

// torch.rms_norm(x, (K,), w, eps) for float32 rows (unit_offset: RMSNorm's Gemma branch,
// * (1 + w)) with torch's order of operations: its CPU sum over a contiguous row with vectors
// of `lanes` floats (8 on the x86-64 builds measured), then / K, + eps, 1 / sqrt, x * r, * w.
void rms_norm_torch(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, float eps, bool unit_offset,
                    int lanes, float* out, int64_t ldo);

// y[m, n] = res[m, n] + y[m, n] for columns [n0, n1) of all M rows.
void add_residual(const float* res, int64_t ldr, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1);

// In place, HF's rotate_half RoPE over the first 2 * half dims of each head:
// x: [T][H][D] with strides (st, sh, 1); cos / sin: [T][half]. The same float operations
// as layers/rope.py's apply_rope (two products, then one subtraction or addition), so the
// bits are the same.
void rope_inplace(float* x, int64_t T, int64_t H, int64_t st, int64_t sh, const float* cos, const float* sin,
                  int64_t half);

// y = x @ W^T (+ bias). x: [M][K] fp32 with row stride ldx; y: [M][ldy].
void qlinear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t w_nbytes, int64_t N,
             const WeightFormat& fmt, const float* bias, float* y, int64_t ldy, int threads, Isa isa);

// qlinear with the decode path's neighbours fused in: x's rows go through `pre` (RMSNorm, or
// silu(gate) * up with x [M][2K]) before quantization, and, when res is given,
// y = res + (x @ W^T + bias) (res [M][ldr], not aliasing y; x may alias y). One call instead of three torch ops.
void qlinear_fused(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t w_nbytes,
                   int64_t N, const WeightFormat& fmt, const float* bias, const PreOp& pre, const float* res,
                   int64_t ldr, float* y, int64_t ldy, int threads, Isa isa);

// Many LoRA adapters at once (lora.cpp): for each segment (slot, begin, end) of segs
// [nseg][3], the rows rows[begin:end) of x ([T][in], row stride ldx) get
// y[row, col_p : col_p + width_p] += (x[row] @ A[slot])[p*R : p*R+R] @ B[slot][p*R : p*R+R, col_p : ...]
// for every part p of parts [P][2] = (col_p, width_p). A: [S][in][W], B: [S][W][out] fp32;
// y: [T][ldy]. A row may appear in only one segment, once (items write y rows in parallel).
// ranks [S] (or null: all R): a slot's adapter rank r <= R; columns r.. of each part's block
// are zero and skipped.
void lora_sgmv(const float* x, int64_t ldx, int64_t in, const float* A, const float* B, int64_t S, int64_t W,
               int64_t out, const int64_t* rows, int64_t n, int64_t T, const int64_t* segs, int64_t nseg,
               const int64_t* parts, int64_t P, int64_t R, const int64_t* ranks, float* y, int64_t ldy,
               int threads, Isa isa);

// A measured int8 multiply-add peak for this ISA on the calling thread (GOP/s, 2 ops per
// MAC), over its CPU time (so time slices lost to other processes do not count).
double int8_peak_gops(Isa isa, double seconds);

// The measuring loops: `iters` iterations of independent int8 multiply-add chains; the
// result depends on all of them. *_ops: operations (2 per MAC) per iteration.
int32_t peak_loop_scalar(int64_t iters, int32_t seed);
int32_t peak_loop_avx2(int64_t iters, int32_t seed);
int32_t peak_loop_avx512(int64_t iters, int32_t seed);
constexpr double kPeakOpsScalar = 2.0 * 4096;
constexpr double kPeakOpsAvx2 = 2.0 * 32 * 6;      // 6 x vpmaddubsw (+ vpaddw)
constexpr double kPeakOpsAvx512 = 2.0 * 64 * 12;   // 12 x vpdpbusd zmm

}  // namespace sqk
