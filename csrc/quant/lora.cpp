// Many LoRA adapters in one pass on the CPU (Punica's SGMV, fp32): rows grouped by adapter
// slot, each group multiplied by its own slot's A then B, the delta added into y in place.
//
// Why native: torch's grouped_mm and bmm run these skinny GEMMs (rank 8-64) on OpenMP, and
// interleaved with the quantized linears (which run on our WorkPool) the two thread teams
// wait on each other's spinning threads; in a serving step the LoRA matmuls then cost several
// times the base layer they sit on. Here they run on the same pool as qlinear.
//
// One work item is a block of up to 4 rows of one slot: h = x[rows] @ A[slot] (kept in the
// item's scratch), then for each part p of a fused layer, y[rows, part p's columns] +=
// h[:, p*R : p*R+R] @ B[slot][p*R : p*R+R, part p's columns]. B's other rows are zero for
// that part (each part's delta writes only its own columns), so they are skipped.
#include <immintrin.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "qgemm.h"
#include "work_pool.h"

#define SQK_AVX2 __attribute__((target("avx2,fma")))

namespace sqk {
namespace {

constexpr int kRows = 4;  // rows per work item (and per micro-kernel call)

// c[r][0:nc] += sum_k a[r][k] * b[k * ldb + 0:nc], for r < mr (mr <= kRows).
void block_scalar(int mr, const float* const* a, int64_t K, const float* b, int64_t ldb, int64_t nc,
                  float* const* c) {
  for (int r = 0; r < mr; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const float av = a[r][k];
      const float* brow = b + k * ldb;
      for (int64_t j = 0; j < nc; ++j) c[r][j] += av * brow[j];
    }
}

template <int MR, int NV>  // MR rows x NV ymm columns (8 floats each)
SQK_AVX2 inline void tile_avx2(const float* const* a, int64_t K, const float* b, int64_t ldb, int64_t j0,
                               float* const* c) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* brow = b + k * ldb + j0;
    __m256 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(brow + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a[r] + k);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* p = c[r] + j0 + 8 * v;
      _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc[r][v]));
    }
}

template <int MR>
SQK_AVX2 void block_avx2_rows(const float* const* a, int64_t K, const float* b, int64_t ldb, int64_t nc,
                              float* const* c) {
  int64_t j = 0;
  for (; j + 16 <= nc; j += 16) tile_avx2<MR, 2>(a, K, b, ldb, j, c);
  for (; j + 8 <= nc; j += 8) tile_avx2<MR, 1>(a, K, b, ldb, j, c);
  if (j < nc) {  // the last < 8 columns
    float* ct[kRows];
    for (int r = 0; r < MR; ++r) ct[r] = c[r] + j;
    block_scalar(MR, a, K, b + j, ldb, nc - j, ct);
  }
}

void block_avx2(int mr, const float* const* a, int64_t K, const float* b, int64_t ldb, int64_t nc,
                float* const* c) {
  switch (mr) {
    case 4: block_avx2_rows<4>(a, K, b, ldb, nc, c); break;
    case 3: block_avx2_rows<3>(a, K, b, ldb, nc, c); break;
    case 2: block_avx2_rows<2>(a, K, b, ldb, nc, c); break;
    default: block_avx2_rows<1>(a, K, b, ldb, nc, c); break;
  }
}

struct Item {
  int64_t slot, begin, end;  // rows[begin:end) use slot
};

}  // namespace

void lora_sgmv(const float* x, int64_t ldx, int64_t in, const float* A, const float* B, int64_t S, int64_t W,
               int64_t out, const int64_t* rows, int64_t n, int64_t T, const int64_t* segs, int64_t nseg,
               const int64_t* parts, int64_t P, int64_t R, const int64_t* ranks, float* y, int64_t ldy, int threads,
               Isa isa) {
  if (in <= 0 || W <= 0 || out <= 0 || S <= 0 || R <= 0 || P <= 0 || P * R > W)
    throw std::invalid_argument("lora_sgmv: bad sizes");
  if (ldx < in || ldy < out) throw std::invalid_argument("lora_sgmv: row stride below the row length");
  for (int64_t p = 0; p < P; ++p)
    if (parts[2 * p] < 0 || parts[2 * p + 1] < 0 || parts[2 * p] + parts[2 * p + 1] > out)
      throw std::invalid_argument("lora_sgmv: part " + std::to_string(p) + " is outside the output");
  for (int64_t i = 0; i < n; ++i)
    if (rows[i] < 0 || rows[i] >= T) throw std::invalid_argument("lora_sgmv: row index out of range");
  std::vector<Item> items;
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t slot = segs[3 * s], b = segs[3 * s + 1], e = segs[3 * s + 2];
    if (slot < 0 || slot >= S || b < 0 || b > e || e > n)
      throw std::invalid_argument("lora_sgmv: segment " + std::to_string(s) + " is out of range");
    if (ranks && (ranks[slot] < 0 || ranks[slot] > R))
      throw std::invalid_argument("lora_sgmv: slot " + std::to_string(slot) + " has a rank outside [0, R]");
    for (int64_t r = b; r < e; r += kRows) items.push_back({slot, r, std::min(e, r + kRows)});
  }
  if (items.empty()) return;
  auto* block = isa == Isa::Scalar ? block_scalar : block_avx2;

  auto run_item = [&](int64_t i) {
    const Item& it = items[size_t(i)];
    // A slot's adapter may have a lower rank r than the stack's R: only each part's first r
    // columns of A (rows of B) are non-zero, so only those are multiplied.
    const int64_t r = ranks ? ranks[it.slot] : R;
    if (r == 0) return;
    const int mr = int(it.end - it.begin);
    thread_local std::vector<float> scratch;
    scratch.assign(size_t(kRows * W), 0.0f);
    const float* xr[kRows];
    float* hr[kRows];
    for (int q = 0; q < mr; ++q) {
      xr[q] = x + rows[it.begin + q] * ldx;
      hr[q] = scratch.data() + q * W;
    }
    const float* As = A + it.slot * in * W;
    if (r == R) {
      block(mr, xr, in, As, W, W, hr);  // h = x @ A[slot]
    } else {
      for (int64_t p = 0; p < P; ++p) {
        float* hp[kRows];
        for (int q = 0; q < mr; ++q) hp[q] = hr[q] + p * R;
        block(mr, xr, in, As + p * R, W, r, hp);
      }
    }
    const float* Bs = B + it.slot * W * out;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t col = parts[2 * p], width = parts[2 * p + 1];
      const float* hp[kRows];
      float* yr[kRows];
      for (int q = 0; q < mr; ++q) {
        hp[q] = hr[q] + p * R;
        yr[q] = y + rows[it.begin + q] * ldy + col;
      }
      block(mr, hp, r, Bs + p * R * out + col, out, width, yr);  // y[:, part] += h_p @ B_p
    }
  };
  const int64_t n_items = int64_t(items.size());
  if (threads <= 1 || n_items == 1) {
    for (int64_t i = 0; i < n_items; ++i) run_item(i);
  } else {
    vattn::WorkPool::shared().run(n_items, threads, run_item);
  }
}

}  // namespace sqk
