// pybind11 module vattention_ext._C: the KV cache object and the attention kernel.
// Blocking native work runs with the GIL released; every C++ error type maps to a
// Python exception (pybind11 re-acquires the GIL before translating it).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"
#include "errors.h"
#include "kv_cache.h"

namespace py = pybind11;
using vattn::AttentionPlan;
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
                       int64_t map_ahead_tokens, bool commit_pool) {
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
             c.commit_pool = commit_pool;
             return new KVCache(c);
           }),
           py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("elem_size"),
           py::arg("max_batch_size"), py::arg("max_context_len"), py::arg("page_size"), py::arg("device") = -1,
           py::arg("map_ahead_tokens") = 0, py::arg("commit_pool") = true)
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
      .def("share_prefix", &KVCache::share_prefix, py::arg("slot"), py::arg("blocks"), py::arg("copy_src") = -1,
           py::call_guard<py::gil_scoped_release>())
      .def("release_front", &KVCache::release_front, py::arg("slot"), py::arg("pages"),
           py::call_guard<py::gil_scoped_release>())
      .def("pin", &KVCache::pin, py::arg("slot"), py::arg("page"), py::call_guard<py::gil_scoped_release>())
      .def("unpin", &KVCache::unpin, py::arg("block"), py::call_guard<py::gil_scoped_release>())
      .def("check_invariants", &KVCache::check_invariants, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pages_per_slot", &KVCache::pages_per_slot)
      .def_property_readonly("slot_bytes", &KVCache::slot_bytes)
      .def_property_readonly("is_cuda", &KVCache::is_cuda);

  py::enum_<vattn::DType>(m, "DType", "Element type of the attention kernel's tensors")
      .value("F32", vattn::DType::F32)
      .value("BF16", vattn::DType::BF16)
      .value("F16", vattn::DType::F16);

  // Low level: vattention_ext.kernel.AttentionPlan checks the torch tensors and passes
  // their data pointers here.
  py::class_<AttentionPlan>(m, "AttentionPlan",
                            "One engine step's sequences, validated against the caches' geometry once; "
                            "run() does one layer")
      .def(py::init([](int64_t num_slots, int64_t max_ctx, int64_t num_kv_heads, int64_t head_dim,
                       int64_t stride_slot, int64_t stride_token, int64_t stride_head, vattn::DType dtype,
                       std::vector<int64_t> slots, std::vector<int64_t> context_lens,
                       std::vector<int64_t> query_lens, int64_t num_threads, std::optional<vattn::DType> q_dtype) {
             vattn::CacheGeometry g;
             g.num_slots = num_slots;
             g.max_ctx = max_ctx;
             g.num_kv_heads = num_kv_heads;
             g.head_dim = head_dim;
             g.stride_slot = stride_slot;
             g.stride_token = stride_token;
             g.stride_head = stride_head;
             return new AttentionPlan(g, dtype, std::move(slots), std::move(context_lens), std::move(query_lens),
                                      num_threads, q_dtype.value_or(dtype));
           }),
           py::arg("num_slots"), py::arg("max_ctx"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("stride_slot"), py::arg("stride_token"), py::arg("stride_head"), py::arg("dtype"),
           py::arg("slots"), py::arg("context_lens"), py::arg("query_lens"), py::arg("num_threads") = 1,
           py::arg("q_dtype") = py::none())
      .def(
          "run",
          [](const AttentionPlan& p, uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t out, uintptr_t k_cache,
             uintptr_t v_cache, int64_t num_heads, double scale, int64_t window, double softcap) {
            p.run(reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k_new),
                  reinterpret_cast<const void*>(v_new), reinterpret_cast<void*>(out), reinterpret_cast<void*>(k_cache),
                  reinterpret_cast<void*>(v_cache), num_heads, static_cast<float>(scale), window,
                  static_cast<float>(softcap));
          },
          "One layer over raw data pointers (0 for no k_new/v_new); the caller vouches for the tensors behind them",
          py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("out"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("num_heads"), py::arg("scale"), py::arg("window") = 0, py::arg("softcap") = 0.0,
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_seqs", &AttentionPlan::num_seqs)
      .def_property_readonly("num_tokens", &AttentionPlan::num_tokens)
      .def_property_readonly("num_threads", &AttentionPlan::num_threads)
      .def_property_readonly("dtype", &AttentionPlan::dtype)
      .def_property_readonly("q_dtype", &AttentionPlan::q_dtype)
      .def_property_readonly("num_kv_heads", [](const AttentionPlan& p) { return p.geometry().num_kv_heads; })
      .def_property_readonly("head_dim", [](const AttentionPlan& p) { return p.geometry().head_dim; })
      .def_property_readonly("slots", &AttentionPlan::slots)
      .def_property_readonly("context_lens", &AttentionPlan::context_lens)
      .def_property_readonly("query_lens", &AttentionPlan::query_lens);
}
