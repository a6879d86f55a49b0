#include "kv_cache.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <stdexcept>

#include <unistd.h>

#include "checked.h"
#include "errors.h"

namespace vattn {
namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t read_max_map_count() {
  std::ifstream f("/proc/sys/vm/max_map_count");
  int64_t n = 0;
  if (f >> n && n > 0) return n;
  return 65530;  // the kernel's default when the file cannot be read
}

constexpr int64_t kMaxVirtualBytes = int64_t(1) << 46;  // 64 TiB: half of x86-64 user space
// Far beyond any model or batch; below these the per-slot and per-region bookkeeping
// (vectors, one reservation per region) stays small.
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxSlots = int64_t(1) << 16;

// Physical memory of the machine, 0 if unknown.
int64_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  int64_t bytes = 0;
  if (pages <= 0 || page <= 0 || __builtin_mul_overflow(int64_t(pages), int64_t(page), &bytes)) return 0;
  return bytes;
}

}  // namespace

KVCache::KVCache(const CacheConfig& cfg) : cfg_(cfg) {
  auto positive = [](int64_t v, const char* name) {
    if (v <= 0) throw std::invalid_argument(std::string(name) + " must be positive, got " + std::to_string(v));
  };
  positive(cfg.num_layers, "num_layers");
  positive(cfg.num_kv_heads, "num_kv_heads");
  positive(cfg.head_dim, "head_size");
  positive(cfg.elem_size, "dtype size");
  positive(cfg.max_batch_size, "max_batch_size");
  positive(cfg.max_context_len, "max_context_length");
  positive(cfg.page_size, "page_size");
  if (cfg.map_ahead_tokens < 0) throw std::invalid_argument("map_ahead_tokens must be >= 0");
  if (cfg.elem_size > 8) throw std::invalid_argument("dtype size must be at most 8 bytes, got " + std::to_string(cfg.elem_size));
  if (cfg.num_layers > kMaxLayers)
    throw std::invalid_argument("num_layers " + std::to_string(cfg.num_layers) + " above " + std::to_string(kMaxLayers));
  if (cfg.max_batch_size > kMaxSlots)
    throw std::invalid_argument("max_batch_size " + std::to_string(cfg.max_batch_size) + " above " +
                                std::to_string(kMaxSlots));
  if (cfg.device < -1) throw std::invalid_argument("device must be -1 (CPU) or a CUDA ordinal, got " + std::to_string(cfg.device));

  // Every size and offset the cache ever computes is bounded by these, checked once here:
  // slot offsets by the virtual total, token offsets by slot_bytes_ (lengths are
  // validated against max_context_len before use).
  token_bytes_ = checked_mul(checked_mul(cfg.num_kv_heads, cfg.head_dim, "bytes per token"), cfg.elem_size,
                             "bytes per token");
  slot_bytes_ = checked_round_up(checked_mul(cfg.max_context_len, token_bytes_, "bytes per slot (max_context_len x "
                                                                                 "bytes per token)"),
                                 cfg.page_size, "bytes per slot");
  pages_per_slot_ = slot_bytes_ / cfg.page_size;
  regions_ = 2 * cfg.num_layers;
  int64_t region_bytes = 0, virt = 0;
  if (__builtin_mul_overflow(slot_bytes_, cfg.max_batch_size, &region_bytes) ||
      __builtin_mul_overflow(region_bytes, regions_, &virt) || virt > kMaxVirtualBytes)
    throw std::invalid_argument("the KV cache would reserve more than 64 TiB of virtual address space (" +
                                std::to_string(regions_) + " regions x " + std::to_string(cfg.max_batch_size) +
                                " slots x " + std::to_string(slot_bytes_) +
                                " bytes): lower max_batch_size or max_context_length");

  backend_ = cfg.device < 0 ? make_cpu_backend() : make_cuda_backend(cfg.device);
  const int64_t gran = static_cast<int64_t>(backend_->granularity());
  if (cfg.page_size % gran != 0)
    throw std::invalid_argument("page_size " + std::to_string(cfg.page_size) + " is not a multiple of the " +
                                (backend_->is_cuda() ? "CUDA allocation granularity " : "OS page size ") +
                                std::to_string(gran));
  if (!backend_->is_cuda() && (cfg.page_size < 4096 || cfg.page_size > (2 << 20)))
    throw std::invalid_argument("page_size must be between 4 KiB and 2 MiB on CPU, got " + std::to_string(cfg.page_size));
  for (int64_t r = 0; r < regions_; ++r) region_base_.push_back(backend_->reserve(size_t(region_bytes)));
  slots_.resize(cfg.max_batch_size);
  worker_ = std::thread([this] { worker_loop(); });
}

KVCache::~KVCache() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  job_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

// tokens is in [0, max_context_len]: the product is at most slot_bytes_.
int64_t KVCache::pages_for(int64_t tokens) const {
  return (tokens * token_bytes_ + cfg_.page_size - 1) / cfg_.page_size;
}

void KVCache::check_slot(int64_t slot) const {
  if (slot < 0 || slot >= cfg_.max_batch_size)
    throw std::out_of_range("slot " + std::to_string(slot) + " out of range [0, " +
                            std::to_string(cfg_.max_batch_size) + ")");
}

void KVCache::check_lengths(const std::vector<int64_t>& seq_lens) const {
  if (int64_t(seq_lens.size()) != cfg_.max_batch_size)
    throw std::invalid_argument("seq_lens must have one entry per slot (max_batch_size=" +
                                std::to_string(cfg_.max_batch_size) + "), got " + std::to_string(seq_lens.size()));
  for (size_t i = 0; i < seq_lens.size(); ++i) {
    if (seq_lens[i] < 0 || seq_lens[i] > cfg_.max_context_len)
      throw std::invalid_argument("seq_lens[" + std::to_string(i) + "]=" + std::to_string(seq_lens[i]) +
                                  " outside [0, max_context_length=" + std::to_string(cfg_.max_context_len) + "]");
  }
}

int64_t KVCache::reserve_physical_pages(int64_t bytes) {
  std::lock_guard<std::mutex> lk(mu_);
  if (blocks_total_ > 0) throw std::logic_error("reserve_physical_pages was already called for this cache");
  const int64_t block_bytes = checked_mul(cfg_.page_size, regions_, "block size (page_size x 2 x num_layers)");
  const int64_t blocks = bytes / block_bytes;
  if (blocks <= 0)
    throw std::invalid_argument("a KV budget of " + std::to_string(bytes) + " bytes is less than one block (" +
                                std::to_string(block_bytes) + " bytes = page_size x 2 x num_layers)");
  if (blocks > INT32_MAX) throw std::invalid_argument("too many pool blocks; use a larger page_size");
  const int64_t pages = blocks * regions_;  // <= bytes / page_size
  if (!backend_->is_cuda()) {
    const int64_t ram = physical_memory_bytes();
    if (ram > 0 && blocks * block_bytes > ram)
      throw std::invalid_argument("a KV budget of " + std::to_string(blocks * block_bytes) +
                                  " bytes exceeds this machine's physical memory (" + std::to_string(ram) + " bytes)");
    // Each mapped page may become its own kernel mapping, plus a PROT_NONE gap after it.
    const int64_t max_maps = read_max_map_count();
    // Both terms are bounded: pages by the budget check above, the virtual pages by 64 TiB / page_size.
    const int64_t worst = 2 * std::min(pages, pages_per_slot_ * cfg_.max_batch_size * regions_) + regions_;
    if (worst > max_maps / 2)
      throw std::invalid_argument("a pool of " + std::to_string(pages) + " pages of " + std::to_string(cfg_.page_size) +
                                  " bytes could need " + std::to_string(worst) +
                                  " kernel mappings, more than half of vm.max_map_count=" + std::to_string(max_maps) +
                                  ": use a larger page_size or a smaller KV budget");
  }
  backend_->create_pool(static_cast<size_t>(pages), static_cast<size_t>(cfg_.page_size), cfg_.commit_pool);
  blocks_total_ = blocks;
  free_blocks_.reserve(blocks);
  refs_.assign(blocks, 0);
  pins_.assign(blocks, 0);
  for (int64_t b = blocks - 1; b >= 0; --b) free_blocks_.push_back(static_cast<int32_t>(b));
  return pages;
}

int64_t KVCache::alloc_slot(int64_t seqlen) {
  std::lock_guard<std::mutex> lk(mu_);
  if (seqlen < 0 || seqlen > cfg_.max_context_len)
    throw std::invalid_argument("seqlen " + std::to_string(seqlen) + " outside [0, max_context_length=" +
                                std::to_string(cfg_.max_context_len) + "]");
  const int64_t need = pages_for(seqlen);
  int64_t best = -1;
  for (int64_t i = 0; i < cfg_.max_batch_size; ++i) {
    const Slot& s = slots_[i];
    if (s.active) continue;
    if (best < 0) {
      best = i;
      continue;
    }
    const int64_t have = s.blocks.size(), best_have = slots_[best].blocks.size();
    const bool covers = have >= need, best_covers = best_have >= need;
    // Prefer a slot already covering seqlen with the fewest pages, else the most pages.
    if ((covers && (!best_covers || have < best_have)) || (!covers && !best_covers && have > best_have)) best = i;
  }
  if (best < 0) return -1;
  slots_[best].active = true;
  slots_[best].required = 0;
  slots_[best].generation++;
  return best;
}

void KVCache::free_slot(int64_t slot) {
  Lock lk(mu_);
  check_slot(slot);
  wait_not_pending_locked(lk, slot);
  Slot& s = slots_[slot];
  if (!s.active) throw std::invalid_argument("slot " + std::to_string(slot) + " is not in use (double free?)");
  s.active = false;
  s.required = 0;
  s.generation++;
  bool shared = false;
  for (int32_t b : s.blocks) shared = shared || (b >= 0 && refs_[b] > 1);
  if (!deferred_ || shared || s.released > 0) release_slot_pages_locked(lk, slot);
}

void KVCache::wait_not_pending_locked(Lock& lk, int64_t slot) {
  pending_cv_.wait(lk, [&] { return pending_slot_ < 0 || (slot >= 0 && pending_slot_ != slot); });
}

void KVCache::release_slot_pages_locked(Lock& lk, int64_t slot) {
  wait_not_pending_locked(lk, slot);
  while (!slots_[slot].blocks.empty()) unmap_last_locked(slot, true);
}

void KVCache::map_regions(int64_t slot, int64_t page_index, int32_t block) {
  const int64_t offset = slot * slot_bytes_ + page_index * cfg_.page_size;
  int64_t r = 0;
  try {
    for (; r < regions_; ++r) backend_->map(region_base_[r] + offset, size_t(block) * regions_ + r);
  } catch (...) {
    for (int64_t u = 0; u < r; ++u) {
      try {
        backend_->unmap(region_base_[u] + offset);
      } catch (...) {
      }
    }
    throw;
  }
}

void KVCache::map_block_locked(int64_t slot, int32_t block) {
  Slot& s = slots_[slot];
  try {
    map_regions(slot, int64_t(s.blocks.size()), block);
  } catch (...) {
    free_blocks_.push_back(block);
    throw;
  }
  s.blocks.push_back(block);
  refs_[block]++;
}

void KVCache::unmap_last_locked(int64_t slot, bool discard) {
  Slot& s = slots_[slot];
  const int64_t offset = slot * slot_bytes_ + int64_t(s.blocks.size() - 1) * cfg_.page_size;
  const int32_t block = s.blocks.back();
  if (block < 0) {  // released behind a sliding window: nothing mapped there
    s.blocks.pop_back();
    s.released = std::min<int64_t>(s.released, s.blocks.size());
    return;
  }
  for (int64_t r = 0; r < regions_; ++r) backend_->unmap(region_base_[r] + offset);
  s.blocks.pop_back();
  if (--refs_[block] > 0) return;  // still mapped elsewhere or pinned
  free_blocks_.push_back(block);
  if (discard)
    for (int64_t r = 0; r < regions_; ++r) backend_->discard(size_t(block) * regions_ + r);
}

int64_t KVCache::reclaimable_locked() const {
  int64_t n = 0;
  for (const Slot& s : slots_) n += s.active ? std::max<int64_t>(0, int64_t(s.blocks.size()) - s.required) : s.blocks.size();
  return n;
}

int32_t KVCache::take_block_locked(Lock& lk, int64_t for_slot) {
  while (free_blocks_.empty()) {
    // Reclaim: first from freed slots (deferred reclamation), then pages mapped
    // ahead beyond what an active slot's live tokens need.
    int64_t victim = -1;
    for (int64_t i = 0; i < cfg_.max_batch_size && victim < 0; ++i)
      if (i != pending_slot_ && !slots_[i].active && !slots_[i].blocks.empty()) victim = i;
    for (int64_t i = 0; i < cfg_.max_batch_size && victim < 0; ++i)
      if (i != for_slot && i != pending_slot_ && slots_[i].active &&
          int64_t(slots_[i].blocks.size()) > slots_[i].required)
        victim = i;
    if (victim >= 0) {
      unmap_last_locked(victim, false);  // mapped again right away: keep its memory
    } else if (pending_slot_ >= 0) {
      wait_not_pending_locked(lk, -1);  // the worker's block lands, then it is reclaimable
    } else {
      throw OutOfPages("KV page pool exhausted while mapping (no free or reclaimable block)");
    }
  }
  int32_t b = free_blocks_.back();
  free_blocks_.pop_back();
  return b;
}

void KVCache::rethrow_worker_error_locked() {
  if (worker_error_.empty()) return;
  std::string e;
  e.swap(worker_error_);
  throw SystemError("background page mapping failed: " + e);
}

void KVCache::step_locked(Lock& lk, const std::vector<int64_t>& seq_lens, bool eager_reclaim) {
  rethrow_worker_error_locked();
  check_lengths(seq_lens);
  if (blocks_total_ == 0) throw std::logic_error("no physical pages: call reserve_physical_pages first");
  // Plan without touching state, so a short pool leaves everything as it was.
  const int64_t n = cfg_.max_batch_size;
  std::vector<int64_t> required(n);
  // A block the worker is mapping ends up in a slot (as surplus) or back in the free list.
  int64_t deficit = 0, available = int64_t(free_blocks_.size()) + (pending_slot_ >= 0 ? 1 : 0);
  for (int64_t i = 0; i < n; ++i) {
    const Slot& s = slots_[i];
    const int64_t need = pages_for(seq_lens[i]);
    if (seq_lens[i] > 0)
      required[i] = s.active ? std::max(s.required, need) : need;
    else
      required[i] = s.active ? s.required : 0;
    const int64_t have = s.blocks.size();
    deficit += std::max<int64_t>(0, required[i] - have);
    const bool active_after = s.active || seq_lens[i] > 0;
    available += active_after ? std::max<int64_t>(0, have - required[i]) : have;
  }
  if (deficit > available)
    throw OutOfPages("KV page pool exhausted: this step needs " + std::to_string(deficit) +
                     " more blocks but only " + std::to_string(available) + " are free or reclaimable (pool: " +
                     std::to_string(blocks_total_) + " blocks of " + std::to_string(regions_) + " pages x " +
                     std::to_string(cfg_.page_size) + " bytes)");
  for (int64_t i = 0; i < n; ++i) {
    Slot& s = slots_[i];
    if (seq_lens[i] > 0 && !s.active) {
      s.active = true;
      s.generation++;
    }
    s.required = required[i];
  }
  if (eager_reclaim)
    for (int64_t i = 0; i < n; ++i)
      if (!slots_[i].active) release_slot_pages_locked(lk, i);
  for (int64_t i = 0; i < n; ++i) {
    if (int64_t(slots_[i].blocks.size()) >= slots_[i].required) continue;
    wait_not_pending_locked(lk, i);  // the worker may be mapping this slot's next page right now
    while (int64_t(slots_[i].blocks.size()) < slots_[i].required) {
      const int32_t b = take_block_locked(lk, i);
      if (pending_slot_ == i) {  // take_block_locked waited and the worker came back to slot i
        free_blocks_.push_back(b);
        wait_not_pending_locked(lk, i);
        continue;
      }
      const int64_t t0 = now_ns();
      map_block_locked(i, b);
      sync_map_ns_ += now_ns() - t0;
      sync_blocks_mapped_++;
    }
  }
}

void KVCache::step(const std::vector<int64_t>& seq_lens, bool eager_reclaim) {
  Lock lk(mu_);
  step_locked(lk, seq_lens, eager_reclaim);
}

void KVCache::step_async(const std::vector<int64_t>& seq_lens) {
  Lock lk(mu_);
  step_locked(lk, seq_lens, false);
  auto job = std::make_unique<AheadJob>();
  job->target_pages.resize(cfg_.max_batch_size, 0);
  job->generation.resize(cfg_.max_batch_size, 0);
  for (int64_t i = 0; i < cfg_.max_batch_size; ++i) {
    if (seq_lens[i] <= 0) continue;
    // seq_lens[i] + map_ahead_tokens, capped at max_context_len without overflowing.
    const int64_t target = cfg_.map_ahead_tokens > cfg_.max_context_len - seq_lens[i]
                               ? cfg_.max_context_len
                               : seq_lens[i] + cfg_.map_ahead_tokens;
    job->target_pages[i] = pages_for(target);
    job->generation[i] = slots_[i].generation;
  }
  job_ = std::move(job);  // a newer job replaces one not yet started
  job_cv_.notify_one();
}

void KVCache::worker_loop() {
  std::unique_lock<std::mutex> lk(mu_);
  while (true) {
    job_cv_.wait(lk, [this] { return stop_ || job_ != nullptr; });
    if (stop_) return;
    std::unique_ptr<AheadJob> job = std::move(job_);
    worker_busy_ = true;
    // One block at a time, mapped with the lock released: the main thread's step() only
    // waits when it needs the very slot being mapped.
    for (int64_t i = 0; i < cfg_.max_batch_size && !stop_ && !job_; ++i) {
      while (!stop_ && !job_) {
        Slot& s = slots_[i];
        if (!s.active || s.generation != job->generation[i] || int64_t(s.blocks.size()) >= job->target_pages[i] ||
            free_blocks_.empty())
          break;  // map-ahead only uses free blocks: it never takes pages from another slot
        const int32_t b = free_blocks_.back();
        free_blocks_.pop_back();
        const int64_t page_index = s.blocks.size();
        pending_slot_ = i;
        lk.unlock();
        std::string error;
        const int64_t t0 = now_ns();
        try {
          map_regions(i, page_index, b);
        } catch (const std::exception& e) {
          error = e.what();
        }
        const int64_t took = now_ns() - t0;
        lk.lock();
        async_map_ns_ += took;
        async_blocks_mapped_ += error.empty();
        if (error.empty()) {
          slots_[i].blocks.push_back(b);
          refs_[b]++;
        } else {
          free_blocks_.push_back(b);
          worker_error_ = error;
        }
        pending_slot_ = -1;
        pending_cv_.notify_all();
        if (!error.empty()) break;
      }
    }
    worker_busy_ = false;
    idle_cv_.notify_all();
  }
}

void KVCache::wait_async() {
  std::unique_lock<std::mutex> lk(mu_);
  idle_cv_.wait(lk, [this] { return stop_ || (!job_ && !worker_busy_); });
}

void KVCache::set_deferred_reclamation(bool on) {
  Lock lk(mu_);
  deferred_ = on;
  if (!on)
    for (int64_t i = 0; i < cfg_.max_batch_size; ++i)
      if (!slots_[i].active) release_slot_pages_locked(lk, i);
}

int64_t KVCache::num_free_blocks() {
  std::lock_guard<std::mutex> lk(mu_);
  return int64_t(free_blocks_.size()) + reclaimable_locked() + (pending_slot_ >= 0 ? 1 : 0);
}

CacheStats KVCache::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  const int64_t free = free_blocks_.size(), reclaimable = reclaimable_locked();
  int64_t active = 0, shared = 0, pinned = 0, released = 0;
  std::vector<int32_t> held(blocks_total_, 0);
  for (const Slot& s : slots_) {
    active += s.active;
    released += s.released;
    for (int32_t b : s.blocks)
      if (b >= 0) shared += held[b]++ > 0;
  }
  for (int32_t p : pins_) pinned += p > 0;
  return {
      {"page_size", cfg_.page_size},
      {"pages_total", blocks_total_ * regions_},
      {"pages_mapped", (blocks_total_ - free) * regions_},  // includes a block the worker is mapping
      {"pages_free", free * regions_},
      {"pages_reclaimable", reclaimable * regions_},
      {"blocks_total", blocks_total_},
      {"blocks_free", free},
      {"blocks_mapped", blocks_total_ - free},
      {"blocks_reclaimable", reclaimable},
      {"virtual_bytes_reserved", slot_bytes_ * cfg_.max_batch_size * regions_},
      {"physical_bytes_pool", blocks_total_ * regions_ * cfg_.page_size},
      {"pool_resident_bytes", int64_t(backend_->pool_resident_bytes())},
      {"slots_active", active},
      // Prefix sharing: blocks the caller's cache pins, and mappings beyond one per block in use.
      {"blocks_pinned", pinned},
      // Sliding windows: slot pages unmapped because no layer reads them again (release_front).
      {"pages_released", released * regions_},
      {"block_mappings_shared", shared},
      {"slot_bytes", slot_bytes_},
      {"bytes_per_token_per_layer", token_bytes_},
      // Blocks mapped and time spent mapping them on the calling thread (step, step_async)
      // and on the background thread (map-ahead).
      {"sync_blocks_mapped", sync_blocks_mapped_},
      {"sync_map_ns", sync_map_ns_},
      {"async_blocks_mapped", async_blocks_mapped_},
      {"async_map_ns", async_map_ns_},
  };
}

std::vector<uintptr_t> KVCache::region_ptrs() const { return region_base_; }

std::vector<int64_t> KVCache::slot_blocks(int64_t slot) {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  return std::vector<int64_t>(slots_[slot].blocks.begin(), slots_[slot].blocks.end());
}

bool KVCache::slot_active(int64_t slot) {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  return slots_[slot].active;
}

void KVCache::share_prefix(int64_t slot, const std::vector<int64_t>& blocks, int64_t copy_src) {
  Lock lk(mu_);
  rethrow_worker_error_locked();
  check_slot(slot);
  if (blocks_total_ == 0) throw std::logic_error("no physical pages: call reserve_physical_pages first");
  auto check_pinned = [&](int64_t b) {
    if (b < 0 || b >= blocks_total_)
      throw std::out_of_range("block " + std::to_string(b) + " out of range [0, " + std::to_string(blocks_total_) + ")");
    if (pins_[b] == 0) throw std::invalid_argument("block " + std::to_string(b) + " is not pinned: pin it before sharing");
  };
  for (int64_t b : blocks) check_pinned(b);
  if (copy_src >= 0) check_pinned(copy_src);
  if (int64_t(blocks.size()) + (copy_src >= 0) > pages_per_slot_)
    throw std::invalid_argument("a shared prefix of " + std::to_string(blocks.size()) + " pages overflows the slot");
  wait_not_pending_locked(lk, slot);
  Slot& s = slots_[slot];
  if (s.active) throw std::invalid_argument("slot " + std::to_string(slot) + " is in use: a shared prefix starts a sequence");
  release_slot_pages_locked(lk, slot);  // pages a previous sequence left mapped (deferred reclamation)
  s.active = true;
  s.required = 0;
  s.generation++;  // a map-ahead job for the slot's previous sequence is stale now
  for (int64_t b : blocks) {
    map_regions(slot, int64_t(s.blocks.size()), int32_t(b));
    s.blocks.push_back(int32_t(b));
    refs_[b]++;
    s.required = s.blocks.size();
  }
  if (copy_src < 0) return;
  const int32_t fresh = take_block_locked(lk, slot);
  try {
    for (int64_t r = 0; r < regions_; ++r) backend_->copy_page(size_t(copy_src) * regions_ + r, size_t(fresh) * regions_ + r);
  } catch (...) {
    free_blocks_.push_back(fresh);
    throw;
  }
  map_block_locked(slot, fresh);
  s.required = s.blocks.size();
}

void KVCache::release_front(int64_t slot, int64_t pages) {
  Lock lk(mu_);
  check_slot(slot);
  wait_not_pending_locked(lk, slot);
  Slot& s = slots_[slot];
  if (!s.active) throw std::invalid_argument("slot " + std::to_string(slot) + " is not in use");
  if (pages < 0 || pages > s.required)
    throw std::invalid_argument("cannot release " + std::to_string(pages) + " pages of slot " + std::to_string(slot) +
                                ": it holds live tokens in " + std::to_string(s.required));
  for (int64_t p = s.released; p < pages; ++p) {
    const int32_t block = s.blocks[p];
    const int64_t offset = slot * slot_bytes_ + p * cfg_.page_size;
    for (int64_t r = 0; r < regions_; ++r) backend_->unmap(region_base_[r] + offset);
    s.blocks[p] = -1;
    if (--refs_[block] > 0) continue;  // another slot maps it or the prefix cache pins it
    free_blocks_.push_back(block);
    for (int64_t r = 0; r < regions_; ++r) backend_->discard(size_t(block) * regions_ + r);
  }
  s.released = std::max(s.released, pages);
}

int64_t KVCache::pin(int64_t slot, int64_t page) {
  std::lock_guard<std::mutex> lk(mu_);
  check_slot(slot);
  Slot& s = slots_[slot];
  if (!s.active || page < s.released || page >= s.required)
    throw std::invalid_argument("page " + std::to_string(page) + " of slot " + std::to_string(slot) +
                                " holds no live tokens; only those can be pinned");
  const int32_t b = s.blocks[page];
  refs_[b]++;
  pins_[b]++;
  return b;
}

void KVCache::unpin(int64_t block) {
  std::lock_guard<std::mutex> lk(mu_);
  if (block < 0 || block >= blocks_total_ || pins_[block] == 0)
    throw std::invalid_argument("block " + std::to_string(block) + " is not pinned");
  pins_[block]--;
  if (--refs_[block] > 0) return;
  free_blocks_.push_back(int32_t(block));
  for (int64_t r = 0; r < regions_; ++r) backend_->discard(size_t(block) * regions_ + r);
}

void KVCache::check_invariants() {
  Lock lk(mu_);
  wait_not_pending_locked(lk, -1);
  std::vector<int> held(blocks_total_, 0), in_free(blocks_total_, 0);
  auto valid = [&](int32_t b, const std::string& where) {
    if (b < 0 || b >= blocks_total_) throw std::logic_error("invalid block id " + std::to_string(b) + " in " + where);
  };
  for (int32_t b : free_blocks_) {
    valid(b, "the free list");
    if (in_free[b]++) throw std::logic_error("block " + std::to_string(b) + " is in the free list twice");
  }
  for (int64_t i = 0; i < cfg_.max_batch_size; ++i) {
    const Slot& s = slots_[i];
    if (int64_t(s.blocks.size()) > pages_per_slot_) throw std::logic_error("slot " + std::to_string(i) + " overflows");
    if (s.active && int64_t(s.blocks.size()) < s.required)
      throw std::logic_error("active slot " + std::to_string(i) + " lacks pages for its live tokens");
    if (s.released > 0 && !s.active) throw std::logic_error("free slot " + std::to_string(i) + " keeps released pages");
    for (size_t p = 0; p < s.blocks.size(); ++p) {
      const int32_t b = s.blocks[p];
      if ((int64_t(p) < s.released) != (b < 0))
        throw std::logic_error("slot " + std::to_string(i) + " page " + std::to_string(p) + " disagrees with its " +
                               std::to_string(s.released) + " released pages");
      if (b < 0) continue;
      valid(b, "slot " + std::to_string(i));
      held[b]++;
      if ((!s.active || int64_t(p) >= s.required) && refs_[b] != 1)
        throw std::logic_error("block " + std::to_string(b) + " is shared or pinned but sits at a reclaimable page of slot " +
                               std::to_string(i));
    }
  }
  for (int64_t b = 0; b < blocks_total_; ++b) {
    if (refs_[b] != held[b] + pins_[b])
      throw std::logic_error("block " + std::to_string(b) + " counts " + std::to_string(refs_[b]) + " references but has " +
                             std::to_string(held[b]) + " mappings and " + std::to_string(pins_[b]) + " pins");
    if ((refs_[b] == 0) != bool(in_free[b]))
      throw std::logic_error("block " + std::to_string(b) + (refs_[b] ? " is held and free" : " was lost"));
  }
}

}  // namespace vattn
