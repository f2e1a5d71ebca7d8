#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <sys/mman.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "batch_rows.h"
#include "decode_matmul.h"
#include "decoder_layer.h"
#include "integer_parts.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

// The MLX compiled against, behind a marker that kernels/__init__.py looks for in this file before loading it: a
// module built for another MLX must not be loaded into this one.
#define T5_VERSION_MARKER "t5-kernels-built-for-mlx:"
static const char kMlxVersion[] = T5_VERSION_MARKER T5_MLX_VERSION "\n";

// A product's weight from Python: (w, scales or None, biases or None, group_size, bits).
static t5kernels::LayerWeight layer_weight(nb::handle h) {
  nb::tuple w = nb::cast<nb::tuple>(h);
  std::optional<mx::array> scales, biases;
  if (!w[1].is_none()) {
    scales = nb::cast<const mx::array&>(w[1]);
  }
  if (!w[2].is_none()) {
    biases = nb::cast<const mx::array&>(w[2]);
  }
  return {nb::cast<const mx::array&>(w[0]), scales, biases, nb::cast<int>(w[3]), nb::cast<int>(w[4])};
}

namespace {

// An array's whole 2 MB pages (evaluated first) moved onto huge pages (Linux's MADV_COLLAPSE, 6.1 on; asked for them
// too, so that they stay so): a large model's weights, read whole at every step, then cost one TLB entry per 2 MB
// instead of per 4 KB. Returns the bytes collapsed (0 where the kernel or its settings refuse).
size_t collapse_huge_pages(mx::array a) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  a.eval();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  constexpr int kCollapse = 25;  // MADV_COLLAPSE, absent from older headers
  const auto begin = reinterpret_cast<uintptr_t>(a.data<char>());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + a.nbytes()) & ~(kHuge - 1);
  if (last <= first) {
    return 0;
  }
  void* start = reinterpret_cast<void*>(first);
  if (madvise(start, last - first, MADV_HUGEPAGE) != 0 || madvise(start, last - first, kCollapse) != 0) {
    return 0;
  }
  return last - first;
#else
  return 0;
#endif
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "Decode-shaped matrix products for MLX on the CPU";
  m.def("decode_matmul", &t5kernels::decode_matmul, "x"_a, "w"_a, "scales"_a = nb::none(), "biases"_a = nb::none(),
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "integer"_a = false, "stream"_a = nb::none(),
        "x (..., K) @ w.T with w (N, K) float, or MLX-quantized (affine, 4/8 bits) with scales and biases; with "
        "integer, x quantized to int8 per row and group where the instruction set has integer products.");
  // The layers come as Python lists and tuples, read in place: converting them to C++ containers took most of a step's
  // graph building (about 80 of 110 microseconds for 8 layers).
  m.def(
      "decoder_layers",
      [](const mx::array& x, const mx::array& self_bias, const std::optional<mx::array>& cross_bias,
         const std::vector<int>& offsets, nb::list layers, int num_heads, float eps, int activation, bool gated,
         bool integer, nb::object head, nb::object embedding, int greedy_steps, int stop, bool logits,
         const std::vector<int>& cache_rows, bool cache_in_place, int bias_offset, bool now) {
        auto array = [](nb::handle h) -> const mx::array& { return nb::cast<const mx::array&>(h); };
        auto weight = layer_weight;
        std::vector<t5kernels::DecoderLayerInputs> inputs;
        inputs.reserve(layers.size());
        for (nb::handle item : layers) {
          nb::tuple layer = nb::cast<nb::tuple>(item);
          if (layer.size() != 6) {
            throw std::invalid_argument("decoder_layers: a layer is (keys, values, cross keys, cross values, norms, "
                                        "weights)");
          }
          std::vector<mx::array> norms;
          for (nb::handle norm : nb::cast<nb::sequence>(layer[4])) {
            norms.push_back(array(norm));
          }
          std::vector<t5kernels::LayerWeight> layer_weights;
          for (nb::handle w : nb::cast<nb::sequence>(layer[5])) {
            layer_weights.push_back(weight(w));
          }
          inputs.push_back({array(layer[0]), array(layer[1]), array(layer[2]), array(layer[3]), std::move(norms),
                            std::move(layer_weights)});
        }
        std::optional<t5kernels::Head> output_layer;
        if (!head.is_none()) {
          nb::tuple h = nb::cast<nb::tuple>(head);
          output_layer = t5kernels::Head{array(h[0]), nb::cast<float>(h[1]), weight(h[2]), nb::cast<bool>(h[3])};
        }
        // The embedding table: an array (float), or (w, scales, biases, group_size, bits) where quantized.
        std::optional<t5kernels::LayerWeight> table;
        if (nb::isinstance<nb::tuple>(embedding)) {
          table = weight(embedding);
        } else if (!embedding.is_none()) {
          table = t5kernels::LayerWeight{array(embedding)};
        }
        auto outputs = t5kernels::decoder_layers(x, self_bias, cross_bias, offsets, inputs, num_heads, eps, activation,
                                                 gated, integer, output_layer, table, greedy_steps, stop, logits,
                                                 cache_rows, cache_in_place, bias_offset);
        if (now) {
          nb::gil_scoped_release release;
          t5kernels::run_now(outputs);
        }
        return outputs;
      },
      "x"_a, "self_bias"_a, "cross_bias"_a.none(), "offsets"_a, "layers"_a, "num_heads"_a, "eps"_a, "activation"_a,
      "gated"_a, "integer"_a, "head"_a = nb::none(), "embedding"_a = nb::none(), "greedy_steps"_a = 0, "stop"_a = -1,
      "logits"_a = false, "cache_rows"_a = std::vector<int>{}, "cache_in_place"_a = false, "bias_offset"_a = 0,
      "now"_a = false,
      "T5 decoder layers in float32 -> [x, then each layer's cache keys and values with the new ones written]. "
      "layers: (cache keys, cache values, cross keys, cross values, [3 norms], [6 weights]), a weight "
      "(w, scales, biases, group_size, bits) for qkv, o, cross q, cross o, wi (wi_0 and wi_1 stacked if gated), wo; "
      "bits 0 for float weights. With head (final norm weight, scale, weight, int8 activations), the first output is "
      "the logits. With `embedding` (vocab, D) float32, bfloat16 or float16, or (w, scales, biases, group_size, bits) "
      "where quantized, x is token ids (B, L) int32 and the first output "
      "each position's most likely next token (B, L) int32; with greedy_steps > 0 too, each row's greedy "
      "continuation of that many tokens ((greedy_steps) for one row, else (B, greedy_steps)), each fed to its next step. A stop token (one row) ends the work early: drafting "
      "pads with it after drafting it, a verification marks its first one past the first id and every later position -1. "
      "With token ids and `logits` (no drafting, no stop), the first output is the logits (B, L, vocab). With "
      "cache_rows (one per row of x), row b's cache is row cache_rows[b] of the caches given (-1: an empty row). With "
      "cache_in_place, a cache of x's rows comes out in the given cache's buffer, its new positions written there. "
      "The self bias's rows of the new positions start at bias_offset (a table of every position's, say). With `now`, "
      "the outputs are computed before the call returns, on the calling thread (and the kernels' own), not on MLX's "
      "stream.");
  m.def("batch_rows", &t5kernels::batch_rows, "arrays"_a, "rows"_a, "appended"_a, "width"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "For each of arrays (B, H, P, d) float32, its rows `rows` in that order, then the rows of its counterpart in "
        "`appended` (none where empty), as (len(rows) + B2, H, width, d), each row zero past its own P: one operation "
        "for them all.");
  m.def(
      "encoder_layers",
      [](const mx::array& x, const mx::array& bias, nb::list layers, const mx::array& final_norm, int num_heads,
         float eps, int activation, bool gated, bool integer) {
        std::vector<t5kernels::EncoderLayerInputs> inputs;
        inputs.reserve(layers.size());
        for (nb::handle item : layers) {
          nb::tuple layer = nb::cast<nb::tuple>(item);
          if (layer.size() != 2) {
            throw std::invalid_argument("encoder_layers: a layer is (norms, weights)");
          }
          t5kernels::EncoderLayerInputs in;
          for (nb::handle norm : nb::cast<nb::sequence>(layer[0])) {
            in.norms.push_back(nb::cast<const mx::array&>(norm));
          }
          for (nb::handle w : nb::cast<nb::sequence>(layer[1])) {
            in.weights.push_back(layer_weight(w));
          }
          inputs.push_back(std::move(in));
        }
        return t5kernels::encoder_layers(x, bias, inputs, final_norm, num_heads, eps, activation, gated, integer);
      },
      "x"_a, "bias"_a, "layers"_a, "final_norm"_a, "num_heads"_a, "eps"_a, "activation"_a, "gated"_a, "integer"_a,
      "T5 encoder layers and the final norm in float32 -> the encoder output. bias (1 or B, H, L, L): the position "
      "and padding bias; layers: ([2 norms], [4 weights]) for qkv, o, wi (wi_0 and wi_1 stacked if gated), wo, each "
      "(w, scales, biases, group_size, bits), bits 0 for float weights.");
  m.def(
      "cross_projections",
      [](const mx::array& x, nb::list weights, int num_heads, bool integer) {
        std::vector<t5kernels::LayerWeight> projections;
        for (nb::handle w : weights) {
          projections.push_back(layer_weight(w));
        }
        return t5kernels::cross_projections(x, projections, num_heads, integer);
      },
      "x"_a, "weights"_a, "num_heads"_a, "integer"_a,
      "Every decoder layer's cross-attention keys and values of the encoder output x (B, P, D) float32 -> [keys, "
      "values of each layer in turn], each (B, H, P, d_kv). weights: each layer's key and value projections in turn, "
      "each (w, scales, biases, group_size, bits), bits 0 for float weights.");
  m.def("collapse_huge_pages", &collapse_huge_pages, "a"_a,
        "Move an array's whole 2 MB pages onto huge pages (evaluated first); returns the bytes moved (0 where "
        "refused).");
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
