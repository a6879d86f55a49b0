// pybind11 module sarathi.optimal_sampling._C: the exact optimal-sampling math. Tensors
// arrive as data pointers plus sizes (native.py checks dtypes and shapes); the work runs
// with the GIL released; std::invalid_argument becomes ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "optimal.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Optimal sampling: alpha* by KL symmetry and diagnostics over the full vocabulary (float64)";
  m.attr("DIAG_FIELDS") = osk::kDiagFields;
  m.def("optimal_rows",
        [](uintptr_t theta, uintptr_t t, int64_t rows, int64_t vocab, int64_t ld, uintptr_t alpha, uintptr_t tol,
           uintptr_t diag, uintptr_t u, uintptr_t token, uintptr_t logq, int max_iter, int threads) {
          py::gil_scoped_release nogil;
          osk::optimal_rows(reinterpret_cast<const float*>(theta), reinterpret_cast<const float*>(t), rows, vocab, ld,
                            reinterpret_cast<double*>(alpha), reinterpret_cast<const double*>(tol),
                            reinterpret_cast<double*>(diag), reinterpret_cast<const double*>(u),
                            reinterpret_cast<int64_t*>(token), reinterpret_cast<double*>(logq), max_iter, threads);
        },
        py::arg("logits_theta"), py::arg("logits_t"), py::arg("rows"), py::arg("vocab"), py::arg("ld"),
        py::arg("alpha"), py::arg("tol"), py::arg("diag"), py::arg("u"), py::arg("token"), py::arg("logq"),
        py::arg("max_iter"), py::arg("threads"));
}
