// The integer products' parts that tests check exactly: each row of x quantized per group, and the group dot
// products before any scaling, computed by the kernels of the current instruction set.
#include "integer_parts.h"

#include <stdexcept>
#include <vector>

#include "decode_matmul.h"
#include "products.h"

namespace t5kernels {

namespace {

std::vector<float> float_rows(const mx::array& x) {
  auto x32 = mx::contiguous(mx::astype(x, mx::float32));
  mx::eval(x32);
  return std::vector<float>(x32.data<float>(), x32.data<float>() + x32.size());
}

}  // namespace

std::pair<mx::array, mx::array> quantize_x(const mx::array& x, int group_size) {
  if (x.ndim() != 2 || x.shape(1) % group_size) {
    throw std::invalid_argument("quantize_x: x must be (M, K) with K a multiple of group_size");
  }
  const int M = x.shape(0), K = x.shape(1), groups = K / group_size;
  const std::vector<float> rows = float_rows(x);
  std::vector<int8_t> q(size_t(M) * K);
  std::vector<float> scales(size_t(M) * groups), sums(size_t(M) * groups);
  quantize_rows(rows.data(), K, M, K, group_size, q.data(), K, scales.data(), sums.data(), groups);
  return {mx::array(q.begin(), {M, K}, mx::int8), mx::array(scales.begin(), {M, groups}, mx::float32)};
}

mx::array integer_group_dots(const mx::array& x, const mx::array& w, const mx::array& scales,
                             const mx::array& biases, int group_size, int bits) {
  const int isa = kernel_isa() == "avx512" ? kAvx512 : kernel_isa() == "avx2" ? kAvx2 : kPortable;
  if (!has_integer_products(isa)) {
    throw std::invalid_argument("integer_group_dots: the current instruction set has no integer products");
  }
  const int M = x.shape(0), K = x.shape(1), N = w.shape(0), groups = K / group_size;
  // MLX's words, or kernels.pack_quantized's copy of them (bytes).
  const bool packed = is_packed_quant(w);
  if ((packed ? w.shape(1) != K * bits / 8 : w.dtype() != mx::uint32 || w.shape(1) != K * bits / 32) ||
      K % group_size) {
    throw std::invalid_argument("integer_group_dots: w does not match x");
  }
  const std::vector<float> rows = float_rows(x);
  auto w_in = mx::contiguous(w), s_in = mx::contiguous(mx::astype(scales, mx::float32)),
       b_in = mx::contiguous(mx::astype(biases, mx::float32));
  mx::eval({w_in, s_in, b_in});
  std::vector<int32_t> dots(size_t(M) * N * groups, 0);
  if (packed) {
    packed_int_product(isa, rows.data(), K, M, K, w_in, s_in, b_in, group_size, bits, nullptr, N, dots.data());
  } else {
    int_product(isa, rows.data(), K, M, K, w_in.data<uint32_t>(), s_in.data<void>(), b_in.data<void>(), kFloat32,
                group_size, bits, nullptr, N, dots.data());
  }
  return mx::array(dots.begin(), {M, N, groups}, mx::int32);
}

}  // namespace t5kernels
