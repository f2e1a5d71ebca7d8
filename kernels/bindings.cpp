#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <string>

#include "decode_matmul.h"
#include "integer_parts.h"

namespace nb = nanobind;
using namespace nb::literals;

// The MLX compiled against, behind a marker that kernels/__init__.py looks for in this file before loading it: a
// module built for another MLX must not be loaded into this one.
#define T5_VERSION_MARKER "t5-kernels-built-for-mlx:"
static const char kMlxVersion[] = T5_VERSION_MARKER T5_MLX_VERSION "\n";

NB_MODULE(_native, m) {
  m.doc() = "Decode-shaped matrix products for MLX on the CPU";
  m.def("decode_matmul", &t5kernels::decode_matmul, "x"_a, "w"_a, "scales"_a = nb::none(), "biases"_a = nb::none(),
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "integer"_a = false, "stream"_a = nb::none(),
        "x (..., K) @ w.T with w (N, K) float, or MLX-quantized (affine, 4/8 bits) with scales and biases; with "
        "integer, x quantized to int8 per row and group where the instruction set has integer products.");
  m.def("isa", &t5kernels::kernel_isa, "The instruction set new products run on: avx512, avx2 or portable.");
  m.def("isas", &t5kernels::kernel_isas, "The instruction sets this CPU runs.");
  m.def("set_isa", &t5kernels::set_kernel_isa, "name"_a, "Run new products on this instruction set.");
  m.def("features", &t5kernels::kernel_features, "The current instruction set's extensions in use (vnni, bf16).");
  m.def("integer_products", &t5kernels::integer_products, "Whether the current instruction set has integer products.");
  m.def("threads", &t5kernels::kernel_threads, "The number of threads the kernels run on.");
  m.def("pool_jobs", &t5kernels::pool_jobs, "The number of jobs the thread pool has run.");
  m.def("set_pool_jobs", &t5kernels::set_pool_jobs, "jobs"_a, "Set the pool's job count (for tests of its wrap).");
  // Read from the marked string, so that the linker keeps it.
  const std::string marked = kMlxVersion;
  m.attr("mlx_version") = marked.substr(sizeof(T5_VERSION_MARKER) - 1, marked.size() - sizeof(T5_VERSION_MARKER));
  m.def("quantize_x", &t5kernels::quantize_x, "x"_a, "group_size"_a, "x's rows quantized per group: (q, scales).");
  m.def("integer_group_dots", &t5kernels::integer_group_dots, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, "The int32 group dot products of the integer path, before scaling.");
}
