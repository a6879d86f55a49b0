// AVX-512 VNNI kernels (not written yet: the scalar path stands in).
#include "qgemm.h"
namespace sqk {
Kernels avx512_kernels(const WeightFormat& f) { return scalar_kernels(f); }
double peak_avx512(double s) { return peak_scalar(s); }
}  // namespace sqk
