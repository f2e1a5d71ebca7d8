// How the kernels' primitives run on MLX's CPU stream.
#pragma once

#include <utility>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace t5kernels {

namespace mx = mlx::core;

// Every output without a buffer given a new one.
inline void allocate(std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    if (out.data_shared_ptr() == nullptr) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
  }
}

// The outputs allocated, the inputs and outputs made known to the stream's encoder, and `run` dispatched on it.
template <class Run>
void dispatch(mx::Stream stream, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs, Run&& run) {
  allocate(outputs);
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& input : inputs) {
    encoder.set_input_array(input);
  }
  for (auto& out : outputs) {
    encoder.set_output_array(out);
  }
  encoder.dispatch(std::forward<Run>(run));
}

}  // namespace t5kernels
