// CPU backend: the pool is a memfd, reservations are PROT_NONE anonymous mappings,
// mapping a page is an mmap(MAP_FIXED|MAP_SHARED) of the memfd over the reservation.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "errors.h"
#include "memory_backend.h"

namespace vattn {
namespace {

std::string errno_text(const std::string& what) {
  return what + " failed: " + std::strerror(errno);
}

// A range of address space with no memory behind it until pages are mapped in.
class Reservation {
 public:
  explicit Reservation(size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw SystemError(errno_text("mmap(PROT_NONE) reservation of " + std::to_string(bytes) + " bytes"));
    base_ = reinterpret_cast<uintptr_t>(p);
  }
  ~Reservation() { munmap(reinterpret_cast<void*>(base_), bytes_); }  // also drops pages mapped inside
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;
  uintptr_t base() const { return base_; }

 private:
  uintptr_t base_ = 0;
  size_t bytes_;
};

class Memfd {
 public:
  explicit Memfd(size_t bytes) {
    fd_ = memfd_create("vattention_kv_pool", MFD_CLOEXEC);
    if (fd_ < 0) throw SystemError(errno_text("memfd_create"));
    if (ftruncate(fd_, static_cast<off_t>(bytes)) != 0) {
      int e = errno;
      close(fd_);
      errno = e;
      throw SystemError(errno_text("ftruncate of the page pool"));
    }
  }
  ~Memfd() { close(fd_); }
  Memfd(const Memfd&) = delete;
  Memfd& operator=(const Memfd&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

class CpuBackend : public MemoryBackend {
 public:
  size_t granularity() const override { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

  uintptr_t reserve(size_t bytes) override {
    reservations_.push_back(std::make_unique<Reservation>(bytes));
    return reservations_.back()->base();
  }

  void create_pool(size_t num_pages, size_t page_size, bool) override {  // a memfd commits on touch
    if (pool_) throw std::logic_error("the physical page pool already exists");
    pool_ = std::make_unique<Memfd>(num_pages * page_size);
    page_size_ = page_size;
  }

  void map(uintptr_t addr, size_t page) override {
    // MAP_POPULATE: fault the page in now (on the mapping thread, possibly the
    // background one) instead of on the model's first write.
    void* want = reinterpret_cast<void*>(addr);
    void* got = mmap(want, page_size_, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_SHARED | MAP_POPULATE,
                     pool_->fd(), static_cast<off_t>(page * page_size_));
    if (got == MAP_FAILED) throw SystemError(errno_text("mmap of a pool page"));
  }

  void unmap(uintptr_t addr) override {
    void* got = mmap(reinterpret_cast<void*>(addr), page_size_, PROT_NONE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (got == MAP_FAILED) throw SystemError(errno_text("mmap restoring the reservation"));
  }

  void discard(size_t page) override {
    if (fallocate(pool_->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(page * page_size_),
                  static_cast<off_t>(page_size_)) != 0)
      throw SystemError(errno_text("fallocate(PUNCH_HOLE) returning a pool page"));
  }

  void copy_page(size_t src, size_t dst) override {
    // Through the memfd: the source need not be mapped anywhere.
    std::vector<char> buf(page_size_);
    const off_t from = static_cast<off_t>(src * page_size_), to = static_cast<off_t>(dst * page_size_);
    for (size_t done = 0; done < page_size_;) {
      const ssize_t n = pread(pool_->fd(), buf.data() + done, page_size_ - done, from + off_t(done));
      if (n <= 0) throw SystemError(errno_text("pread of a pool page"));
      done += size_t(n);
    }
    for (size_t done = 0; done < page_size_;) {
      const ssize_t n = pwrite(pool_->fd(), buf.data() + done, page_size_ - done, to + off_t(done));
      if (n <= 0) throw SystemError(errno_text("pwrite of a pool page"));
      done += size_t(n);
    }
  }

  size_t pool_resident_bytes() const override {
    if (!pool_) return 0;
    struct stat st;
    if (fstat(pool_->fd(), &st) != 0) throw SystemError(errno_text("fstat of the page pool"));
    return static_cast<size_t>(st.st_blocks) * 512;
  }

  bool is_cuda() const override { return false; }

 private:
  std::unique_ptr<Memfd> pool_;
  // Declared after pool_ so they are destroyed first: the reservations (and the
  // pages mapped in them) go before the memfd is closed.
  std::vector<std::unique_ptr<Reservation>> reservations_;
  size_t page_size_ = 0;
};

}  // namespace

std::unique_ptr<MemoryBackend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace vattn
