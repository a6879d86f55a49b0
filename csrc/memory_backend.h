// Where the KV cache's memory comes from: virtual reservations plus a pool of
// fixed-size physical pages that can be mapped into them. One backend object per
// cache; it owns every reservation, page and mapping it made (RAII).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace vattn {

class MemoryBackend {
 public:
  virtual ~MemoryBackend() = default;
  // Smallest page size the backend supports (OS page on CPU, driver granularity on CUDA).
  virtual size_t granularity() const = 0;
  // Reserve `bytes` of virtual address space with nothing behind it; returns its base.
  virtual uintptr_t reserve(size_t bytes) = 0;
  // Create the physical pool of `num_pages` pages of `page_size` bytes (once). commit: its
  // memory is taken now; else each page takes it when first mapped and `discard` gives it back.
  virtual void create_pool(size_t num_pages, size_t page_size, bool commit) = 0;
  // Back the page at `addr` (inside a reservation, page aligned) with pool page `page`.
  virtual void map(uintptr_t addr, size_t page) = 0;
  // Put the reservation back at `addr`: the pool page stays in the pool.
  virtual void unmap(uintptr_t addr) = 0;
  // The pool page's contents are no longer needed and nothing maps it: give its memory back
  // (CPU: punch a hole in the memfd; CUDA: release its handle, unless the pool was committed).
  virtual void discard(size_t page) = 0;
  // Copy the contents of pool page `src` into pool page `dst`.
  virtual void copy_page(size_t src, size_t dst) = 0;
  // Bytes of the pool the kernel/driver has physically committed (CPU: memfd blocks).
  virtual size_t pool_resident_bytes() const = 0;
  virtual bool is_cuda() const = 0;
};

std::unique_ptr<MemoryBackend> make_cpu_backend();
std::unique_ptr<MemoryBackend> make_cuda_backend(int device);

}  // namespace vattn
