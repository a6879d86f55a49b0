// CUDA backend: the CUDA driver's virtual memory management API, resolved at run
// time from libcuda.so.1 with dlopen/dlsym, so building needs no CUDA toolkit.
#include <dlfcn.h>

#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "errors.h"
#include "memory_backend.h"

namespace vattn {
namespace {

// The few driver types and constants we use, as declared in cuda.h.
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUmemHandle = unsigned long long;
using CUcontext = void*;

struct CUmemLocation {
  int type;  // CU_MEM_LOCATION_TYPE_DEVICE = 1
  int id;
};
struct CUmemAllocationProp {
  int type;                  // CU_MEM_ALLOCATION_TYPE_PINNED = 1
  int requestedHandleTypes;  // CU_MEM_HANDLE_TYPE_NONE = 0
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};
struct CUmemAccessDesc {
  CUmemLocation location;
  int flags;  // CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
};

struct Driver {
  void* lib = nullptr;
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuMemGetAllocationGranularity)(size_t*, const CUmemAllocationProp*, int);
  CUresult (*cuMemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
  CUresult (*cuMemCreate)(CUmemHandle*, size_t, const CUmemAllocationProp*, unsigned long long);
  CUresult (*cuMemRelease)(CUmemHandle);
  CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemHandle, unsigned long long);
  CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
  CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
  CUresult (*cuMemcpyDtoD)(CUdeviceptr, CUdeviceptr, size_t);
  CUresult (*cuCtxSynchronize)();

  Driver() {
    lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) throw CudaError("no CUDA driver: dlopen(\"libcuda.so.1\") failed (" + std::string(dlerror()) + ")");
    load(cuInit, "cuInit");
    load(cuDeviceGet, "cuDeviceGet");
    load(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    load(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease");
    load(cuCtxSetCurrent, "cuCtxSetCurrent");
    load(cuGetErrorString, "cuGetErrorString");
    load(cuMemGetAllocationGranularity, "cuMemGetAllocationGranularity");
    load(cuMemAddressReserve, "cuMemAddressReserve");
    load(cuMemAddressFree, "cuMemAddressFree");
    load(cuMemCreate, "cuMemCreate");
    load(cuMemRelease, "cuMemRelease");
    load(cuMemMap, "cuMemMap");
    load(cuMemSetAccess, "cuMemSetAccess");
    load(cuMemUnmap, "cuMemUnmap");
    load(cuMemcpyDtoD, "cuMemcpyDtoD_v2", "cuMemcpyDtoD");
    load(cuCtxSynchronize, "cuCtxSynchronize");
  }
  ~Driver() {
    if (lib) dlclose(lib);
  }
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  template <typename F>
  void load(F& fn, const char* name, const char* fallback = nullptr) {
    void* sym = dlsym(lib, name);
    if (!sym && fallback) sym = dlsym(lib, fallback);
    if (!sym) {
      dlclose(lib);
      lib = nullptr;
      throw CudaError(std::string("libcuda.so.1 lacks ") + name + " (driver too old for virtual memory management)");
    }
    fn = reinterpret_cast<F>(sym);
  }

  void check(CUresult r, const char* call) const {
    if (r == 0) return;
    const char* text = nullptr;
    if (cuGetErrorString(r, &text) != 0 || !text) text = "unknown error";
    throw CudaError(std::string(call) + " failed: " + text + " (CUresult " + std::to_string(r) + ")");
  }
};

// A retained reference to a device's primary context (the one the CUDA runtime, and so
// torch, uses), released when this goes away, also when a later constructor step throws.
class PrimaryContext {
 public:
  PrimaryContext(const Driver& drv, int ordinal) : drv_(drv) {
    drv_.check(drv_.cuInit(0), "cuInit");
    drv_.check(drv_.cuDeviceGet(&device_, ordinal), "cuDeviceGet");
    drv_.check(drv_.cuDevicePrimaryCtxRetain(&ctx_, device_), "cuDevicePrimaryCtxRetain");
  }
  ~PrimaryContext() { drv_.cuDevicePrimaryCtxRelease(device_); }
  PrimaryContext(const PrimaryContext&) = delete;
  PrimaryContext& operator=(const PrimaryContext&) = delete;
  CUdevice device() const { return device_; }
  CUcontext get() const { return ctx_; }

 private:
  const Driver& drv_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
};

class CudaBackend : public MemoryBackend {
 public:
  explicit CudaBackend(int device) : ctx_(drv_, device) {
    prop_ = {};
    prop_.type = 1;
    prop_.requestedHandleTypes = 0;
    prop_.location.type = 1;
    prop_.location.id = ctx_.device();
    access_ = {};
    access_.location = prop_.location;
    access_.flags = 3;
    make_current();
    drv_.check(drv_.cuMemGetAllocationGranularity(&granularity_, &prop_, 0), "cuMemGetAllocationGranularity");
  }

  ~CudaBackend() override {
    // Errors cannot be reported from a destructor; undo everything in reverse (ctx_,
    // then drv_, go last as members).
    drv_.cuCtxSetCurrent(ctx_.get());
    for (auto addr : mapped_) drv_.cuMemUnmap(addr, page_size_);
    for (auto h : pages_)
      if (h) drv_.cuMemRelease(h);
    for (auto& r : reservations_) drv_.cuMemAddressFree(r.first, r.second);
  }

  size_t granularity() const override { return granularity_; }

  uintptr_t reserve(size_t bytes) override {
    make_current();
    CUdeviceptr base = 0;
    drv_.check(drv_.cuMemAddressReserve(&base, bytes, granularity_, 0, 0), "cuMemAddressReserve");
    reservations_.emplace_back(base, bytes);
    return static_cast<uintptr_t>(base);
  }

  void create_pool(size_t num_pages, size_t page_size, bool commit) override {
    if (!pages_.empty()) throw std::logic_error("the physical page pool already exists");
    make_current();
    page_size_ = page_size;
    committed_ = commit;
    if (!commit) {  // handles are created by map() and released by discard()
      pages_.assign(num_pages, 0);
      return;
    }
    pages_.reserve(num_pages);
    for (size_t i = 0; i < num_pages; ++i) {
      CUmemHandle h = 0;
      CUresult r = drv_.cuMemCreate(&h, page_size, &prop_, 0);
      if (r != 0) {
        for (auto done : pages_) drv_.cuMemRelease(done);
        pages_.clear();
        drv_.check(r, ("cuMemCreate of pool page " + std::to_string(i) + " of " + std::to_string(num_pages)).c_str());
      }
      pages_.push_back(h);
    }
  }

  void map(uintptr_t addr, size_t page) override {
    make_current();
    CUdeviceptr a = static_cast<CUdeviceptr>(addr);
    drv_.check(drv_.cuMemMap(a, page_size_, 0, handle(page), 0), "cuMemMap");
    CUresult r = drv_.cuMemSetAccess(a, page_size_, &access_, 1);
    if (r != 0) {
      drv_.cuMemUnmap(a, page_size_);
      drv_.check(r, "cuMemSetAccess");
    }
    std::lock_guard<std::mutex> lk(mapped_mu_);
    mapped_.insert(a);
  }

  void unmap(uintptr_t addr) override {
    make_current();
    CUdeviceptr a = static_cast<CUdeviceptr>(addr);
    drv_.check(drv_.cuMemUnmap(a, page_size_), "cuMemUnmap");
    std::lock_guard<std::mutex> lk(mapped_mu_);
    mapped_.erase(a);
  }

  // A page nothing maps any more: an uncommitted pool gives its memory back to the driver
  // (cuMemRelease; the next map creates a fresh handle), as the CPU backend punches a hole.
  void discard(size_t page) override {
    if (committed_) return;
    std::lock_guard<std::mutex> lk(mapped_mu_);
    CUmemHandle& h = pages_.at(page);
    if (!h) return;
    const CUmemHandle gone = h;
    h = 0;
    live_--;
    drv_.check(drv_.cuMemRelease(gone), "cuMemRelease");
  }

  // Prefix caching's copy on write. A pool handle has no address of its own, so both pages
  // are mapped (a handle may be mapped at several addresses at once) into a two-page scratch
  // reservation for the copy, then unmapped. The copy runs on the legacy default stream, which
  // waits for work queued on torch's streams; the synchronize makes it complete before the
  // scratch mappings go.
  void copy_page(size_t src, size_t dst) override {
    std::lock_guard<std::mutex> lk(copy_mu_);
    if (!scratch_) scratch_ = reserve(2 * page_size_);  // page_size_ is a granularity multiple
    const uintptr_t from = scratch_, to = scratch_ + page_size_;
    map(from, src);
    struct Unmap {
      CudaBackend* b;
      uintptr_t a;
      ~Unmap() {
        try {
          b->unmap(a);
        } catch (...) {  // a failed unmap leaves the scratch address taken; nothing else is lost
        }
      }
    } unmap_from{this, from};
    map(to, dst);
    Unmap unmap_to{this, to};
    drv_.check(drv_.cuMemcpyDtoD(CUdeviceptr(to), CUdeviceptr(from), page_size_), "cuMemcpyDtoD");
    drv_.check(drv_.cuCtxSynchronize(), "cuCtxSynchronize");
  }

  // cuMemCreate commits device memory at creation: a committed pool is resident as a whole,
  // an uncommitted one page by page while a handle exists.
  size_t pool_resident_bytes() const override {
    if (committed_) return pages_.size() * page_size_;
    std::lock_guard<std::mutex> lk(mapped_mu_);
    return live_ * page_size_;
  }
  bool is_cuda() const override { return true; }

 private:
  // The pool page's handle, created on first use in an uncommitted pool (the background
  // mapping thread maps without the cache's lock, but never the same page as another thread).
  CUmemHandle handle(size_t page) {
    std::lock_guard<std::mutex> lk(mapped_mu_);
    CUmemHandle& h = pages_.at(page);
    if (!h) {
      CUmemHandle fresh = 0;
      drv_.check(drv_.cuMemCreate(&fresh, page_size_, &prop_, 0), "cuMemCreate of a pool page");
      h = fresh;
      live_++;
    }
    return h;
  }

  // The mapping thread may be the background one: make the context current there too.
  void make_current() { drv_.check(drv_.cuCtxSetCurrent(ctx_.get()), "cuCtxSetCurrent"); }

  Driver drv_;
  PrimaryContext ctx_;  // after drv_: released before the driver library is closed
  CUmemAllocationProp prop_;
  CUmemAccessDesc access_;
  std::mutex copy_mu_;
  uintptr_t scratch_ = 0;  // two pages of address space for copy_page
  size_t granularity_ = 0;
  size_t page_size_ = 0;
  std::vector<CUmemHandle> pages_;  // 0: no memory behind the page yet (uncommitted pool)
  bool committed_ = true;
  size_t live_ = 0;                 // handles of an uncommitted pool
  std::vector<std::pair<CUdeviceptr, size_t>> reservations_;
  mutable std::mutex mapped_mu_;  // the background thread maps without the cache's lock
  std::unordered_set<CUdeviceptr> mapped_;
};

}  // namespace

std::unique_ptr<MemoryBackend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

}  // namespace vattn
