#include "attention.h"

#include "work_pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace vattn {
namespace {

constexpr int64_t kKeyBlock = 128;    // keys scored at once (scores stay in L1)
constexpr int64_t kQueryBlock = 16;   // query rows per work item in prefill chunks
constexpr int64_t kMaxGroup = 64;     // query heads per KV head we support
constexpr int64_t kMaxHeadDim = 512;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
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
template <typename T, int DC>
void attend_row(const float* q /*[G, D] fp32, pre-scaled*/, const T* k, const T* v, int64_t stride_token,
                int64_t n_keys, int64_t G, int64_t D_runtime, float* scores /*[G, kKeyBlock]*/,
                float* acc /*[G, D]*/, float* out /*[G, D]*/) {
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
        scores[g * kKeyBlock + j] = dot;
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

void validate(const AttentionArgs& a) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("attention: " + m); };
  if (a.num_heads <= 0 || a.num_kv_heads <= 0 || a.head_dim <= 0) fail("head counts and head_dim must be positive");
  if (a.num_heads % a.num_kv_heads != 0)
    fail("num_heads " + std::to_string(a.num_heads) + " is not a multiple of num_kv_heads " + std::to_string(a.num_kv_heads));
  if (a.num_heads / a.num_kv_heads > kMaxGroup) fail("more than 64 query heads per KV head");
  if (a.head_dim > kMaxHeadDim) fail("head_dim above 512");
  if (!a.q || !a.out || !a.k_cache || !a.v_cache || !a.slots || !a.context_lens || !a.query_lens) fail("null pointer");
  if ((a.k_new == nullptr) != (a.v_new == nullptr)) fail("give both k_new and v_new or neither");
  int64_t total = 0;
  for (int64_t i = 0; i < a.num_seqs; ++i) {
    const int64_t s = a.slots[i], c = a.context_lens[i], n = a.query_lens[i];
    if (s < 0 || s >= a.num_slots)
      fail("sequence " + std::to_string(i) + ": slot " + std::to_string(s) + " outside [0, " + std::to_string(a.num_slots) + ")");
    if (c < 0 || n < 1) fail("sequence " + std::to_string(i) + ": context_len must be >= 0 and query_len >= 1");
    if (c + n > a.max_ctx)
      fail("sequence " + std::to_string(i) + ": context_len + query_len = " + std::to_string(c + n) +
           " exceeds the cache's max context " + std::to_string(a.max_ctx));
    total += n;
  }
  if (total != a.num_tokens)
    fail("query_lens sum to " + std::to_string(total) + " but q has " + std::to_string(a.num_tokens) + " tokens");
}

template <typename T>
using RowFn = void (*)(const float*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);

template <typename T>
void run(const AttentionArgs& a) {
  const RowFn<T> attend = a.head_dim == 64    ? &attend_row<T, 64>
                          : a.head_dim == 128 ? &attend_row<T, 128>
                                              : &attend_row<T, 0>;
  const int64_t Hq = a.num_heads, Hkv = a.num_kv_heads, D = a.head_dim, G = Hq / Hkv;
  std::vector<int64_t> token_start(a.num_seqs + 1, 0);
  for (int64_t i = 0; i < a.num_seqs; ++i) token_start[i + 1] = token_start[i] + a.query_lens[i];
  T* kc = static_cast<T*>(a.k_cache);
  T* vc = static_cast<T*>(a.v_cache);

  WorkPool& pool = WorkPool::shared();
  const int threads = int(std::max<int64_t>(1, a.num_threads));
  if (a.k_new) {
    const T* kn = static_cast<const T*>(a.k_new);
    const T* vn = static_cast<const T*>(a.v_new);
    const int64_t per_item = 256;  // small copies: split only when there are many tokens
    pool.run((a.num_tokens + per_item - 1) / per_item, threads, [&](int64_t item) {
      for (int64_t t = item * per_item; t < std::min(a.num_tokens, (item + 1) * per_item); ++t) {
        const int64_t i = std::upper_bound(token_start.begin(), token_start.end(), t) - token_start.begin() - 1;
        const int64_t pos = a.context_lens[i] + (t - token_start[i]);
        const int64_t base = a.slots[i] * a.stride_slot + pos * a.stride_token;
        for (int64_t h = 0; h < Hkv; ++h) {
          std::memcpy(kc + base + h * a.stride_head, kn + (t * Hkv + h) * D, D * sizeof(T));
          std::memcpy(vc + base + h * a.stride_head, vn + (t * Hkv + h) * D, D * sizeof(T));
        }
      }
    });
  }

  // Work items: (sequence, KV head, block of query rows).
  std::vector<int64_t> item_start(a.num_seqs + 1, 0);
  for (int64_t i = 0; i < a.num_seqs; ++i)
    item_start[i + 1] = item_start[i] + Hkv * ((a.query_lens[i] + kQueryBlock - 1) / kQueryBlock);
  const T* q = static_cast<const T*>(a.q);
  T* out = static_cast<T*>(a.out);

  pool.run(item_start[a.num_seqs], threads, [&](int64_t it) {
    thread_local std::vector<float> buf;
    buf.resize(G * kKeyBlock + 3 * G * D);
    float* scores = buf.data();
    float* acc = scores + G * kKeyBlock;
    float* qrow = acc + G * D;
    float* orow = qrow + G * D;
    const int64_t i = std::upper_bound(item_start.begin(), item_start.end(), it) - item_start.begin() - 1;
    const int64_t local = it - item_start[i];
    const int64_t h = local % Hkv, qb = local / Hkv;
    const int64_t ctx = a.context_lens[i], qlen = a.query_lens[i];
    const T* k = kc + a.slots[i] * a.stride_slot + h * a.stride_head;
    const T* v = vc + a.slots[i] * a.stride_slot + h * a.stride_head;
    const int64_t r_end = std::min(qlen, (qb + 1) * kQueryBlock);
    for (int64_t r = qb * kQueryBlock; r < r_end; ++r) {
      const int64_t t = token_start[i] + r;
      const T* qt = q + (t * Hq + h * G) * D;
      for (int64_t e = 0; e < G * D; ++e) qrow[e] = load(qt, e) * a.scale;
      // Causal: the query at position ctx + r sees keys 0 .. ctx + r.
      attend(qrow, k, v, a.stride_token, ctx + r + 1, G, D, scores, acc, orow);
      T* ot = out + (t * Hq + h * G) * D;
      for (int64_t e = 0; e < G * D; ++e) store(ot, e, orow[e]);
    }
  });
}

}  // namespace

void attention(const AttentionArgs& a) {
  validate(a);
  if (a.num_tokens == 0) return;
  if (a.dtype == DType::F32)
    run<float>(a);
  else
    run<uint16_t>(a);
}

}  // namespace vattn
