// pybind11 module sarathi.model_executor._sampler: what the sampler's pass does natively.
//
// apply_token_bitmask: a grammar's allowed-token bitmask applied to the logits in place (-inf where
// a bit is 0; bit k of word w is token 32 w + k), for the listed rows only. One sequential pass per
// row, word by word: a word of all ones (every token allowed, as in free text inside a string) is
// skipped, a word of zeros is filled, others are read bit by bit. Pointers and sizes are checked on
// the Python side (sampler.py); rows are checked here. The GIL is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

void apply_token_bitmask(float* logits, int64_t num_rows, int64_t vocab, const uint32_t* bitmask,
                         int64_t num_mask_rows, int64_t words, const std::vector<int64_t>& rows) {
  if (vocab < 0 || words < (vocab + 31) / 32)
    throw std::invalid_argument("bitmask has " + std::to_string(words) + " words a row, fewer than the " +
                                std::to_string(vocab) + " tokens need");
  for (int64_t r : rows)
    if (r < 0 || r >= num_rows || r >= num_mask_rows)
      throw std::invalid_argument("row " + std::to_string(r) + " is outside the logits or the bitmask");
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t r : rows) {
    float* row = logits + r * vocab;
    const uint32_t* bits = bitmask + r * words;
    for (int64_t w = 0, base = 0; base < vocab; ++w, base += 32) {
      const uint32_t b = bits[w];
      if (b == 0xFFFFFFFFu) continue;
      const int64_t n = vocab - base < 32 ? vocab - base : 32;
      if (b == 0) {
        for (int64_t k = 0; k < n; ++k) row[base + k] = ninf;
        continue;
      }
      for (int64_t k = 0; k < n; ++k)
        if (!((b >> k) & 1u)) row[base + k] = ninf;
    }
  }
}

}  // namespace

PYBIND11_MODULE(_sampler, m) {
  m.doc() = "The sampler's native pass: a grammar's token bitmask applied to float32 logits in place";
  m.def("apply_token_bitmask",
        [](uintptr_t logits, int64_t num_rows, int64_t vocab, uintptr_t bitmask, int64_t num_mask_rows, int64_t words,
           const std::vector<int64_t>& rows) {
          py::gil_scoped_release nogil;
          apply_token_bitmask(reinterpret_cast<float*>(logits), num_rows, vocab,
                              reinterpret_cast<const uint32_t*>(bitmask), num_mask_rows, words, rows);
        },
        py::arg("logits"), py::arg("num_rows"), py::arg("vocab"), py::arg("bitmask"), py::arg("num_mask_rows"),
        py::arg("words"), py::arg("rows"));
}
