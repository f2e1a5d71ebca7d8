// x @ W^T as an MLX primitive: W (N, K) in float32, bfloat16 or float16, or MLX's affine 4/8-bit quantization.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace t5kernels {

namespace mx = mlx::core;

// x (..., K) @ w.T -> (..., N); with scales and biases, w is quantized (bits 4 or 8, group_size 32/64/128).
mx::array decode_matmul(
    const mx::array& x,
    const mx::array& w,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// "avx2" or "portable", and the number of threads the products run on.
std::string kernel_isa();
int kernel_threads();

// The products the thread pool has run (each a job); setting the count is a test's way to reach 2^32 jobs.
uint64_t pool_jobs();
void set_pool_jobs(uint64_t jobs);

class DecodeMatmul : public mx::Primitive {
 public:
  DecodeMatmul(mx::Stream stream, int group_size, int bits)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "DecodeMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;  // 0: unquantized weights
};

}  // namespace t5kernels
