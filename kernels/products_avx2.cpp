// AVX2/FMA/F16C kernels; this file alone is compiled with -mavx2 -mfma -mf16c and is called only after a run-time
// check. Each weight is read once per block of rows; accumulation is in float32.
#include <immintrin.h>

#include "products.h"

namespace t5kernels {
namespace {

// Not std::min: a template instantiated here with AVX2 enabled could be picked by the linker for the portable path.
inline int min_int(int a, int b) {
  return a < b ? a : b;
}

inline int max_int(int a, int b) {
  return a > b ? a : b;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <WeightType WT>
inline __m256 load8(const void* w, size_t index) {
  if constexpr (WT == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + index);
  } else {
    __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + index));
    if constexpr (WT == kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    } else {
      return _mm256_cvtph_ps(half);
    }
  }
}

// R rows x C columns over k in [k0, k1) (multiples of 8), accumulating into acc[r][c].
template <WeightType WT, int R, int C>
void float_tile(const float* x, int ldx, int K, const void* w, int n, int k0, int k1, __m256 (*acc)[4]) {
  constexpr int kBytes = WT == kFloat32 ? 4 : 2;
  __m256 a[R][C];
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      a[r][c] = acc[r][c];
    }
  }
  for (int k = k0; k < k1; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; c++) {
      const size_t index = size_t(n + c) * K + k;
      if ((k & (64 / kBytes - 1)) == 0) {  // once per cache line, 2 KB ahead
        _mm_prefetch(static_cast<const char*>(w) + index * kBytes + 2048, _MM_HINT_T0);
      }
      wv[c] = load8<WT>(w, index);
    }
    for (int r = 0; r < R; r++) {
      __m256 xv = _mm256_loadu_ps(x + size_t(r) * ldx + k);
      for (int c = 0; c < C; c++) {
        a[r][c] = _mm256_fmadd_ps(xv, wv[c], a[r][c]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      acc[r][c] = a[r][c];
    }
  }
}

template <WeightType WT, int R>
void float_tile_rows(int C, const float* x, int ldx, int K, const void* w, int n, int k0, int k1, __m256 (*acc)[4]) {
  switch (C) {
    case 1:
      return float_tile<WT, R, 1>(x, ldx, K, w, n, k0, k1, acc);
    case 2:
      return float_tile<WT, R, 2>(x, ldx, K, w, n, k0, k1, acc);
    case 3:
      return float_tile<WT, R, 3>(x, ldx, K, w, n, k0, k1, acc);
    default:
      return float_tile<WT, R, 4>(x, ldx, K, w, n, k0, k1, acc);
  }
}

template <WeightType WT>
void float_columns(const FloatProduct& p, int n0, int n1) {
  // K in chunks so that a tile's weights stay in L1 while every group of 3 rows passes over them; one group takes
  // up to 16 KB of x at once, so that each column's weights stream from memory in longer runs.
  const int kChunk = p.rows <= 3 ? max_int(256, 16384 / (p.rows * 4) / 16 * 16) : 256;
  const int K8 = p.K & ~7;
  __m256 acc[kMaxRows][4];
  for (int n = n0; n < n1; n += 4) {
    const int C = min_int(4, n1 - n);
    for (int r = 0; r < p.rows; r++) {
      for (int c = 0; c < 4; c++) {
        acc[r][c] = _mm256_setzero_ps();
      }
    }
    for (int k0 = 0; k0 < K8; k0 += kChunk) {
      const int k1 = min_int(K8, k0 + kChunk);
      for (int r = 0; r < p.rows;) {
        const int R = min_int(3, p.rows - r);
        const float* x = p.x + size_t(r) * p.ldx;
        if (R == 3) {
          float_tile_rows<WT, 3>(C, x, p.ldx, p.K, p.w, n, k0, k1, acc + r);
        } else if (R == 2) {
          float_tile_rows<WT, 2>(C, x, p.ldx, p.K, p.w, n, k0, k1, acc + r);
        } else {
          float_tile_rows<WT, 1>(C, x, p.ldx, p.K, p.w, n, k0, k1, acc + r);
        }
        r += R;
      }
    }
    for (int r = 0; r < p.rows; r++) {
      for (int c = 0; c < C; c++) {
        float sum = horizontal_sum(acc[r][c]);
        for (int k = K8; k < p.K; k++) {
          sum += p.x[size_t(r) * p.ldx + k] * load_scalar(p.w, size_t(n + c) * p.K + k, p.wtype);
        }
        p.out[size_t(r) * p.N + n + c] = sum;
      }
    }
  }
}

// Value i of each of 8 words, as floats still scaled by 2^(bits * i) (prepare_quant_x scales x to match); the top
// value is shifted down instead, since masking it in place would set the sign bit.
template <int BITS>
inline __m256 word_values(__m256i words, int i) {
  constexpr int per_word = 32 / BITS;
  if (i == per_word - 1) {
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(words, BITS * (per_word - 1)));
  }
  const int mask = ((1 << BITS) - 1) << (BITS * i);
  return _mm256_cvtepi32_ps(_mm256_and_si256(words, _mm256_set1_epi32(mask)));
}

// A block's scales: one group, or (4-bit with groups of 32) words 0-3 in one group and 4-7 in the next.
template <WeightType ST, bool TWO_GROUPS>
inline __m256 block_scales(const void* scales, size_t g) {
  if constexpr (TWO_GROUPS) {
    return _mm256_setr_m128(_mm_set1_ps(load_scalar(scales, g, ST)), _mm_set1_ps(load_scalar(scales, g + 1, ST)));
  } else {
    return _mm256_set1_ps(load_scalar(scales, g, ST));
  }
}

// R rows (1-4, in registers) x one column over blocks [b0, b1) of 8 words: acc[r] += scale * sum(value * x_words).
// The values of a block are unpacked once for all R rows.
template <int BITS, WeightType ST, bool TWO_GROUPS, int R>
inline void quant_strip(const uint32_t* column, const void* scales, size_t group_row, int group_shift,
                        const float* x_words, int ldx, int b0, int b1, __m256* acc_out) {
  constexpr int per_word = 32 / BITS, block = 8 * per_word;
  // Far enough ahead that memory answers before the loop gets there, for the stream of this column and the next.
  constexpr int kPrefetchWords = 512;
  __m256 acc[R];
  for (int r = 0; r < R; r++) {
    acc[r] = acc_out[r];
  }
  for (int b = b0; b < b1; b++) {
    _mm_prefetch(reinterpret_cast<const char*>(column + b * 8 + kPrefetchWords), _MM_HINT_T0);
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(column + b * 8));
    __m256 values[per_word];
    for (int i = 0; i < per_word; i++) {
      values[i] = word_values<BITS>(packed, i);
    }
    const __m256 scale = block_scales<ST, TWO_GROUPS>(scales, group_row + ((b * block) >> group_shift));
    for (int r = 0; r < R; r++) {
      const float* xw = x_words + size_t(r) * ldx + b * block;
      __m256 dot0 = _mm256_mul_ps(values[0], _mm256_loadu_ps(xw));
      __m256 dot1 = _mm256_mul_ps(values[1], _mm256_loadu_ps(xw + 8));
      for (int i = 2; i < per_word; i += 2) {
        dot0 = _mm256_fmadd_ps(values[i], _mm256_loadu_ps(xw + 8 * i), dot0);
        dot1 = _mm256_fmadd_ps(values[i + 1], _mm256_loadu_ps(xw + 8 * i + 8), dot1);
      }
      acc[r] = _mm256_fmadd_ps(scale, _mm256_add_ps(dot0, dot1), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    acc_out[r] = acc[r];
  }
}

template <int BITS, WeightType ST, bool TWO_GROUPS>
void quant_strip_rows(int R, const uint32_t* column, const void* scales, size_t group_row, int group_shift,
                      const float* x_words, int ldx, int b0, int b1, __m256* acc) {
  switch (R) {
    case 1:
      return quant_strip<BITS, ST, TWO_GROUPS, 1>(column, scales, group_row, group_shift, x_words, ldx, b0, b1, acc);
    case 2:
      return quant_strip<BITS, ST, TWO_GROUPS, 2>(column, scales, group_row, group_shift, x_words, ldx, b0, b1, acc);
    case 3:
      return quant_strip<BITS, ST, TWO_GROUPS, 3>(column, scales, group_row, group_shift, x_words, ldx, b0, b1, acc);
    default:
      return quant_strip<BITS, ST, TWO_GROUPS, 4>(column, scales, group_row, group_shift, x_words, ldx, b0, b1, acc);
  }
}

template <int BITS, WeightType ST, bool TWO_GROUPS>
void quant_columns(const QuantProduct& p, int n0, int n1) {
  constexpr int per_word = 32 / BITS, block = 8 * per_word;
  constexpr int kTile = 4;
  const int words = p.K / per_word, blocks = words / 8, groups = p.K / p.group;
  const int group_shift = __builtin_ctz(p.group);  // group sizes are powers of two
  // K in chunks whose x_words (every row) fill at most half of L1, so that they stay there while a tile of columns
  // passes over them; one row takes K whole.
  const int chunk_blocks = max_int(1, 16384 / (p.rows * block * 4));
  __m256 acc[kTile][kMaxRows];
  for (int n = n0; n < n1; n += kTile) {
    const int C = min_int(kTile, n1 - n);
    for (int c = 0; c < kTile; c++) {
      for (int m = 0; m < p.rows; m++) {
        acc[c][m] = _mm256_setzero_ps();
      }
    }
    for (int b0 = 0; b0 < blocks; b0 += chunk_blocks) {
      const int b1 = min_int(blocks, b0 + chunk_blocks);
      for (int c = 0; c < C; c++) {
        const uint32_t* column = p.w + size_t(n + c) * words;
        for (int m = 0; m < p.rows; m += 4) {
          quant_strip_rows<BITS, ST, TWO_GROUPS>(min_int(4, p.rows - m), column, p.scales, size_t(n + c) * groups,
                                                  group_shift, p.x_words + size_t(m) * p.ldx, p.ldx, b0, b1,
                                                  acc[c] + m);
        }
      }
    }
    for (int c = 0; c < C; c++) {
      const uint32_t* column = p.w + size_t(n + c) * words;
      const size_t group_row = size_t(n + c) * groups;
      // The biases: sum over groups of bias * (the group's sum of x).
      __m256 bias_acc[kMaxRows];
      for (int m = 0; m < p.rows; m++) {
        bias_acc[m] = _mm256_setzero_ps();
      }
      const int groups8 = groups & ~7;
      for (int g = 0; g < groups8; g += 8) {
        const __m256 bias = load8<ST>(p.biases, group_row + g);
        for (int m = 0; m < p.rows; m++) {
          bias_acc[m] = _mm256_fmadd_ps(bias, _mm256_loadu_ps(p.x_sums + size_t(m) * p.ldx + g), bias_acc[m]);
        }
      }
      float result[kMaxRows];
      for (int m = 0; m < p.rows; m++) {
        result[m] = horizontal_sum(_mm256_add_ps(acc[c][m], bias_acc[m]));
        for (int g = groups8; g < groups; g++) {
          result[m] += load_scalar(p.biases, group_row + g, ST) * p.x_sums[size_t(m) * p.ldx + g];
        }
      }
      // Words after the last whole block of 8 (K a multiple of 32 but not of 64, in 4 bits): scales here, biases
      // above.
      for (int w = blocks * 8; w < words; w++) {
        const float scale = load_scalar(p.scales, group_row + ((w * per_word) >> group_shift), ST);
        for (int i = 0; i < per_word; i++) {
          const float weight = scale * float((column[w] >> (BITS * i)) & ((1u << BITS) - 1));
          for (int m = 0; m < p.rows; m++) {
            result[m] += p.x[size_t(m) * p.ldx + w * per_word + i] * weight;
          }
        }
      }
      for (int m = 0; m < p.rows; m++) {
        p.out[size_t(m) * p.N + n + c] = result[m];
      }
    }
  }
}

template <int BITS, bool TWO_GROUPS>
void quant_columns_groups(const QuantProduct& p, int n0, int n1) {
  switch (p.stype) {
    case kFloat32:
      return quant_columns<BITS, kFloat32, TWO_GROUPS>(p, n0, n1);
    case kBFloat16:
      return quant_columns<BITS, kBFloat16, TWO_GROUPS>(p, n0, n1);
    default:
      return quant_columns<BITS, kFloat16, TWO_GROUPS>(p, n0, n1);
  }
}

// Packed weights (products.h): R rows x B blocks of 16 columns from column n on, over all of K. Per k each block's 16
// weights are two vectors and each row's x[k] one broadcast, each multiply-add into its own accumulator, so that every
// output is summed over k in order whatever R and B are. bfloat16 weights widen with one instruction per vector: a
// 32-bit word holds the block's columns 2i and 2i + 1, so shifting it left by 16 gives the even columns and masking
// its low half the odd ones; the two sets are put back in column order once, at the end. Few rows take several
// blocks at a time: one row's two accumulators alone would wait on the multiply-add's latency at every k.
template <WeightType WT, int R, int B>
void packed_tile(const float* x, int ldx, int K, const void* w, int n, float* out, int ldo) {
  __m256 acc[R][B][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) {
      acc[r][b][0] = acc[r][b][1] = _mm256_setzero_ps();
    }
  }
  const size_t first = packed_index(n, 0, K), block = size_t(K) * kPackColumns;
  const __m256i high_halves = _mm256_set1_epi32(int(0xffff0000u));
  for (int k = 0; k < K; k++) {
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) {
      const size_t index = first + b * block + size_t(k) * kPackColumns;
      __m256 low, high;  // columns 0-7 and 8-15, or (bfloat16) the even and the odd columns
      if constexpr (WT == kPackedFloat32) {
        low = _mm256_loadu_ps(static_cast<const float*>(w) + index);
        high = _mm256_loadu_ps(static_cast<const float*>(w) + index + 8);
      } else {
        const __m256i words =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + index));
        low = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
        high = _mm256_castsi256_ps(_mm256_and_si256(words, high_halves));
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) {
        const __m256 xv = _mm256_broadcast_ss(x + size_t(r) * ldx + k);
        acc[r][b][0] = _mm256_fmadd_ps(xv, low, acc[r][b][0]);
        acc[r][b][1] = _mm256_fmadd_ps(xv, high, acc[r][b][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) {
      float* o = out + size_t(r) * ldo + n + b * kPackColumns;
      __m256 first_half = acc[r][b][0], second_half = acc[r][b][1];
      if constexpr (WT != kPackedFloat32) {
        // (even, odd) per 128-bit lane: columns 0-3 | 8-11 and 4-7 | 12-15, then the halves in order.
        const __m256 lows = _mm256_unpacklo_ps(acc[r][b][0], acc[r][b][1]);
        const __m256 highs = _mm256_unpackhi_ps(acc[r][b][0], acc[r][b][1]);
        first_half = _mm256_permute2f128_ps(lows, highs, 0x20);
        second_half = _mm256_permute2f128_ps(lows, highs, 0x31);
      }
      _mm256_storeu_ps(o, first_half);
      _mm256_storeu_ps(o + 8, second_half);
    }
  }
}

// `blocks` blocks from column n on for R rows: as many blocks at a time as R leaves registers for (12 accumulators
// at most, beside the two weight vectors and a broadcast: 16 registers).
template <WeightType WT, int R>
void packed_blocks(const float* x, int ldx, int K, const void* w, int n, int blocks, float* out, int ldo) {
  constexpr int kMostBlocks = R == 1 ? 4 : R == 2 ? 2 : 1;
  for (int b = 0; b < blocks;) {
    const int column = n + b * kPackColumns;
    if constexpr (kMostBlocks >= 4) {
      if (blocks - b >= 4) {
        packed_tile<WT, R, 4>(x, ldx, K, w, column, out, ldo);
        b += 4;
        continue;
      }
    }
    if constexpr (kMostBlocks >= 2) {
      if (blocks - b >= 2) {
        packed_tile<WT, R, 2>(x, ldx, K, w, column, out, ldo);
        b += 2;
        continue;
      }
    }
    packed_tile<WT, R, 1>(x, ldx, K, w, column, out, ldo);
    b += 1;
  }
}

// packed_blocks for `rows` (1 to R) rows, the count made a template's.
template <WeightType WT, int R = 6>
void packed_rows(int rows, const float* x, int ldx, int K, const void* w, int n, int blocks, float* out, int ldo) {
  if constexpr (R > 1) {
    if (rows < R) {
      return packed_rows<WT, R - 1>(rows, x, ldx, K, w, n, blocks, out, ldo);
    }
  }
  packed_blocks<WT, R>(x, ldx, K, w, n, blocks, out, ldo);
}

// Columns [n0, n1) (multiples of 16) of packed weights: four blocks (64 columns) at a time, each for groups of up to 6
// rows in turn (12 accumulators, two weight vectors and a broadcast fill the 16 registers).
template <WeightType WT>
void packed_columns(const FloatProduct& p, int n0, int n1) {
  constexpr int kChunk = 4 * kPackColumns;
  for (int n = n0; n < n1; n += kChunk) {
    const int blocks = min_int(kChunk, n1 - n) / kPackColumns;
    for (int r = 0; r < p.rows;) {
      const int R = min_int(6, p.rows - r);
      packed_rows<WT>(R, p.x + size_t(r) * p.ldx, p.ldx, p.K, p.w, n, blocks, p.out + size_t(r) * p.N, p.N);
      r += R;
    }
  }
}

// Lanes 0-7 of v in [0, n) (n <= 8), the rest zero.
inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// e^x for x <= 0, 8 at a time, as exp_nonpositive in decoder_layer.cpp computes it (see products_avx512.cpp's).
inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), _mm256_set1_ps(0.5f)));
  const __m256 high = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145752f), x);
  const __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860677e-6f), high);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  constexpr float kTerms[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  for (const float c : kTerms) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i exponent =
      _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_max_ps(k, _mm256_set1_ps(-126.0f))), _mm256_set1_epi32(127));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23));
  return _mm256_and_ps(_mm256_mul_ps(p, scale), _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ));
}

// q . key for KEYS keys (`stride` floats apart) over d_kv floats, 8 at a time (the last vector masked): each key's
// multiply-adds in one chain, in the order of its floats, the keys' chains side by side so that each waits less on the
// multiply-add's latency. A key's sum is the same in a block of any size.
template <int KEYS>
inline void dot_keys8(const float* q, const float* key, int64_t stride, int chunks, __m256i last, __m256 (&acc)[KEYS]) {
#pragma GCC unroll 8
  for (int k = 0; k < KEYS; k++) {
    acc[k] = _mm256_setzero_ps();
  }
  for (int c = 0; c + 1 < chunks; c++) {
    const __m256 query = _mm256_loadu_ps(q + 8 * c);
#pragma GCC unroll 8
    for (int k = 0; k < KEYS; k++) {
      acc[k] = _mm256_fmadd_ps(query, _mm256_loadu_ps(key + k * stride + 8 * c), acc[k]);
    }
  }
  const int c = chunks - 1;
  const __m256 query = _mm256_maskload_ps(q + 8 * c, last);
#pragma GCC unroll 8
  for (int k = 0; k < KEYS; k++) {
    acc[k] = _mm256_fmadd_ps(query, _mm256_maskload_ps(key + k * stride + 8 * c, last), acc[k]);
  }
}

// The sums of the lanes of a, b, c and d, each as (l0 + l1) + (l2 + l3), plus (l4 + l5) + (l6 + l7).
inline __m128 sum_each8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

// The sum of the lanes of v, in sum_each8's order.
inline float sum_lanes8(__m256 v) {
  return _mm_cvtss_f32(sum_each8(v, v, v, v));
}

// Output vectors [c0, c0 + COUNT) of the values' sum weighted by p (n keys): the even and the odd keys in
// accumulators of their own, held in registers, added and divided by `total` at the end.
template <int COUNT>
inline void weighted_values8(const float* p, const float* values, int64_t value_stride, int n, int c0, int chunks,
                             __m256i last, __m256 total, float* out) {
  __m256 even[COUNT], odd[COUNT];
#pragma GCC unroll 4
  for (int c = 0; c < COUNT; c++) {
    even[c] = odd[c] = _mm256_setzero_ps();
  }
  const bool masked = c0 + COUNT == chunks;  // the last vector of the output is among these
  auto add = [&](__m256(&acc)[COUNT], int key) {
    const __m256 weight = _mm256_set1_ps(p[key]);
    const float* v = values + key * value_stride + 8 * c0;
#pragma GCC unroll 4
    for (int c = 0; c < COUNT; c++) {
      const __m256 value =
          masked && c + 1 == COUNT ? _mm256_maskload_ps(v + 8 * c, last) : _mm256_loadu_ps(v + 8 * c);
      acc[c] = _mm256_fmadd_ps(weight, value, acc[c]);
    }
  };
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    add(even, j);
    add(odd, j + 1);
  }
  if (j < n) {
    add(even, j);
  }
#pragma GCC unroll 4
  for (int c = 0; c < COUNT; c++) {
    const __m256 result = _mm256_div_ps(_mm256_add_ps(even[c], odd[c]), total);
    if (masked && c + 1 == COUNT) {
      _mm256_maskstore_ps(out + 8 * (c0 + c), last, result);
    } else {
      _mm256_storeu_ps(out + 8 * (c0 + c), result);
    }
  }
}

}  // namespace

// products_avx512.cpp's attention of one query with AVX2: eight keys' scores at a time (then four, then one), each
// key's lanes summed in one order whatever its block, the exponentials 8 at a time and their sum in 8 lanes (key j in
// lane j % 8), the values' weighted sum in registers (the even and the odd keys apart), divided by the sum once.
void attention_row_avx2(const float* q, const float* keys, int64_t key_stride, const float* values,
                        int64_t value_stride, int n, int d_kv, const float* bias, float* scores, float* out) {
  const int chunks = (d_kv + 7) / 8;
  const __m256i last = first_lanes(d_kv - 8 * (chunks - 1));
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 dots[8];
    dot_keys8<8>(q, keys + j * key_stride, key_stride, chunks, last, dots);
    __m128 low = sum_each8(dots[0], dots[1], dots[2], dots[3]), high = sum_each8(dots[4], dots[5], dots[6], dots[7]);
    if (bias) {
      low = _mm_add_ps(low, _mm_loadu_ps(bias + j));
      high = _mm_add_ps(high, _mm_loadu_ps(bias + j + 4));
    }
    _mm_storeu_ps(scores + j, low);
    _mm_storeu_ps(scores + j + 4, high);
  }
  for (; j + 4 <= n; j += 4) {
    __m256 dots[4];
    dot_keys8<4>(q, keys + j * key_stride, key_stride, chunks, last, dots);
    __m128 s = sum_each8(dots[0], dots[1], dots[2], dots[3]);
    if (bias) {
      s = _mm_add_ps(s, _mm_loadu_ps(bias + j));
    }
    _mm_storeu_ps(scores + j, s);
  }
  for (; j < n; j++) {
    __m256 dot[1];
    dot_keys8<1>(q, keys + j * key_stride, key_stride, chunks, last, dot);
    scores[j] = sum_lanes8(dot[0]) + (bias ? bias[j] : 0.0f);
  }
  // The largest score, 8 lanes at a time: a lane keeps its largest unless a score is larger (so that a NaN score is
  // passed over, as it is one at a time; a NaN first score is kept in every lane).
  __m256 largest8 = _mm256_set1_ps(scores[0]);
  for (j = 0; j < n; j += 8) {
    const __m256i valid = first_lanes(n - j);
    const __m256 s = _mm256_blendv_ps(largest8, _mm256_maskload_ps(scores + j, valid), _mm256_castsi256_ps(valid));
    largest8 = _mm256_max_ps(s, largest8);
  }
  __m128 largest4 = _mm_max_ps(_mm256_extractf128_ps(largest8, 1), _mm256_castps256_ps128(largest8));
  largest4 = _mm_max_ps(_mm_movehl_ps(largest4, largest4), largest4);
  const float largest = _mm_cvtss_f32(_mm_max_ss(_mm_movehdup_ps(largest4), largest4));
  __m256 sums = _mm256_setzero_ps();
  for (j = 0; j < n; j += 8) {
    const __m256i valid = first_lanes(n - j);
    const __m256 shifted = _mm256_sub_ps(_mm256_maskload_ps(scores + j, valid), _mm256_set1_ps(largest));
    const __m256 e = _mm256_and_ps(exp_nonpositive8(shifted), _mm256_castsi256_ps(valid));
    _mm256_maskstore_ps(scores + j, valid, e);
    sums = _mm256_add_ps(sums, e);
  }
  const __m256 total = _mm256_set1_ps(sum_lanes8(sums));
  for (int c0 = 0; c0 < chunks; c0 += 4) {  // 4 vectors of the output at a time
    switch (chunks - c0) {
      case 1:
        weighted_values8<1>(scores, values, value_stride, n, c0, chunks, last, total, out);
        break;
      case 2:
        weighted_values8<2>(scores, values, value_stride, n, c0, chunks, last, total, out);
        break;
      case 3:
        weighted_values8<3>(scores, values, value_stride, n, c0, chunks, last, total, out);
        break;
      default:
        weighted_values8<4>(scores, values, value_stride, n, c0, chunks, last, total, out);
    }
  }
}

void float_columns_avx2(const FloatProduct& p, int n0, int n1) {
  switch (p.wtype) {
    case kFloat32:
      return float_columns<kFloat32>(p, n0, n1);
    case kBFloat16:
      return float_columns<kBFloat16>(p, n0, n1);
    case kPackedBFloat16:
      return packed_columns<kPackedBFloat16>(p, n0, n1);
    case kPackedFloat32:
      return packed_columns<kPackedFloat32>(p, n0, n1);
    default:
      return float_columns<kFloat16>(p, n0, n1);
  }
}

void quant_columns_avx2(const QuantProduct& p, int n0, int n1) {
  if (p.bits == 8) {
    quant_columns_groups<8, false>(p, n0, n1);
  } else if (p.group == 32) {
    quant_columns_groups<4, true>(p, n0, n1);
  } else {
    quant_columns_groups<4, false>(p, n0, n1);
  }
}

}  // namespace t5kernels
