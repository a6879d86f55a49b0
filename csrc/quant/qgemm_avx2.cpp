// AVX2 kernels (not written yet: the scalar path stands in).
#include "qgemm.h"
namespace sqk {
Kernels avx2_kernels(const WeightFormat& f) { return scalar_kernels(f); }
double peak_avx2(double s) { return peak_scalar(s); }
}  // namespace sqk
