#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "decode_matmul.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() = "Decode-shaped matrix products for MLX on the CPU";
  m.def("decode_matmul", &t5kernels::decode_matmul, "x"_a, "w"_a, "scales"_a = nb::none(), "biases"_a = nb::none(),
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "stream"_a = nb::none(),
        "x (..., K) @ w.T with w (N, K) float, or MLX-quantized (affine, 4/8 bits) with scales and biases.");
  m.def("isa", &t5kernels::kernel_isa, "The instruction set the kernels use: avx2 or portable.");
  m.def("threads", &t5kernels::kernel_threads, "The number of threads the kernels run on.");
}
