// Row-block matrix products x @ W^T for decoding: the kernels' plain interface (no MLX types), shared by the
// portable and the AVX2 translation units.
#pragma once

#include <cstddef>
#include <cstdint>

namespace t5kernels {

enum WeightType { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Rows per pass over the weights.
constexpr int kMaxRows = 16;

// out[m, n] = sum_k x[m, k] * w[n, k] for m < rows <= kMaxRows and n0 <= n < n1. x: (rows, K) float32 (row stride ldx), w: (N, K) of
// `wtype`, out: (rows, N) float32.
struct FloatProduct {
  const float* x;
  int ldx;  // x's row stride (padded: rows 2^k floats apart would share L1 sets)
  int rows;
  int K;
  const void* w;
  WeightType wtype;
  float* out;
  int N;
};

// MLX's affine quantization: w (N, K * bits / 32) uint32, value i of a word in bits [bits * i, bits * (i + 1)),
// weight = scale * value + bias per group of `group` along K; scales and biases (N, K / group) of `stype`.
struct QuantProduct {
  const float* x;  // (rows, K), rows ldx apart; x_words alike
  int ldx;
  int rows;
  int K;
  const uint32_t* w;
  const void* scales;
  const void* biases;
  WeightType stype;
  int group;
  int bits;
  float* out;
  int N;
  // Prepared once per call by prepare_quant_x for the AVX2 kernel: x rearranged word by word and each group's sum.
  const float* x_words;  // (rows, K)
  const float* x_sums;  // (rows, K / group), rows ldx apart
};

void float_columns_portable(const FloatProduct& p, int n0, int n1);
void quant_columns_portable(const QuantProduct& p, int n0, int n1);

// The AVX2/FMA/F16C kernels; call only where cpu_has_avx2() is true.
bool cpu_has_avx2();
void float_columns_avx2(const FloatProduct& p, int n0, int n1);
void quant_columns_avx2(const QuantProduct& p, int n0, int n1);
void prepare_quant_x(const float* x, int ldx, int rows, int K, int bits, int group, float* x_words,
                     float* x_sums);

static inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

float f16_to_float(uint16_t v);

static inline float load_scalar(const void* base, size_t index, WeightType type) {
  switch (type) {
    case kFloat32:
      return static_cast<const float*>(base)[index];
    case kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
    default:
      return f16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
}

}  // namespace t5kernels
