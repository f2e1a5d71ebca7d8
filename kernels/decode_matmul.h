// x @ W^T as an MLX primitive: W (N, K) in float32, bfloat16 or float16, or MLX's affine 4/8-bit quantization.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "products.h"

namespace t5kernels {

namespace mx = mlx::core;

// x (..., K) @ w.T -> (..., N); with scales and biases, w is quantized (bits 4 or 8, group_size 32/64/128). With
// `integer`, quantized products take x quantized to int8 per row and group where the instruction set has integer
// kernels (see integer_products). A product runs on the instruction set current when it is built.
mx::array decode_matmul(
    const mx::array& x,
    const mx::array& w,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& biases,
    int group_size,
    int bits,
    bool integer,
    mx::StreamOrDevice s = {});

// The instruction set new products run on ("avx512", "avx2" or "portable"), those this CPU runs, and the choice.
std::string kernel_isa();
std::vector<std::string> kernel_isas();
void set_kernel_isa(const std::string& name);
// The current instruction set's optional extensions in use ("vnni bf16"), and whether it has integer products.
std::string kernel_features();
bool integer_products();
// The number of threads the products run on.
int kernel_threads();

// The products the thread pool has run (each a job); setting the count is a test's way to reach 2^32 jobs.
uint64_t pool_jobs();
void set_pool_jobs(uint64_t jobs);
// The integer products on instruction set `isa` (0 portable, 2 avx512) for tests: x (M, K) float32 rows ldx apart,
// y (M, N), or with `dots` the (M, N, K / group) group dot products before any scaling.
bool has_integer_products(int isa);
void int_product(int isa, const float* x, int ldx, int M, int K, const uint32_t* w, const void* scales,
                 const void* biases, WeightType stype, int group_size, int bits, float* y, int N, int32_t* dots);
// The same with a packed quantized weight (kernels.pack_quantized's copy: uint8 words, scales and biases).
void packed_int_product(int isa, const float* x, int ldx, int M, int K, const mx::array& w, const mx::array& scales,
                        const mx::array& biases, int group_size, int bits, float* y, int N, int32_t* dots);

// For other primitives: out (M, N) = x (M, K) float32, rows ldx apart (a multiple of 8 floats plus 16), @ w.T with w
// float (bits 0) or quantized as in decode_matmul, on instruction set `isa`, in the thread pool; the pool itself; and
// the instruction set new products run on.
void product_rows(int isa, bool integer, const float* x, int ldx, int M, int K, const mx::array& w,
                  const mx::array* scales, const mx::array* biases, int group_size, int bits, float* y, int N);
void pool_run(int tasks, const std::function<void(int)>& task);
// products(i) for i < count as the tasks of one pool job, the products in each computed by the thread that takes it
// alone: for many small products, one job instead of one per product (each job's handing out and waiting cost more
// than a small product's share of the threads saves).
void products_in_one_job(int count, const std::function<void(int)>& products);
// While one lives on a thread, its products share the pool's threads from a smaller size on: the thread computes a
// step at once (DecoderLayers::eval_here), with no host work beside it for another core to do.
struct ComputedAtOnce {
  ComputedAtOnce();
  ~ComputedAtOnce();
  bool outer;
};
int current_kernel_isa();
// The WeightType of float32, bfloat16 or float16 values (throws for any other dtype).
WeightType weight_type(mx::Dtype dtype);
// Whether a float product's weights of this dtype are packed (products.h): bfloat16 as uint16, float32 as uint32.
bool is_packed_dtype(mx::Dtype dtype);
// Whether a quantized product's weights are packed (products.h): their values as bytes, uint8.
bool is_packed_quant(const mx::array& w);

class DecodeMatmul : public mx::Primitive {
 public:
  DecodeMatmul(mx::Stream stream, int group_size, int bits, int isa, bool integer)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits), isa_(isa), integer_(integer) {}

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
  int isa_;
  bool integer_;
};

}  // namespace t5kernels
