// Other architectures: the portable kernels only (cpu_has_avx2() is false there).
#include <cstdlib>

#include "products.h"

namespace t5kernels {

void float_columns_avx2(const FloatProduct& p, int n0, int n1) {
  float_columns_portable(p, n0, n1);
}

void quant_columns_avx2(const QuantProduct& p, int n0, int n1) {
  quant_columns_portable(p, n0, n1);
}

// Never called: cpu_has_avx2() is false on other architectures.
void attention_row_avx2(const float*, const float*, int64_t, const float*, int64_t, int, int, const float*, float*,
                        float*) {
  std::abort();
}

}  // namespace t5kernels

namespace t5kernels {

// Never called: cpu_has_avx512() is false on other architectures.
void float_columns_avx512(const FloatProduct& p, int n0, int n1) {
  float_columns_portable(p, n0, n1);
}

void int_columns_avx512(const IntProduct& p, int n0, int n1) {
  int_columns_portable(p, n0, n1);
}

void attention_row_avx512(const float*, const float*, int64_t, const float*, int64_t, int, int, const float*, float*,
                          float*) {
  std::abort();
}

}  // namespace t5kernels
