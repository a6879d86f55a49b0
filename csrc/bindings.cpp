// pybind11 module vattention_ext._C: the KV cache object and the attention kernel.
// Blocking native work runs with the GIL released; every C++ error type maps to a
// Python exception (pybind11 re-acquires the GIL before translating it).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"
#include "errors.h"
#include "kv_cache.h"

namespace py = pybind11;
using vattn::CacheConfig;
using vattn::KVCache;

namespace {

py::dict stats_dict(KVCache& c) {
  vattn::CacheStats stats;
  {
    py::gil_scoped_release nogil;
    stats = c.stats();
  }
  py::dict d;
  for (const auto& [name, value] : stats) d[name] = value;
  return d;
}

void attention(uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t out, uintptr_t k_cache, uintptr_t v_cache,
               int64_t stride_slot, int64_t stride_token, int64_t stride_head, int64_t num_slots, int64_t max_ctx,
               uintptr_t slots, uintptr_t context_lens, uintptr_t query_lens, int64_t num_seqs, int64_t num_tokens,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale, int dtype,
               int64_t num_threads) {
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("attention: dtype code must be 0 (fp32) or 1 (bf16)");
  vattn::AttentionArgs a;
  a.q = reinterpret_cast<const void*>(q);
  a.k_new = reinterpret_cast<const void*>(k_new);
  a.v_new = reinterpret_cast<const void*>(v_new);
  a.out = reinterpret_cast<void*>(out);
  a.k_cache = reinterpret_cast<void*>(k_cache);
  a.v_cache = reinterpret_cast<void*>(v_cache);
  a.stride_slot = stride_slot;
  a.stride_token = stride_token;
  a.stride_head = stride_head;
  a.num_slots = num_slots;
  a.max_ctx = max_ctx;
  a.slots = reinterpret_cast<const int64_t*>(slots);
  a.context_lens = reinterpret_cast<const int64_t*>(context_lens);
  a.query_lens = reinterpret_cast<const int64_t*>(query_lens);
  a.num_seqs = num_seqs;
  a.num_tokens = num_tokens;
  a.num_heads = num_heads;
  a.num_kv_heads = num_kv_heads;
  a.head_dim = head_dim;
  a.scale = static_cast<float>(scale);
  a.dtype = static_cast<vattn::DType>(dtype);
  a.num_threads = num_threads;
  py::gil_scoped_release nogil;
  vattn::attention(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vAttention native extension: virtual-memory KV cache and CPU attention kernel";
  py::register_exception<vattn::OutOfPages>(m, "OutOfPagesError", PyExc_MemoryError);
  py::register_exception<vattn::CudaError>(m, "CudaError", PyExc_RuntimeError);
  py::register_exception<vattn::SystemError>(m, "NativeOSError", PyExc_OSError);
  // std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
  // std::logic_error / runtime_error -> RuntimeError (pybind11 defaults).

  py::class_<KVCache>(m, "KVCacheCore")
      .def(py::init([](int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, int64_t elem_size,
                       int64_t max_batch_size, int64_t max_context_len, int64_t page_size, int device,
                       int64_t map_ahead_tokens) {
             CacheConfig c;
             c.num_layers = num_layers;
             c.num_kv_heads = num_kv_heads;
             c.head_dim = head_dim;
             c.elem_size = elem_size;
             c.max_batch_size = max_batch_size;
             c.max_context_len = max_context_len;
             c.page_size = page_size;
             c.device = device;
             c.map_ahead_tokens = map_ahead_tokens;
             return new KVCache(c);
           }),
           py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("elem_size"),
           py::arg("max_batch_size"), py::arg("max_context_len"), py::arg("page_size"), py::arg("device") = -1,
           py::arg("map_ahead_tokens") = 0)
      .def("reserve_physical_pages", &KVCache::reserve_physical_pages, py::arg("nbytes"),
           py::call_guard<py::gil_scoped_release>())
      .def("alloc_slot", &KVCache::alloc_slot, py::arg("seqlen"), py::call_guard<py::gil_scoped_release>())
      .def("free_slot", &KVCache::free_slot, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("step", &KVCache::step, py::arg("seq_lens"), py::arg("eager_reclaim") = false,
           py::call_guard<py::gil_scoped_release>())
      .def("step_async", &KVCache::step_async, py::arg("seq_lens"), py::call_guard<py::gil_scoped_release>())
      .def("wait_async", &KVCache::wait_async, py::call_guard<py::gil_scoped_release>())
      .def("set_deferred_reclamation", &KVCache::set_deferred_reclamation, py::arg("on"),
           py::call_guard<py::gil_scoped_release>())
      .def("num_free_blocks", &KVCache::num_free_blocks, py::call_guard<py::gil_scoped_release>())
      .def("stats", &stats_dict)
      .def("region_ptrs", &KVCache::region_ptrs)
      .def("slot_blocks", &KVCache::slot_blocks, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("slot_active", &KVCache::slot_active, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("check_invariants", &KVCache::check_invariants, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pages_per_slot", &KVCache::pages_per_slot)
      .def_property_readonly("slot_bytes", &KVCache::slot_bytes)
      .def_property_readonly("is_cuda", &KVCache::is_cuda);

  m.def("attention", &attention, "Mixed prefill/decode attention over slot-contiguous K/V (raw pointers; use "
        "vattention_ext.attention)",
        py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("out"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("stride_slot"), py::arg("stride_token"), py::arg("stride_head"), py::arg("num_slots"),
        py::arg("max_ctx"), py::arg("slots"), py::arg("context_lens"), py::arg("query_lens"), py::arg("num_seqs"),
        py::arg("num_tokens"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"),
        py::arg("dtype"), py::arg("num_threads") = 1);
}
