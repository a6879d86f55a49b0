// pybind11 module sarathi.model_executor.quantization._C: the quantized linear kernels.
// Tensors arrive as data pointers plus sizes (kernels.py checks dtypes, shapes and
// devices; the sizes are checked again here). Native work runs with the GIL released;
// std::invalid_argument becomes ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "qgemm.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

sqk::Isa isa_arg(const std::string& name) { return name.empty() ? sqk::default_isa() : sqk::parse_isa(name); }

// min_kind: 0 stored floats (or none: has_min false), 1 implied -8 * scale, 2 int8 z (min = -(scale * z)),
// 3 GGUF K-quant super-blocks (integer sub-scales and mins under fp16 d / dmin; see qgemm.h).
sqk::WeightFormat weight_format(int bits, int block, bool has_min, bool half_scales, int min_kind) {
  if (min_kind < 0 || min_kind > 3) throw std::invalid_argument("min_kind must be 0, 1, 2 or 3");
  sqk::WeightFormat f;
  f.bits = bits;
  f.block = block;
  f.has_min = has_min;
  f.half_scales = half_scales;
  f.implied_min = min_kind == 1;
  f.int_min = min_kind == 2;
  f.k_super = min_kind == 3;
  return f;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Weight-only quantized linear kernels (int8 activations x 4/8-bit weight blocks)";
  m.attr("PANEL") = sqk::kPanel;

  m.def("qlinear",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w, int64_t w_nbytes, int64_t N, int bits,
           int block, bool has_min, bool half_scales, int min_kind, uintptr_t bias, uintptr_t out, int64_t ldo,
           int threads, const std::string& isa) {
          const sqk::WeightFormat f = weight_format(bits, block, has_min, half_scales, min_kind);
          const sqk::Isa which = isa_arg(isa);
          py::gil_scoped_release nogil;
          sqk::qlinear(ptr<const float>(x), M, K, ldx, ptr<const uint8_t>(w), w_nbytes, N, f, ptr<const float>(bias),
                       ptr<float>(out), ldo, threads, which);
        },
        py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("w"), py::arg("w_nbytes"), py::arg("N"),
        py::arg("bits"), py::arg("block"), py::arg("has_min"), py::arg("half_scales"), py::arg("min_kind"),
        py::arg("bias"),
        py::arg("out"), py::arg("ldo"), py::arg("threads"), py::arg("isa") = "");

  m.def("qlinear_fused",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w, int64_t w_nbytes, int64_t N, int bits,
           int block, bool has_min, bool half_scales, int min_kind, uintptr_t bias, int pre_kind, uintptr_t norm_w,
           float eps,
           bool unit_offset, int lanes, uintptr_t res, int64_t ldr, uintptr_t out, int64_t ldo, int threads,
           const std::string& isa) {
          const sqk::WeightFormat f = weight_format(bits, block, has_min, half_scales, min_kind);
          if (pre_kind < 0 || pre_kind > 2) throw std::invalid_argument("qlinear_fused: pre_kind must be 0, 1 or 2");
          sqk::PreOp pre;
          pre.kind = sqk::PreOp::Kind(pre_kind);
          pre.norm_w = ptr<const float>(norm_w);
          pre.eps = eps;
          pre.unit_offset = unit_offset;
          pre.lanes = lanes;
          const sqk::Isa which = isa_arg(isa);
          py::gil_scoped_release nogil;
          sqk::qlinear_fused(ptr<const float>(x), M, K, ldx, ptr<const uint8_t>(w), w_nbytes, N, f,
                             ptr<const float>(bias), pre, ptr<const float>(res), ldr, ptr<float>(out), ldo, threads,
                             which);
        },
        py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("w"), py::arg("w_nbytes"), py::arg("N"),
        py::arg("bits"), py::arg("block"), py::arg("has_min"), py::arg("half_scales"), py::arg("min_kind"),
        py::arg("bias"),
        py::arg("pre_kind"), py::arg("norm_w"), py::arg("eps"), py::arg("unit_offset"), py::arg("lanes"),
        py::arg("res"), py::arg("ldr"), py::arg("out"), py::arg("ldo"), py::arg("threads"), py::arg("isa") = "");

  m.def("silu_mul",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t out) {
          if (M < 0 || K < 0 || ldx < 2 * K) throw std::invalid_argument("silu_mul: bad sizes");
          if (M == 0 || K == 0) return;
          if (!x || !out) throw std::invalid_argument("silu_mul: null pointer");
          sqk::PreOp pre;
          pre.kind = sqk::PreOp::SiluMul;
          py::gil_scoped_release nogil;
          sqk::apply_pre(pre, ptr<const float>(x), ldx, K, 0, M, ptr<float>(out));
        },
        py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("out"),
        "out [M][K] = silu(x[:, :K]) * x[:, K:2K], as qlinear_fused's pre_kind 1 computes it.");

  m.def("rms_norm",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w, float eps, bool unit_offset, int lanes,
           uintptr_t out, int64_t ldo) {
          if (M < 0 || K < 1 || ldx < K || ldo < K) throw std::invalid_argument("rms_norm: bad sizes");
          if (lanes != 8 && lanes != 16) throw std::invalid_argument("rms_norm: lanes must be 8 or 16");
          if (M == 0) return;
          if (!x || !w || !out) throw std::invalid_argument("rms_norm: null pointer");
          py::gil_scoped_release nogil;
          sqk::rms_norm_torch(ptr<const float>(x), M, K, ldx, ptr<const float>(w), eps, unit_offset, lanes,
                              ptr<float>(out), ldo);
        },
        py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("w"), py::arg("eps"),
        py::arg("unit_offset"), py::arg("lanes"), py::arg("out"), py::arg("ldo"),
        "out = torch.rms_norm(x, (K,), w, eps) with torch's CPU order of float operations (see qgemm.h).");

  m.def("rms_norm_heads",
        [](uintptr_t x, int64_t T, int64_t st, int64_t H, int64_t D, uintptr_t w, float eps, bool unit_offset,
           int lanes, uintptr_t out) {
          if (T < 0 || H < 1 || D < 1 || st < H * D) throw std::invalid_argument("rms_norm_heads: bad sizes");
          if (lanes != 8 && lanes != 16) throw std::invalid_argument("rms_norm_heads: lanes must be 8 or 16");
          if (T == 0) return;
          if (!x || !w || !out) throw std::invalid_argument("rms_norm_heads: null pointer");
          py::gil_scoped_release nogil;
          for (int64_t t = 0; t < T; ++t)
            sqk::rms_norm_torch(ptr<const float>(x) + t * st, H, D, D, ptr<const float>(w), eps, unit_offset, lanes,
                                ptr<float>(out) + t * H * D, D);
        },
        py::arg("x"), py::arg("T"), py::arg("st"), py::arg("H"), py::arg("D"), py::arg("w"), py::arg("eps"),
        py::arg("unit_offset"), py::arg("lanes"), py::arg("out"),
        "out [T][H][D] = rms_norm over each head of x [T][H][D] (token stride st, heads contiguous), the bits of "
        "rms_norm above: the per-head q/k norms of Qwen3 and Gemma 3.");

  m.def("rope_inplace",
        [](uintptr_t x, int64_t T, int64_t H, int64_t st, int64_t sh, uintptr_t cos, uintptr_t sin, int64_t half) {
          if (T < 0 || H < 0 || half < 0 || st < 0 || sh < 0) throw std::invalid_argument("rope_inplace: bad sizes");
          if (T == 0 || H == 0 || half == 0) return;
          if (!x || !cos || !sin) throw std::invalid_argument("rope_inplace: null pointer");
          py::gil_scoped_release nogil;
          sqk::rope_inplace(ptr<float>(x), T, H, st, sh, ptr<const float>(cos), ptr<const float>(sin), half);
        },
        py::arg("x"), py::arg("T"), py::arg("H"), py::arg("st"), py::arg("sh"), py::arg("cos"), py::arg("sin"),
        py::arg("half"));

  m.def("lora_sgmv",
        [](uintptr_t x, int64_t ldx, int64_t in, uintptr_t A, uintptr_t B, int64_t S, int64_t W, int64_t out,
           uintptr_t rows, int64_t n, int64_t T, uintptr_t segs, int64_t nseg, uintptr_t parts, int64_t P,
           int64_t R, uintptr_t ranks, uintptr_t y, int64_t ldy, int threads, const std::string& isa) {
          const sqk::Isa which = isa_arg(isa);
          py::gil_scoped_release nogil;
          sqk::lora_sgmv(ptr<const float>(x), ldx, in, ptr<const float>(A), ptr<const float>(B), S, W, out,
                         ptr<const int64_t>(rows), n, T, ptr<const int64_t>(segs), nseg, ptr<const int64_t>(parts),
                         P, R, ptr<const int64_t>(ranks), ptr<float>(y), ldy, threads, which);
        },
        py::arg("x"), py::arg("ldx"), py::arg("in_features"), py::arg("A"), py::arg("B"), py::arg("S"),
        py::arg("W"), py::arg("out_features"), py::arg("rows"), py::arg("n"), py::arg("T"), py::arg("segs"),
        py::arg("nseg"), py::arg("parts"), py::arg("P"), py::arg("R"), py::arg("ranks"), py::arg("y"), py::arg("ldy"),
        py::arg("threads"), py::arg("isa") = "");

  m.def("record_bytes", [](int bits, int block, bool has_min, bool half_scales, int min_kind) {
    return weight_format(bits, block, has_min, half_scales, min_kind).record();
  }, py::arg("bits"), py::arg("block"), py::arg("has_min"), py::arg("half_scales"), py::arg("min_kind") = 0);
  m.def("kernel_isa", [] { return std::string(sqk::isa_name(sqk::default_isa())); },
        "The kernel path qlinear uses (SARATHI_QUANT_ISA caps it).");
  m.def("best_isa", [] { return std::string(sqk::isa_name(sqk::best_isa())); });
  m.def("available_isas", &sqk::available_isas);
  m.def("int8_peak_gops",
        [](const std::string& isa, double seconds) {
          const sqk::Isa which = isa_arg(isa);
          py::gil_scoped_release nogil;
          return sqk::int8_peak_gops(which, seconds);
        },
        py::arg("isa") = "", py::arg("seconds") = 0.2);
}
