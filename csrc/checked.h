// Overflow-checked int64 arithmetic for sizes and offsets computed from user input:
// an overflow becomes std::invalid_argument (Python: ValueError), never a wrapped value.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace vattn {

inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r))
    throw std::invalid_argument(std::string(what) + " overflows int64 (" + std::to_string(a) + " * " +
                                std::to_string(b) + ")");
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r))
    throw std::invalid_argument(std::string(what) + " overflows int64 (" + std::to_string(a) + " + " +
                                std::to_string(b) + ")");
  return r;
}

// x rounded up to a multiple of m (m > 0, x >= 0).
inline int64_t checked_round_up(int64_t x, int64_t m, const char* what) {
  return checked_mul(checked_add(x, m - 1, what) / m, m, what);
}

}  // namespace vattn
