// The vAttention KV cache: per layer a K and a V region of reserved virtual memory,
// one page-aligned slot per request, physical pages mapped in as sequences grow.
//
// Allocation unit: a "block" = one page at the same offset in every K and V region
// (2 * num_layers pages), so a block holds tokens_per_page tokens of one sequence
// in all layers. The pool is a LIFO free list of blocks.
//
// Prefix sharing: a block may be mapped into several slots at once (the same physical
// pages at the same offset of each slot's range) and retained ("pinned") by the
// caller's prefix cache while no slot maps it. A block's reference count is its
// mappings plus its pins; it is free exactly when the count is 0. Shared or pinned
// blocks only sit at a slot's live pages: freeing a slot that maps one unmaps all of
// the slot's pages at once, so deferred reclamation only ever keeps private pages.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "memory_backend.h"

namespace vattn {

struct CacheConfig {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t elem_size = 0;       // bytes per element (4 = fp32, 2 = bf16/fp16)
  int64_t max_batch_size = 0;  // number of slots
  int64_t max_context_len = 0;
  int64_t page_size = 0;       // bytes
  int device = -1;             // -1 = CPU, otherwise CUDA ordinal
  int64_t map_ahead_tokens = 0;  // step_async maps this many tokens beyond the step
  // CUDA: create every pool page up front (true), or when first mapped and given back to the
  // driver when freed (false: several caches may then share one budget, as a model's layer
  // groups do). CPU pages are always committed on first touch and given back when freed.
  bool commit_pool = true;
};

// stats(): named figures, in a stable order (Python gets them as a dict).
using CacheStats = std::vector<std::pair<const char*, int64_t>>;

class KVCache {
 public:
  explicit KVCache(const CacheConfig& cfg);
  ~KVCache();  // stops and joins the mapping thread; the backend releases the memory
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  // Create the pool from a byte budget (rounded down to whole blocks); returns pages.
  int64_t reserve_physical_pages(int64_t bytes);
  // A free slot, preferring one whose mapped pages already cover seqlen; -1 if none.
  int64_t alloc_slot(int64_t seqlen);
  // The slot's pages become reclaimable (deferred) or go back to the pool now.
  void free_slot(int64_t slot);
  // Map pages so every slot with seq_lens[i] > 0 covers that many tokens. All or
  // nothing: raises OutOfPages before mapping anything if the pool is short.
  void step(const std::vector<int64_t>& seq_lens, bool eager_reclaim);
  // step() for what this step needs, then map map_ahead_tokens more in the background.
  void step_async(const std::vector<int64_t>& seq_lens);
  // Block until the background thread has finished its current job (tests, benchmarks).
  void wait_async();
  void set_deferred_reclamation(bool on);
  int64_t num_free_blocks();  // free + reclaimable blocks
  CacheStats stats();
  std::vector<uintptr_t> region_ptrs() const;  // all K regions, then all V regions
  std::vector<int64_t> slot_blocks(int64_t slot);  // pool blocks mapped into a slot, in order
  bool slot_active(int64_t slot);
  // Start a sequence in a free slot with `blocks` (pinned) mapped at its first pages,
  // then, if copy_src >= 0, a private copy of pinned block copy_src at the next page
  // (copy on write: the sequence will write into that page).
  void share_prefix(int64_t slot, const std::vector<int64_t>& blocks, int64_t copy_src);
  // Sliding window: every layer's window has passed the slot's pages [0, pages), so they
  // are never read again. Unmap them; their blocks go back to the pool unless another
  // slot maps them or the prefix cache pins them. A freed slot with such holes gives all
  // of its pages back at once (deferred reclamation never keeps a slot with holes).
  void release_front(int64_t slot, int64_t pages);
  // Pin the block at live page `page` of an active slot; returns the block.
  int64_t pin(int64_t slot, int64_t page);
  // Drop a pin; the block is freed (and its memory returned) when nothing else holds it.
  void unpin(int64_t block);
  // Every block's count equals its mappings plus pins; free blocks have none; shared and
  // pinned blocks sit only at live pages of active slots. Raises if not.
  void check_invariants();

  const CacheConfig& config() const { return cfg_; }
  int64_t pages_per_slot() const { return pages_per_slot_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  bool is_cuda() const { return backend_->is_cuda(); }

 private:
  struct Slot {
    std::vector<int32_t> blocks;  // blocks mapped at page offsets 0, 1, ... (-1: released, see release_front)
    int64_t released = 0;         // leading pages released behind a sliding window
    int64_t required = 0;         // pages that hold live tokens (never reclaimed while active)
    bool active = false;
    uint64_t generation = 0;      // bumped on activate/free: stale map-ahead jobs see it
  };
  struct AheadJob {
    std::vector<int64_t> target_pages;  // per slot
    std::vector<uint64_t> generation;
  };

  using Lock = std::unique_lock<std::mutex>;
  int64_t pages_for(int64_t tokens) const;
  void check_slot(int64_t slot) const;
  void check_lengths(const std::vector<int64_t>& seq_lens) const;
  void step_locked(Lock& lk, const std::vector<int64_t>& seq_lens, bool eager_reclaim);
  int64_t reclaimable_locked() const;
  int32_t take_block_locked(Lock& lk, int64_t for_slot);
  void map_regions(int64_t slot, int64_t page_index, int32_t block);  // backend calls only
  void map_block_locked(int64_t slot, int32_t block);
  // discard: also return the page's memory to the OS (it goes to the free list, not to another slot).
  void unmap_last_locked(int64_t slot, bool discard);
  void release_slot_pages_locked(Lock& lk, int64_t slot);
  // Wait (lock released meanwhile) until the worker is not mapping into `slot` (-1: any slot).
  void wait_not_pending_locked(Lock& lk, int64_t slot);
  void worker_loop();
  void rethrow_worker_error_locked();

  CacheConfig cfg_;
  std::unique_ptr<MemoryBackend> backend_;
  int64_t token_bytes_ = 0;  // bytes per token per layer region
  int64_t slot_bytes_ = 0;
  int64_t pages_per_slot_ = 0;
  int64_t regions_ = 0;      // 2 * num_layers
  std::vector<uintptr_t> region_base_;
  int64_t blocks_total_ = 0;

  std::mutex mu_;  // guards everything below and every map/unmap
  std::vector<Slot> slots_;
  std::vector<int32_t> free_blocks_;  // LIFO
  std::vector<int32_t> refs_;         // per block: mappings + pins
  std::vector<int32_t> pins_;         // per block: pins by the prefix cache
  bool deferred_ = true;
  std::string worker_error_;
  int64_t sync_blocks_mapped_ = 0, sync_map_ns_ = 0, async_blocks_mapped_ = 0, async_map_ns_ = 0;

  // The worker maps one block at a time outside the lock; while it does, that block is
  // in neither the free list nor a slot, and pending_slot_ names the slot it goes to.
  // Nothing else touches that slot's pages until it lands.
  int64_t pending_slot_ = -1;
  std::condition_variable pending_cv_;

  std::condition_variable job_cv_;
  std::condition_variable idle_cv_;
  std::unique_ptr<AheadJob> job_;
  bool worker_busy_ = false;
  bool stop_ = false;
  std::thread worker_;  // last member: started when everything else exists
};

}  // namespace vattn
