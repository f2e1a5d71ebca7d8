// Row-block matrix products x @ W^T for decoding: the kernels' plain interface (no MLX types), shared by the
// portable, AVX2 and AVX-512 translation units.
#pragma once

#include <cstddef>
#include <cstdint>

namespace t5kernels {

enum WeightType { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kPackedBFloat16 = 3, kPackedFloat32 = 4 };

// Packed weights (kPackedBFloat16, kPackedFloat32): an (N, K) matrix, N a multiple of kPackColumns, stored as blocks
// of kPackColumns columns, each block k by k: weight (n, k) at packed_index(n, k, K). A step of k reads one vector of
// outputs' weights, which multiplies a broadcast x: no sums across a vector's lanes, so a short K costs no more per
// multiply-add than a long one. Each output is the sum over k in order, one multiply-add at a time, whatever the rows
// beside it.
constexpr int kPackColumns = 16;

static inline size_t packed_index(size_t n, size_t k, size_t K) {
  return (n / kPackColumns * K + k) * kPackColumns + n % kPackColumns;
}

// Blocks of 16 columns the AVX-512 kernel takes at a time for `rows` rows (at most kMaxRows): each row one chain of
// multiply-adds per block, enough chains to keep the multipliers busy, their accumulators in registers. 4 blocks
// for up to 4 rows, 3 up to 8 (5-8 rows 3-10% faster than with 2, C++ harness), 2 up to 12, then 1.
constexpr int packed_blocks(int rows) {
  return rows <= 4 ? 4 : rows <= 8 ? 3 : rows <= 12 ? 2 : 1;
}

static inline bool is_packed(WeightType type) {
  return type == kPackedBFloat16 || type == kPackedFloat32;
}

// The instruction sets the kernels are built for, slowest first.
enum Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Rows per pass over the weights.
constexpr int kMaxRows = 16;
// Rows of x converted to float32 at a time: a long prompt's copy stays bounded, and each chunk's rows pass over each
// stretch of weights together.
constexpr int kChunkRows = 256;

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
  // x rounded to bfloat16 (rows ldx apart), where x is bfloat16 already and the AVX-512 kernel multiplies pairs of
  // bfloat16 (vdpbf16ps); else null.
  const uint16_t* x_bf16 = nullptr;
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

// Packed quantized weights (a QuantProduct's w, scales and biases; x_sums set, x_words not): MLX's words (N, K * bits /
// 32), N a multiple of kPackColumns, in blocks of kPackColumns columns stored word by word as packed floats are stored
// k by k (word i of column n at packed_index(n, i, K * bits / 32)): one 64-byte load holds a word of each of a block's
// columns, and value j of them all is a shift and a mask away. Scales and biases in the model's dtype for them (stype),
// per block the groups one after another, each the block's 16 columns'. Each output is sum over groups (in order) of
// scale * (sum over the group's k, in order, of x[k] * value) + bias * sum(x of the group), whatever rows are beside.
static inline size_t packed_quant_scale_index(size_t n, size_t group, size_t groups) {
  return (n / kPackColumns * groups + group) * kPackColumns + n % kPackColumns;
}

// Integer products for quantized weights: each row of x quantized per group to int8 (x_scale = max|x| / 127), each
// group's dot product with the weights' unsigned values in int32, then out = sum over groups of
// w_scale * x_scale * dot + w_bias * sum(x). Every row is quantized alone, so a row's result never depends on others.
struct IntProduct {
  const int8_t* xq;  // (rows, ldq) in the kernel's order (see quantize_x), zero past K
  int ldq;
  const float* x_scales;  // (rows, K / group), rows lds apart
  const float* x_sums;  // (rows, K / group), rows lds apart
  int lds;
  int rows;
  int K;
  const uint32_t* w;
  const void* scales;
  const void* biases;
  WeightType stype;
  int group;
  int bits;
  float* out;  // (rows, N); or, with dots set, null
  int N;
  int32_t* dots;  // for tests: (rows, N, K / group) group dot products instead of out
  // For the AVX-512 kernel: each row's x_scales repeated per lane of its steps (see lane_scales), rows ldl apart.
  const float* x_lane_scales;
  int ldl;
};

// x's rows quantized per group: q (rows, K) in k order, each group's scale and the sum of its (unquantized) values.
void quantize_rows(const float* x, int ldx, int rows, int K, int group, int8_t* q, int ldq, float* x_scales,
                   float* x_sums, int lds);
// q in the order the AVX-512 integer kernel reads 4-bit weights: byte j of the weights holds k = 2j and 2j + 1, so
// per 64 bytes of weights (128 values) the 64 even k come first, then the 64 odd k; zero past K. ldq: a multiple of
// 128 that holds K.
void order_for_nibbles(const int8_t* q, int ldq, int rows, int K, int8_t* out);

// The AVX-512 integer kernel's per-lane x scales: a step (one 64-byte block of weights, or one group where a group
// spans more) has 16 lanes of 32 / bits consecutive k each; lane l of step s takes its group's scale (zero past K).
// Returns the floats per row (ldl) for a given ldq; out null: only that.
int lane_scales(const float* x_scales, int lds, int rows, int K, int ldq, int bits, int group, float* out);

void int_columns_portable(const IntProduct& p, int n0, int n1);
// Integer products with packed quantized weights (w the packed bytes as words, scales and biases the packed ones of
// stype; x_lane_scales unused): each group's dot in int32, then out += scale * (dot * x_scale) + bias * sum(x), groups
// in order. The portable kernel takes q in k order, the AVX-512 one (VNNI) as quantize_rows_avx512 writes it for
// 4-bit weights.
void packed_int_columns_portable(const IntProduct& p, int n0, int n1);


void float_columns_portable(const FloatProduct& p, int n0, int n1);
void quant_columns_portable(const QuantProduct& p, int n0, int n1);
void packed_quant_columns_portable(const QuantProduct& p, int n0, int n1);

// The AVX2/FMA/F16C kernels; call only where cpu_has_avx2() is true.
bool cpu_has_avx2();
void float_columns_avx2(const FloatProduct& p, int n0, int n1);
void quant_columns_avx2(const QuantProduct& p, int n0, int n1);
// One query's attention (decoder_layer.cpp's attention_row, the same arguments) with AVX2.
void attention_row_avx2(const float* q, const float* keys, int64_t key_stride, const float* values,
                        int64_t value_stride, int n, int d_kv, const float* bias, float* scores, float* out);
// The AVX-512 kernels (F, BW, VL, DQ); integer products need VNNI, bfloat16 pairs BF16.
bool cpu_has_avx512();
bool cpu_has_avx512_vnni();
bool cpu_has_avx512_bf16();
void float_columns_avx512(const FloatProduct& p, int n0, int n1);
void int_columns_avx512(const IntProduct& p, int n0, int n1);
void packed_int_columns_avx512(const IntProduct& p, int n0, int n1);
// quantize_rows with AVX-512: the same q and scales; each group's sum of x added in another order. packed_nibbles: q
// in the order the packed 4-bit kernel reads it (a word holds k = 8i..8i + 7, byte j k = 8i + 2j and 8i + 2j + 1, so
// per 8 k the 4 even ones first, then the 4 odd ones).
void quantize_rows_avx512(const float* x, int ldx, int rows, int K, int group, int8_t* q, int ldq, float* x_scales,
                          float* x_sums, int lds, bool packed_nibbles);
void packed_quant_columns_avx512(const QuantProduct& p, int n0, int n1);
// One query's attention (decoder_layer.cpp's attention_row, the same arguments) with AVX-512.
void attention_row_avx512(const float* q, const float* keys, int64_t key_stride, const float* values,
                          int64_t value_stride, int n, int d_kv, const float* bias, float* scores, float* out);
// Attention of up to kAttentionQueries queries at once over the same n keys (an encoder's prompt), each key loaded once
// for all of them: q's rows ldq apart; the keys transposed, keys_t (d_kv, ldk) with ldk a multiple of 16 holding n
// (zero past it); values (n, d_kv) contiguous; d_kv a multiple of 16; bias[r] query r's row of n (or null); scores
// kAttentionQueries * ldk floats of scratch; out's rows ldo apart. A query's result does not depend on the others.
constexpr int kAttentionQueries = 6;
void attention_queries_avx512(const float* q, int64_t ldq, int rows, const float* keys_t, int ldk,
                              const float* values, int n, int d_kv, const float* const* bias, float* scores,
                              float* out, int64_t ldo);

void prepare_quant_x(const float* x, int ldx, int rows, int K, int bits, int group, float* x_words,
                     float* x_sums);
// Each group's sum of x's values, in k order: sums (rows, K / group), rows ldx apart like x's.
void group_sums(const float* x, int ldx, int rows, int K, int group, float* sums);

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
    case kPackedBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
    case kPackedFloat32:
      return static_cast<const float*>(base)[index];
    default:
      return f16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
}

}  // namespace t5kernels
