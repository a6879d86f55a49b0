// CPU attention over slot-contiguous K/V caches for a mixed batch of prefill
// chunks and decodes: the CPU analogue of flash_attn_with_kvcache(cache_batch_idx=...).
#pragma once
#include <cstdint>

namespace vattn {

enum class DType : int { F32 = 0, BF16 = 1 };

struct AttentionArgs {
  // New tokens, flattened in batch order (prefills first, then decodes): [T, Hq, D]
  // for q and out, [T, Hkv, D] for k_new/v_new; all contiguous. k_new/v_new may be
  // null: then the cache already holds the new tokens.
  const void* q = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  void* out = nullptr;
  // Caches [slots, max_ctx, Hkv, D] with element strides; head_dim is contiguous.
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int64_t stride_slot = 0, stride_token = 0, stride_head = 0;
  int64_t num_slots = 0, max_ctx = 0;
  // Per sequence: slot, tokens already cached before this step, new tokens.
  const int64_t* slots = nullptr;
  const int64_t* context_lens = nullptr;
  const int64_t* query_lens = nullptr;
  int64_t num_seqs = 0, num_tokens = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 1.0f;
  DType dtype = DType::F32;
  int64_t num_threads = 1;  // the caller plus num_threads - 1 pool helpers
};

// Stores k_new/v_new into the caches (if given), then writes attention output to out.
// Throws std::invalid_argument on inconsistent sizes, slots or lengths.
void attention(const AttentionArgs& a);

}  // namespace vattn
