// The integer products' parts, for tests (see integer_parts.cpp).
#pragma once

#include <utility>

#include "mlx/ops.h"
#include "mlx/transforms.h"

namespace t5kernels {

namespace mx = mlx::core;

// x (M, K) quantized per row and group: (q (M, K) int8, scales (M, K / group_size) float32).
std::pair<mx::array, mx::array> quantize_x(const mx::array& x, int group_size);

// The (M, N, K / group_size) int32 dot products of each row's quantized groups with w's unsigned values.
mx::array integer_group_dots(const mx::array& x, const mx::array& w, const mx::array& scales,
                             const mx::array& biases, int group_size, int bits);

}  // namespace t5kernels
