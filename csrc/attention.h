// CPU attention over slot-contiguous K/V caches for a mixed batch of prefill
// chunks and decodes: the CPU analogue of flash_attn_with_kvcache(cache_batch_idx=...).
//
// An AttentionPlan is built once per engine step: it copies and validates the step's
// sequences (slots, lengths) against the caches' geometry. run() then does one layer
// with O(1) checks, so every layer of the step shares the validation.
#pragma once
#include <cstdint>
#include <vector>

namespace vattn {

// Element types: F16 (IEEE half) holds K/V only, read into fp32 (a half-size KV cache, as
// llama.cpp's default); queries and outputs are F32 or BF16.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Caches [num_slots, max_ctx, num_kv_heads, head_dim], strides in elements; head_dim
// is contiguous. Every layer's K and V cache that a plan runs over has this geometry.
struct CacheGeometry {
  int64_t num_slots = 0, max_ctx = 0, num_kv_heads = 0, head_dim = 0;
  int64_t stride_slot = 0, stride_token = 0, stride_head = 0;
};

class AttentionPlan {
 public:
  // Per sequence (in batch order: prefills first, then decodes): its cache slot, the
  // tokens already cached before this step, and its new tokens this step.
  // Throws std::invalid_argument on any inconsistency: slot out of range, a negative
  // length, context_len + query_len > max_ctx, sizes that overflow int64, ...
  // dtype: the caches'; q_dtype: q, k_new, v_new and out's (F32 with any cache, or BF16
  // with a BF16 cache); new keys and values are rounded to the cache's type as they are stored.
  AttentionPlan(const CacheGeometry& cache, DType dtype, std::vector<int64_t> slots,
                std::vector<int64_t> context_lens, std::vector<int64_t> query_lens, int64_t num_threads,
                DType q_dtype);

  // One layer. q and out: [num_tokens, num_heads, head_dim]; k_new/v_new:
  // [num_tokens, num_kv_heads, head_dim]; all contiguous, of the plan's q_dtype. k_new/v_new
  // are stored into the caches at positions context_lens[i]... first; both null means
  // the caches already hold them. k_cache/v_cache must have the plan's geometry.
  // The caller vouches that the pointers address tensors of those shapes.
  // window > 0: the query at position p sees keys (p - window, p] only (a sliding-window
  // layer); softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2).
  void run(const void* q, const void* k_new, const void* v_new, void* out, void* k_cache, void* v_cache,
           int64_t num_heads, float scale, int64_t window = 0, float softcap = 0.0f) const;

  const CacheGeometry& geometry() const { return cache_; }
  DType dtype() const { return dtype_; }
  DType q_dtype() const { return q_dtype_; }
  int64_t num_seqs() const { return int64_t(slots_.size()); }
  int64_t num_tokens() const { return token_start_.back(); }
  int64_t num_threads() const { return num_threads_; }
  const std::vector<int64_t>& slots() const { return slots_; }
  const std::vector<int64_t>& context_lens() const { return context_lens_; }
  const std::vector<int64_t>& query_lens() const { return query_lens_; }

 private:
  template <typename TQ, typename TC>
  void run_typed(const TQ* q, const TQ* k_new, const TQ* v_new, TQ* out, TC* k_cache, TC* v_cache,
                 int64_t num_heads, float scale, int64_t window, float softcap) const;

  CacheGeometry cache_;
  DType dtype_, q_dtype_;
  std::vector<int64_t> slots_, context_lens_, query_lens_;
  std::vector<int64_t> token_start_;  // [num_seqs + 1]: first token of each sequence in q
  std::vector<int64_t> item_start_;   // [num_seqs + 1]: first work item (KV head x query block)
  int64_t num_threads_ = 1;           // the caller plus num_threads - 1 pool helpers
};

}  // namespace vattn
