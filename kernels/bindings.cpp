#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include <string>

#include "decode_matmul.h"

namespace nb = nanobind;
using namespace nb::literals;

// The MLX compiled against, behind a marker that kernels/__init__.py looks for in this file before loading it: a
// module built for another MLX must not be loaded into this one.
#define T5_VERSION_MARKER "t5-kernels-built-for-mlx:"
static const char kMlxVersion[] = T5_VERSION_MARKER T5_MLX_VERSION "\n";

NB_MODULE(_native, m) {
  m.doc() = "Decode-shaped matrix products for MLX on the CPU";
  m.def("decode_matmul", &t5kernels::decode_matmul, "x"_a, "w"_a, "scales"_a = nb::none(), "biases"_a = nb::none(),
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "stream"_a = nb::none(),
        "x (..., K) @ w.T with w (N, K) float, or MLX-quantized (affine, 4/8 bits) with scales and biases.");
  m.def("isa", &t5kernels::kernel_isa, "The instruction set the kernels use: avx2 or portable.");
  m.def("threads", &t5kernels::kernel_threads, "The number of threads the kernels run on.");
  m.def("pool_jobs", &t5kernels::pool_jobs, "The number of jobs the thread pool has run.");
  m.def("set_pool_jobs", &t5kernels::set_pool_jobs, "jobs"_a, "Set the pool's job count (for tests of its wrap).");
  // Read from the marked string, so that the linker keeps it.
  const std::string marked = kMlxVersion;
  m.attr("mlx_version") = marked.substr(sizeof(T5_VERSION_MARKER) - 1, marked.size() - sizeof(T5_VERSION_MARKER));
}
