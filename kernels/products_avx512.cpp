// AVX-512 kernels (F, BW, VL, DQ; VNNI for the integer products, BF16 for pairs of bfloat16); this file alone is
// compiled with those flags and is called only after a run-time check. Each weight is read from memory once per
// block of rows and from L1 once per group of rows; every row is computed in the same order whatever the rows beside
// it, so a row's result never depends on the others.
#include <immintrin.h>

#include <cstdlib>
#include <limits>
#include <type_traits>

#include "products.h"

namespace t5kernels {
namespace {

// Not std::min: a template instantiated here with AVX-512 enabled could be picked by the linker for another path.
inline int min_int(int a, int b) {
  return a < b ? a : b;
}

inline int max_int(int a, int b) {
  return a > b ? a : b;
}

// f(std::integral_constant<int, N>{}) for N = n, 1 to Max (Max for n >= Max): a count known at run time (rows of a
// tile, its columns) as a template's.
template <int Max, class F>
void with_count(int n, F&& f) {
  if constexpr (Max == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (n >= Max) {
    f(std::integral_constant<int, Max>{});
  } else {
    with_count<Max - 1>(n, f);
  }
}

// 16 weights from index on, the first `valid` only (the rest zero) where TAIL.
template <WeightType WT, bool TAIL>
inline __m512 load16(const void* w, size_t index, __mmask16 valid) {
  if constexpr (WT == kFloat32) {
    const float* p = static_cast<const float*>(w) + index;
    return TAIL ? _mm512_maskz_loadu_ps(valid, p) : _mm512_loadu_ps(p);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w) + index;
    const __m256i half =
        TAIL ? _mm256_maskz_loadu_epi16(valid, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (WT == kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    } else {
      return _mm512_cvtph_ps(half);
    }
  }
}

// R rows x C columns over k in [k0, k1) (k1 - k0 a multiple of 16 but where k1 = K), accumulating into acc[r][c].
template <WeightType WT, int R, int C>
void float_tile(const float* x, int ldx, int K, const void* w, int n, int k0, int k1, __m512 (*acc)[4]) {
  constexpr int kBytes = WT == kFloat32 ? 4 : 2;
  __m512 a[R][C];
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      a[r][c] = acc[r][c];
    }
  }
  auto step = [&](int k, auto tail, __mmask16 valid) {
    constexpr bool TAIL = decltype(tail)::value;
    __m512 wv[C];
    for (int c = 0; c < C; c++) {
      const size_t index = size_t(n + c) * K + k;
      if (!TAIL && (k & (64 / kBytes - 1)) == 0) {  // once per cache line, 2 KB ahead
        _mm_prefetch(static_cast<const char*>(w) + index * kBytes + 2048, _MM_HINT_T0);
      }
      wv[c] = load16<WT, TAIL>(w, index, valid);
    }
    for (int r = 0; r < R; r++) {
      const float* xr = x + size_t(r) * ldx + k;
      const __m512 xv = TAIL ? _mm512_maskz_loadu_ps(valid, xr) : _mm512_loadu_ps(xr);
      for (int c = 0; c < C; c++) {
        a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
      }
    }
  };
  int k = k0;
  for (; k + 16 <= k1; k += 16) {
    step(k, std::false_type{}, 0xffff);
  }
  if (k < k1) {
    step(k, std::true_type{}, __mmask16((1u << (k1 - k)) - 1));
  }
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      acc[r][c] = a[r][c];
    }
  }
}

// The same with bfloat16 weights and bfloat16 x, 32 at a time in pairs (vdpbf16ps: products exact, sums in float32).
template <int R, int C>
void pair_tile(const uint16_t* x, int ldx, int K, const uint16_t* w, int n, int k0, int k1, __m512 (*acc)[4]) {
  __m512 a[R][C];
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      a[r][c] = acc[r][c];
    }
  }
  auto step = [&](int k, auto tail, __mmask32 valid) {
    constexpr bool TAIL = decltype(tail)::value;
    __m512i wv[C];
    for (int c = 0; c < C; c++) {
      const uint16_t* p = w + size_t(n + c) * K + k;
      if (!TAIL && (k & 31) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
      }
      wv[c] = TAIL ? _mm512_maskz_loadu_epi16(valid, p) : _mm512_loadu_si512(p);
    }
    for (int r = 0; r < R; r++) {
      const uint16_t* xr = x + size_t(r) * ldx + k;
      const __m512i xv = TAIL ? _mm512_maskz_loadu_epi16(valid, xr) : _mm512_loadu_si512(xr);
      for (int c = 0; c < C; c++) {
        a[r][c] = _mm512_dpbf16_ps(a[r][c], (__m512bh)xv, (__m512bh)wv[c]);
      }
    }
  };
  int k = k0;
  for (; k + 32 <= k1; k += 32) {
    step(k, std::false_type{}, 0xffffffffu);
  }
  if (k < k1) {
    step(k, std::true_type{}, __mmask32((1ull << (k1 - k)) - 1));
  }
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      acc[r][c] = a[r][c];
    }
  }
}

// The sums of the lanes of a, b, c and d, each added in the order _mm512_reduce_add_ps adds (the halves, the
// quarters, then pairs), so the results are the same, for a third of its shuffles.
inline __m128 sum_each(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Lanes 0-7: a's halves summed, 8-15: b's (and c, d).
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
  // Each 128-bit lane: one vector's quarters summed (a, b, c, d in turn).
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
  const __m512 pairs = _mm512_add_ps(q, _mm512_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 sums = _mm512_add_ps(pairs, _mm512_shuffle_ps(pairs, pairs, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), sums));
}

// The bfloat16 weights' order of k: per block of 32, the 16 even k, then the 16 odd ones. A 64-byte load of 32
// bfloat16 weights becomes two float32 vectors with one instruction each (the low halves shifted up, the high halves
// masked), so x's rows are rearranged the same way once per call (split_even_odd) instead of the weights per row.
constexpr int kSplitBlock = 32;

inline int split_stride(int K) {
  // Rounded up to whole blocks, and 16 floats more so that rows a power of two apart do not share L1 sets.
  return (K + kSplitBlock - 1) / kSplitBlock * kSplitBlock + 16;
}

// x's rows (K floats, ldx apart) -> out's (split_stride(K) apart), each block of 32 as its even k then its odd k,
// zero past K.
void split_even_odd(const float* x, int ldx, int rows, int K, float* out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int ld = split_stride(K);
  for (int r = 0; r < rows; r++) {
    const float* row = x + size_t(r) * ldx;
    float* dst = out + size_t(r) * ld;
    for (int k = 0; k < K; k += kSplitBlock) {
      const int left = K - k;
      const __mmask16 low = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __mmask16 high = left >= 32 ? __mmask16(0xffff) : left <= 16 ? 0 : __mmask16((1u << (left - 16)) - 1);
      const __m512 a = _mm512_maskz_loadu_ps(low, row + k), b = _mm512_maskz_loadu_ps(high, row + k + 16);
      _mm512_storeu_ps(dst + k, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(dst + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
  }
}

// R rows x C columns of bfloat16 weights over k in [k0, k1) (k0 a multiple of 32), x split as split_even_odd writes it
// (rows ldx apart), accumulating into acc[r][c]: per 32 k, each column's weights widened once for all R rows.
template <int R, int C>
void split_tile(const float* x, int ldx, int K, const uint16_t* w, int n, int k0, int k1, __m512 (*acc)[4]) {
  __m512 a[R][C];
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      a[r][c] = acc[r][c];
    }
  }
  const __m512i high_halves = _mm512_set1_epi32(int(0xffff0000u));
  for (int k = k0; k < k1; k += kSplitBlock) {
    __m512 even[C], odd[C];
    for (int c = 0; c < C; c++) {
      const uint16_t* p = w + size_t(n + c) * K + k;
      __m512i packed;
      if (k1 - k >= kSplitBlock) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
        packed = _mm512_loadu_si512(p);
      } else {
        packed = _mm512_maskz_loadu_epi16(__mmask32((1ull << (k1 - k)) - 1), p);
      }
      even[c] = _mm512_castsi512_ps(_mm512_slli_epi32(packed, 16));
      odd[c] = _mm512_castsi512_ps(_mm512_and_si512(packed, high_halves));
    }
    for (int r = 0; r < R; r++) {
      __m512 xe = _mm512_loadu_ps(x + size_t(r) * ldx + k);
      __m512 xo = _mm512_loadu_ps(x + size_t(r) * ldx + k + 16);
      if constexpr (R > 4) {
        // In registers: the compiler would otherwise fold a load of x into each column's multiply-add.
        __asm__("" : "+v"(xe), "+v"(xo));
      }
      for (int c = 0; c < C; c++) {
        a[r][c] = _mm512_fmadd_ps(xe, even[c], a[r][c]);
        a[r][c] = _mm512_fmadd_ps(xo, odd[c], a[r][c]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    for (int c = 0; c < C; c++) {
      acc[r][c] = a[r][c];
    }
  }
}

// Rows [r, r + R) of bfloat16 weights' columns n.. n + C (C <= 4): up to 4 rows take the 4 columns at once, more rows
// two columns at a time (their accumulators fill the registers).
template <int R>
void split_rows(int C, const float* x, int ldx, int K, const uint16_t* w, int n, int k0, int k1, __m512 (*acc)[4]) {
  if constexpr (R <= 4) {
    with_count<4>(C, [&](auto columns) { split_tile<R, decltype(columns)::value>(x, ldx, K, w, n, k0, k1, acc); });
  } else {
    __m512 pair[R][4];  // split_tile's accumulators for columns c, c + 1
    for (int c = 0; c < C; c += 2) {
      for (int r = 0; r < R; r++) {
        pair[r][0] = acc[r][c];
        pair[r][1] = c + 1 < C ? acc[r][c + 1] : _mm512_setzero_ps();
      }
      if (c + 1 < C) {
        split_tile<R, 2>(x, ldx, K, w, n + c, k0, k1, pair);
      } else {
        split_tile<R, 1>(x, ldx, K, w, n + c, k0, k1, pair);
      }
      for (int r = 0; r < R; r++) {
        acc[r][c] = pair[r][0];
        if (c + 1 < C) {
          acc[r][c + 1] = pair[r][1];
        }
      }
    }
  }
}

// Columns [n0, n1) of p in tiles of 4: every row's accumulators start at zero, K goes in chunks of k_chunk, each
// chunk's rows in groups of at most `group` rows (tile(first row, rows, C, n, k0, k1, acc) accumulates them), then each
// row's four sums are stored.
template <class Tile>
void column_tiles(const FloatProduct& p, int n0, int n1, int group, int k_chunk, Tile&& tile) {
  __m512 acc[kMaxRows][4];
  for (int n = n0; n < n1; n += 4) {
    const int C = min_int(4, n1 - n);
    for (int r = 0; r < p.rows; r++) {
      for (int c = 0; c < 4; c++) {
        acc[r][c] = _mm512_setzero_ps();
      }
    }
    for (int k0 = 0; k0 < p.K; k0 += k_chunk) {
      const int k1 = min_int(p.K, k0 + k_chunk);
      for (int r = 0; r < p.rows; r += group) {
        tile(r, min_int(group, p.rows - r), C, n, k0, k1, acc + r);
      }
    }
    for (int r = 0; r < p.rows; r++) {
      for (int c = C; c < 4; c++) {
        acc[r][c] = _mm512_setzero_ps();
      }
      _mm_mask_storeu_ps(p.out + size_t(r) * p.N + n, __mmask8((1u << C) - 1),
                         sum_each(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    }
  }
}

// bfloat16 weights and float32 x: x split into even and odd k once, then tiles of up to 12 rows. Up to 12 rows pass
// over the weights once (two columns at a time, 2 x 12 accumulators fill the registers: 9 rows as one group took
// 0.72 ms a demo step against 0.84 as 8 + 1); more rows go 8 at a time.
void split_columns(const FloatProduct& p, int n0, int n1) {
  constexpr int kMaxGroup = 12, kRowGroup = 8;
  const int group = p.rows <= kMaxGroup ? p.rows : kRowGroup;
  const int ld = split_stride(p.K);
  thread_local float* split = nullptr;
  thread_local size_t capacity = 0;
  const size_t need = size_t(p.rows) * ld;
  if (need > capacity) {
    std::free(split);
    split = static_cast<float*>(std::aligned_alloc(64, need * sizeof(float) / 64 * 64 + 64));
    capacity = need;
  }
  split_even_odd(p.x, p.ldx, p.rows, p.K, split);
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  // K in chunks whose x (every row) fills at most a third of L1, so that a tile's weights stay in L1 while each
  // group of rows passes over them; one group takes K whole.
  const int k_chunk = p.rows <= group ? p.K : max_int(kSplitBlock, 16384 / (p.rows * 4) / kSplitBlock * kSplitBlock);
  column_tiles(p, n0, n1, group, k_chunk, [&](int r, int rows, int C, int n, int k0, int k1, __m512(*acc)[4]) {
    const float* xr = split + size_t(r) * ld;
    with_count<kMaxGroup>(rows, [&](auto count) {
      split_rows<decltype(count)::value>(C, xr, ld, p.K, w, n, k0, k1, acc);
    });
  });
}

// Rows [r, r + R) of p against C columns from n on; acc: those rows' accumulators.
template <WeightType WT, bool PAIRS, int R>
void tile_rows(int C, const FloatProduct& p, int r, int n, int k0, int k1, __m512 (*acc)[4]) {
  with_count<4>(C, [&](auto columns) {
    constexpr int kC = decltype(columns)::value;
    if constexpr (PAIRS) {
      pair_tile<R, kC>(p.x_bf16 + size_t(r) * p.ldx, p.ldx, p.K, static_cast<const uint16_t*>(p.w), n, k0, k1,
                       acc);
    } else {
      float_tile<WT, R, kC>(p.x + size_t(r) * p.ldx, p.ldx, p.K, p.w, n, k0, k1, acc);
    }
  });
}

template <WeightType WT, bool PAIRS>
void float_columns(const FloatProduct& p, int n0, int n1) {
  // K in chunks whose x (every row) fills at most a third of L1, so that a tile's weights stay in L1 while each
  // group of 4 rows passes over them; up to 4 rows take K whole.
  const int k_chunk = p.rows <= 4 ? p.K : max_int(64, 16384 / (p.rows * 4) / 64 * 64);
  column_tiles(p, n0, n1, 4, k_chunk, [&](int r, int rows, int C, int n, int k0, int k1, __m512(*acc)[4]) {
    with_count<4>(rows, [&](auto count) { tile_rows<WT, PAIRS, decltype(count)::value>(C, p, r, n, k0, k1, acc); });
  });
}

// The integer products. A block is 64 bytes of one column's weights: 64 values of 8 bits or 128 of 4 bits, and lane
// l of vpdpbusd sums the 4 products of bytes 4l..4l+3, so a lane holds 4 (8-bit) or 8 (4-bit) consecutive k and a
// group spans group * bits / 32 lanes. A step is one block where a group spans at most 16 lanes, else one group.
template <int BITS, int GROUP>
struct Layout {
  static constexpr int kLanesPerGroup = GROUP * BITS / 32;
  static constexpr int kBlocksPerStep = kLanesPerGroup > 16 ? kLanesPerGroup / 16 : 1;
  static constexpr int kGroupsPerStep = kLanesPerGroup > 16 ? 1 : 16 / kLanesPerGroup;
  static constexpr int kValuesPerBlock = 512 / BITS;
};

// The weights' scales of a step's groups, one per lane; groups past the last (a partial step) zero.
template <WeightType ST, int GROUPS, int LANES_PER_GROUP>
inline __m512 step_scales(const void* scales, size_t first, int valid) {
  if constexpr (GROUPS == 1) {
    return _mm512_set1_ps(load_scalar(scales, first, ST));
  } else {
    const __mmask8 mask = __mmask8((1u << min_int(valid, GROUPS)) - 1);
    __m128 values;
    if constexpr (ST == kFloat32) {
      values = _mm_maskz_loadu_ps(mask, static_cast<const float*>(scales) + first);
    } else {
      const __m128i half = _mm_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(scales) + first);
      if constexpr (ST == kBFloat16) {
        values = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(half), 16));
      } else {
        values = _mm_cvtph_ps(half);
      }
    }
    // lane l takes group l / LANES_PER_GROUP
    const __m512i index = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            __builtin_ctz(LANES_PER_GROUP));
    return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(values));
  }
}

// Rows [0, R) of a row group against one column over steps [s0, s1): integer dots per step, then
// facc[r] += float(dot) * w_scale * x_scale per lane, or (DOTS) the dots added to p.dots.
template <int BITS, int GROUP, WeightType ST, bool DOTS, int R>
void int_strip(const IntProduct& p, int n, int m0, int s0, int s1, __m512* facc) {
  using L = Layout<BITS, GROUP>;
  const int groups = p.K / GROUP, words = p.K * BITS / 32;
  const int full_blocks = words / 16, tail_bytes = (words % 16) * 4;
  const char* column = reinterpret_cast<const char*>(p.w + size_t(n) * words);
  const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
  __m512 a[R];
  for (int r = 0; r < R; r++) {
    a[r] = facc[r];
  }
  for (int s = s0; s < s1; s++) {
    __m512i dot[R];
    for (int r = 0; r < R; r++) {
      dot[r] = _mm512_setzero_si512();
    }
    for (int j = 0; j < L::kBlocksPerStep; j++) {
      const int b = s * L::kBlocksPerStep + j;
      const char* block = column + size_t(b) * 64;
      _mm_prefetch(block + 1024, _MM_HINT_T0);
      const __m512i packed = b < full_blocks ? _mm512_loadu_si512(block)
                                             : _mm512_maskz_loadu_epi8(__mmask64((1ull << tail_bytes) - 1), block);
      if constexpr (BITS == 8) {
        for (int r = 0; r < R; r++) {
          const int8_t* q = p.xq + size_t(m0 + r) * p.ldq + size_t(b) * 64;
          dot[r] = _mm512_dpbusd_epi32(dot[r], packed, _mm512_loadu_si512(q));
        }
      } else {
        const __m512i even = _mm512_and_si512(packed, low_nibbles);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
        for (int r = 0; r < R; r++) {
          const int8_t* q = p.xq + size_t(m0 + r) * p.ldq + size_t(b) * 128;
          dot[r] = _mm512_dpbusd_epi32(dot[r], even, _mm512_loadu_si512(q));
          dot[r] = _mm512_dpbusd_epi32(dot[r], odd, _mm512_loadu_si512(q + 64));
        }
      }
    }
    const int first_group = s * L::kGroupsPerStep;
    if constexpr (DOTS) {
      for (int r = 0; r < R; r++) {
        alignas(64) int32_t lanes[16];
        _mm512_store_si512(lanes, dot[r]);
        int32_t* out = p.dots + (size_t(m0 + r) * p.N + n) * groups;
        for (int l = 0; l < 16; l++) {
          const int g = first_group + (L::kGroupsPerStep == 1 ? 0 : l / L::kLanesPerGroup);
          if (g < groups) {
            out[g] += lanes[l];
          }
        }
      }
    } else {
      const __m512 w_scales = step_scales<ST, L::kGroupsPerStep, (L::kLanesPerGroup < 16 ? L::kLanesPerGroup : 16)>(
          p.scales, size_t(n) * groups + first_group, groups - first_group);
      for (int r = 0; r < R; r++) {
        const __m512 x_scales = _mm512_loadu_ps(p.x_lane_scales + size_t(m0 + r) * p.ldl + s * 16);
        a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_mul_ps(w_scales, x_scales), a[r]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    facc[r] = a[r];
  }
}

template <int BITS, int GROUP, WeightType ST, bool DOTS>
void int_columns(const IntProduct& p, int n0, int n1) {
  using L = Layout<BITS, GROUP>;
  constexpr int kRowGroup = 8;
  const int groups = p.K / GROUP;
  const int blocks = (p.K * BITS / 8 + 63) / 64;
  const int steps = (blocks + L::kBlocksPerStep - 1) / L::kBlocksPerStep;
  // Steps in chunks whose x (every row) fills at most a third of L1, so that the column's chunk stays in L1 while
  // each group of 8 rows passes over it.
  const int step_bytes = 64 * L::kBlocksPerStep * 8 / BITS;
  const int chunk = max_int(1, 16384 / (p.rows * step_bytes));
  __m512 facc[kMaxRows];
  for (int n = n0; n < n1; n++) {
    for (int r = 0; r < p.rows; r++) {
      facc[r] = _mm512_setzero_ps();
    }
    for (int s0 = 0; s0 < steps; s0 += chunk) {
      const int s1 = min_int(steps, s0 + chunk);
      for (int m = 0; m < p.rows; m += kRowGroup) {
        with_count<kRowGroup>(p.rows - m, [&](auto rows) {
          int_strip<BITS, GROUP, ST, DOTS, decltype(rows)::value>(p, n, m, s0, s1, facc + m);
        });
      }
    }
    if constexpr (!DOTS) {
      // The biases: sum over groups of w_bias * (the group's sum of x), 16 groups at a time.
      const size_t group_row = size_t(n) * groups;
      for (int m = 0; m < p.rows; m++) {
        __m512 bias_acc = _mm512_setzero_ps();
        for (int g = 0; g < groups; g += 16) {
          const __mmask16 valid = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
          const __m512 bias = load16<ST, true>(p.biases, group_row + g, valid);
          bias_acc = _mm512_fmadd_ps(bias, _mm512_maskz_loadu_ps(valid, p.x_sums + size_t(m) * p.lds + g), bias_acc);
        }
        p.out[size_t(m) * p.N + n] = _mm512_reduce_add_ps(facc[m]) + _mm512_reduce_add_ps(bias_acc);
      }
    }
  }
}

// Packed quantized weights (products.h) with int8 activations: R rows x CB blocks of 16 columns from column n on. A
// 64-byte load is one word of each of the block's 16 columns, and vpdpbusd multiplies its bytes by 4 bytes of a row's
// q, broadcast: lane l sums column l's products, so each group's dot accumulates in int32 over the group's words, to be
// scaled once per group and row (out += scale * (dot * x_scale) + bias * sum(x)), not once per 64 bytes of one column.
// 4 bytes of q read as one int32 (each broadcast to every lane: the load folds into vpdpbusd's operand).
typedef int32_t UnalignedInt32 __attribute__((__may_alias__, __aligned__(1)));

template <int BITS, bool DOTS, WeightType ST, int R, int CB>
void packed_int_tile(const IntProduct& p, int m0, int n, int g0, int g1) {
  constexpr int kPerWord = 32 / BITS;
  const int groups = p.K / p.group, words_per_group = p.group / kPerWord;
  const size_t block = size_t(p.K) / kPerWord * kPackColumns;  // words of one block of 16 columns
  const uint32_t* w = p.w + size_t(n / kPackColumns) * block;
  const size_t first_scale = size_t(n / kPackColumns) * groups * kPackColumns;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
  const int8_t* q[R];
  __m512 acc[R][CB];
  for (int r = 0; r < R; r++) {
    q[r] = p.xq + size_t(m0 + r) * p.ldq;
    for (int c = 0; c < CB; c++) {
      // (the sums of the groups before g0, stored as they were: the same float32 values)
      acc[r][c] = DOTS || g0 == 0 ? _mm512_setzero_ps()
                                  : _mm512_loadu_ps(p.out + size_t(m0 + r) * p.N + n + c * kPackColumns);
    }
  }
  for (int g = g0; g < g1; g++) {
    __m512i dot[R][CB];
    for (int r = 0; r < R; r++) {
      for (int c = 0; c < CB; c++) {
        dot[r][c] = _mm512_setzero_si512();
      }
    }
    for (int i = g * words_per_group; i < (g + 1) * words_per_group; i++) {
      __m512i words[CB];
#pragma GCC unroll 4
      for (int c = 0; c < CB; c++) {
        words[c] = _mm512_loadu_si512(w + c * block + size_t(i) * kPackColumns);
      }
      if constexpr (BITS == 8) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
          const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const UnalignedInt32*>(q[r] + 4 * size_t(i)));
#pragma GCC unroll 4
          for (int c = 0; c < CB; c++) {
            dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], words[c], xb);
          }
        }
      } else {
        __m512i even[CB], odd[CB];
#pragma GCC unroll 4
        for (int c = 0; c < CB; c++) {
          even[c] = _mm512_and_si512(words[c], low_nibbles);
          odd[c] = _mm512_and_si512(_mm512_srli_epi16(words[c], 4), low_nibbles);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
          const auto* four = reinterpret_cast<const UnalignedInt32*>(q[r] + 8 * size_t(i));
          const __m512i x_even = _mm512_set1_epi32(four[0]), x_odd = _mm512_set1_epi32(four[1]);
#pragma GCC unroll 4
          for (int c = 0; c < CB; c++) {
            dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], even[c], x_even);
            dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], odd[c], x_odd);
          }
        }
      }
    }
    if constexpr (DOTS) {
      for (int r = 0; r < R; r++) {
        for (int c = 0; c < CB; c++) {
          alignas(64) int32_t lanes[16];
          _mm512_store_si512(lanes, dot[r][c]);
          for (int l = 0; l < 16; l++) {
            p.dots[(size_t(m0 + r) * p.N + n + c * kPackColumns + l) * groups + g] = lanes[l];
          }
        }
      }
    } else {
#pragma GCC unroll 4
      for (int c = 0; c < CB; c++) {
        const size_t index = first_scale + (size_t(c) * groups + g) * kPackColumns;
        const __m512 scale = load16<ST, false>(p.scales, index, 0), bias = load16<ST, false>(p.biases, index, 0);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
          const size_t at = size_t(m0 + r) * p.lds + g;
          const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][c]), _mm512_set1_ps(p.x_scales[at]));
          acc[r][c] = _mm512_fmadd_ps(scale, scaled, acc[r][c]);
          acc[r][c] = _mm512_fmadd_ps(bias, _mm512_set1_ps(p.x_sums[at]), acc[r][c]);
        }
      }
    }
  }
  if constexpr (!DOTS) {
    for (int r = 0; r < R; r++) {
      for (int c = 0; c < CB; c++) {
        _mm512_storeu_ps(p.out + size_t(m0 + r) * p.N + n + c * kPackColumns, acc[r][c]);
      }
    }
  }
}

// Columns [n0, n1) of packed quantized weights, rows in groups of at most 5, as even as they go (a verification of 4
// drafts is one group, 8 rows two of 4): one row takes 4 blocks of 16 columns at once, more rows 2 (their int32 dots
// and float sums, 2 x R x CB registers, and the blocks' widened words fill at most 26). K goes in chunks of groups whose
// weights, 64 columns of them, fit in 32 KB, so that every group of rows reads a chunk from the caches, not memory (a
// row's sums so far wait in out between chunks).
template <int BITS, bool DOTS, WeightType ST>
void packed_int_columns(const IntProduct& p, int n0, int n1) {
  constexpr int kMaxRowGroup = 5;
  const int groups = p.K / p.group, row_groups = (p.rows + kMaxRowGroup - 1) / kMaxRowGroup;
  const int chunk = p.rows <= 1 ? groups : max_int(1, 32768 / (4 * kPackColumns * p.group * BITS / 8));
  for (int g0 = 0; g0 < groups; g0 += chunk) {
    const int g1 = min_int(groups, g0 + chunk);
    for (int i = 0, m = 0; i < row_groups; i++) {
      const int count = (p.rows - m) / (row_groups - i);  // the rows left, spread over the groups left
      with_count<kMaxRowGroup>(count, [&](auto rows) {
        constexpr int R = decltype(rows)::value, CB = R == 1 ? 4 : 2;
        int n = n0;
        for (; n + CB * kPackColumns <= n1; n += CB * kPackColumns) {
          packed_int_tile<BITS, DOTS, ST, R, CB>(p, m, n, g0, g1);
        }
        for (; n < n1; n += kPackColumns) {
          packed_int_tile<BITS, DOTS, ST, R, 1>(p, m, n, g0, g1);
        }
      });
      m += count;
    }
  }
}

// f<ST>() for a quantized weight's scale type (float32, bfloat16 or float16, as the checkpoint stores them).
template <class F>
void with_scale_type(WeightType stype, F&& f) {
  switch (stype) {
    case kFloat32:
      return f(std::integral_constant<WeightType, kFloat32>{});
    case kBFloat16:
      return f(std::integral_constant<WeightType, kBFloat16>{});
    default:
      return f(std::integral_constant<WeightType, kFloat16>{});
  }
}

template <int BITS, int GROUP, bool DOTS>
void int_columns_scales(const IntProduct& p, int n0, int n1) {
  with_scale_type(p.stype, [&](auto stype) { int_columns<BITS, GROUP, decltype(stype)::value, DOTS>(p, n0, n1); });
}

template <bool DOTS>
void int_columns_any(const IntProduct& p, int n0, int n1) {
  const int key = p.bits * 1000 + p.group;
  switch (key) {
    case 4032:
      return int_columns_scales<4, 32, DOTS>(p, n0, n1);
    case 4064:
      return int_columns_scales<4, 64, DOTS>(p, n0, n1);
    case 4128:
      return int_columns_scales<4, 128, DOTS>(p, n0, n1);
    case 8032:
      return int_columns_scales<8, 32, DOTS>(p, n0, n1);
    case 8064:
      return int_columns_scales<8, 64, DOTS>(p, n0, n1);
    default:
      return int_columns_scales<8, 128, DOTS>(p, n0, n1);
  }
}

// A packed tile's R x CB accumulators, zeroed.
template <int R, int CB>
inline void zero_tile(__m512 (&acc)[R][CB]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
    for (int c = 0; c < CB; c++) {
      acc[r][c] = _mm512_setzero_ps();
    }
  }
}

// One k of a packed tile: each row's x[k] (rows ldx apart), broadcast, times each block's 16 values, into that row's
// and block's accumulator.
template <int R, int CB>
inline void multiply_add_rows(__m512 (&acc)[R][CB], const float* x, int ldx, int k, const __m512 (&values)[CB]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; r++) {
    const __m512 xv = _mm512_set1_ps(x[size_t(r) * ldx + k]);
#pragma GCC unroll 4
    for (int c = 0; c < CB; c++) {
      acc[r][c] = _mm512_fmadd_ps(xv, values[c], acc[r][c]);
    }
  }
}

// Packed weights (products.h): R rows x CB blocks of 16 columns from column n on, over all of K. Per k, each block's
// 16 weights are one vector, and each row's x[k] one broadcast: R x CB multiply-adds, each into its own accumulator,
// so that every output is summed over k in order whatever R and CB are.
template <WeightType WT, int R, int CB>
void packed_tile(const float* x, int ldx, int K, const void* w, int n, float* out, int ldo) {
  __m512 acc[R][CB];
  zero_tile(acc);
  const size_t first = packed_index(n, 0, K), block = size_t(K) * kPackColumns;
  for (int k = 0; k < K; k++) {
    __m512 wv[CB];
#pragma GCC unroll 4
    for (int c = 0; c < CB; c++) {
      const size_t index = first + c * block + size_t(k) * kPackColumns;
      if constexpr (WT == kPackedFloat32) {
        wv[c] = _mm512_loadu_ps(static_cast<const float*>(w) + index);
      } else {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + index));
        wv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
      }
    }
    multiply_add_rows(acc, x, ldx, k, wv);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
    for (int c = 0; c < CB; c++) {
      _mm512_storeu_ps(out + size_t(r) * ldo + n + c * kPackColumns, acc[r][c]);
    }
  }
}

// Columns [n0, n1) (multiples of 16) of packed weights for all of `rows` rows (at most kMaxRows) at once, in tiles of
// packed_blocks(rows) blocks (R x CB accumulators fill at most 24 registers; 27 spilled): tile(R, CB, n) for each,
// R and CB as std::integral_constant.
template <class Tile>
void packed_tiles(int rows, int n0, int n1, Tile&& tile) {
  with_count<kMaxRows>(rows, [&](auto count) {
    constexpr int R = decltype(count)::value;
    constexpr int CB = packed_blocks(R);
    int n = n0;
    for (; n + CB * kPackColumns <= n1; n += CB * kPackColumns) {
      tile(count, std::integral_constant<int, CB>{}, n);
    }
    for (; n < n1; n += kPackColumns) {
      tile(count, std::integral_constant<int, 1>{}, n);
    }
  });
}

template <WeightType WT>
void packed_columns(const FloatProduct& p, int n0, int n1) {
  packed_tiles(p.rows, n0, n1, [&](auto rows, auto blocks, int n) {
    packed_tile<WT, decltype(rows)::value, decltype(blocks)::value>(p.x, p.ldx, p.K, p.w, n, p.out, p.N);
  });
}

// Packed quantized weights (products.h): R rows x CB blocks of 16 columns from column n on. A 64-byte load is one
// word of each of the block's 16 columns, 32 / BITS consecutive k; value j of every column (a shift and a mask, no
// shuffles) widened to floats is multiplied by each row's x[k], broadcast. At the end of each group,
// out += scale * sum + bias * sum(x of the group), per row and column.
template <int BITS, WeightType ST, int R, int CB>
void packed_quant_tile(const QuantProduct& p, int n) {
  constexpr int kPerWord = 32 / BITS;
  const int K = p.K, group = p.group, groups = K / group;
  const size_t block = size_t(K) / kPerWord * kPackColumns;  // words of one block
  const uint32_t* w = p.w + size_t(n / kPackColumns) * block;
  const size_t first_scale = size_t(n / kPackColumns) * groups * kPackColumns;
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  for (int g = 0; g < groups; g++) {
    __m512 acc[R][CB];
    zero_tile(acc);
    for (int k = g * group; k < (g + 1) * group; k += kPerWord) {
      __m512i words[CB];
#pragma GCC unroll 4
      for (int c = 0; c < CB; c++) {
        words[c] = _mm512_loadu_si512(w + c * block + size_t(k / kPerWord) * kPackColumns);
      }
#pragma GCC unroll 8
      for (int j = 0; j < kPerWord; j++) {
        __m512 values[CB];
#pragma GCC unroll 4
        for (int c = 0; c < CB; c++) {
          __m512i v = j ? _mm512_srli_epi32(words[c], BITS * j) : words[c];
          values[c] = _mm512_cvtepi32_ps(j + 1 < kPerWord ? _mm512_and_si512(v, mask) : v);
        }
        multiply_add_rows(acc, p.x, p.ldx, k + j, values);
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < CB; c++) {
      const size_t index = first_scale + (size_t(c) * groups + g) * kPackColumns;
      const __m512 scale = load16<ST, false>(p.scales, index, 0), bias = load16<ST, false>(p.biases, index, 0);
#pragma GCC unroll 16
      for (int r = 0; r < R; r++) {
        float* out = p.out + size_t(r) * p.N + n + c * kPackColumns;
        __m512 total = g ? _mm512_loadu_ps(out) : _mm512_setzero_ps();
        total = _mm512_fmadd_ps(scale, acc[r][c], total);
        total = _mm512_fmadd_ps(bias, _mm512_set1_ps(p.x_sums[size_t(r) * p.ldx + g]), total);
        _mm512_storeu_ps(out, total);
      }
    }
  }
}

template <int BITS, WeightType ST>
void packed_quant_columns(const QuantProduct& p, int n0, int n1) {
  packed_tiles(p.rows, n0, n1, [&](auto rows, auto blocks, int n) {
    packed_quant_tile<BITS, ST, decltype(rows)::value, decltype(blocks)::value>(p, n);
  });
}

// e^x for x <= 0, 16 at a time, as exp_nonpositive in decoder_layer.cpp computes it: x = k ln 2 + r with
// |r| <= ln 2 / 2, e^r by its Taylor polynomial to degree 7, times 2^k; exactly 0 below -87 (a masked score, -inf too).
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 high = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), high);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  constexpr float kTerms[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  for (const float c : kTerms) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  const __m512i exponent = _mm512_add_epi32(_mm512_cvttps_epi32(_mm512_max_ps(k, _mm512_set1_ps(-126.0f))),
                                            _mm512_set1_epi32(127));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23));
  return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), p, scale);
}

// q . key for KEYS keys (`stride` floats apart) over d_kv floats, 16 at a time (the last vector masked): each key's
// multiply-adds in one chain, in the order of its floats, the keys' chains side by side so that each waits less on the
// multiply-add's latency. A key's sum is the same in a block of any size.
template <int KEYS>
inline void dot_keys16(const float* q, const float* key, int64_t stride, int chunks, __mmask16 last,
                       __m512 (&acc)[KEYS]) {
#pragma GCC unroll 8
  for (int k = 0; k < KEYS; k++) {
    acc[k] = _mm512_setzero_ps();
  }
  for (int c = 0; c + 1 < chunks; c++) {
    const __m512 query = _mm512_loadu_ps(q + 16 * c);
#pragma GCC unroll 8
    for (int k = 0; k < KEYS; k++) {
      acc[k] = _mm512_fmadd_ps(query, _mm512_loadu_ps(key + k * stride + 16 * c), acc[k]);
    }
  }
  const int c = chunks - 1;
  const __m512 query = _mm512_maskz_loadu_ps(last, q + 16 * c);
#pragma GCC unroll 8
  for (int k = 0; k < KEYS; k++) {
    acc[k] = _mm512_fmadd_ps(query, _mm512_maskz_loadu_ps(last, key + k * stride + 16 * c), acc[k]);
  }
}

// Output vectors [c0, c0 + COUNT) of the values' sum weighted by p (n keys): the even and the odd keys in
// accumulators of their own, held in registers, added and divided by `total` at the end.
template <int COUNT>
inline void weighted_values16(const float* p, const float* values, int64_t value_stride, int n, int c0, int chunks,
                              __mmask16 last, __m512 total, float* out) {
  __m512 even[COUNT], odd[COUNT];
#pragma GCC unroll 4
  for (int c = 0; c < COUNT; c++) {
    even[c] = odd[c] = _mm512_setzero_ps();
  }
  const bool masked = c0 + COUNT == chunks;  // the last vector of the output is among these
  auto add = [&](__m512(&acc)[COUNT], int key) {
    const __m512 weight = _mm512_set1_ps(p[key]);
    const float* v = values + key * value_stride + 16 * c0;
#pragma GCC unroll 4
    for (int c = 0; c < COUNT; c++) {
      const __mmask16 valid = masked && c + 1 == COUNT ? last : __mmask16(0xffff);
      acc[c] = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(valid, v + 16 * c), acc[c]);
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
    const __mmask16 valid = masked && c + 1 == COUNT ? last : __mmask16(0xffff);
    _mm512_mask_storeu_ps(out + 16 * (c0 + c), valid, _mm512_div_ps(_mm512_add_ps(even[c], odd[c]), total));
  }
}

// scores[0, n) -> exp(score - the largest), in place; returns their sum in every lane.
inline __m512 softmax_numerators16(float* scores, int n) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    top = _mm512_mask_max_ps(top, valid, top, _mm512_maskz_loadu_ps(valid, scores + j));
  }
  const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sums = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __m512 shifted = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + j), largest);
    const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive16(shifted));
    _mm512_mask_storeu_ps(scores + j, valid, e);
    sums = _mm512_add_ps(sums, e);
  }
  return _mm512_set1_ps(_mm512_reduce_add_ps(sums));
}

// acc[r][v] = the sum over t < count of a[r * lda + t] times b's vector v of row t (rows ldb apart): each lane one
// chain of multiply-adds in the order of t, whatever R and V (R rows' broadcasts share each vector of b).
template <int R, int V>
inline void outer_products(const float* a, int64_t lda, const float* b, int64_t ldb, int count, __m512 (&acc)[R][V]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
    for (int v = 0; v < V; v++) {
      acc[r][v] = _mm512_setzero_ps();
    }
  }
  for (int t = 0; t < count; t++) {
    __m512 row[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; v++) {
      row[v] = _mm512_loadu_ps(b + size_t(t) * ldb + 16 * v);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const __m512 broadcast = _mm512_set1_ps(a[r * lda + t]);
#pragma GCC unroll 4
      for (int v = 0; v < V; v++) {
        acc[r][v] = _mm512_fmadd_ps(broadcast, row[v], acc[r][v]);
      }
    }
  }
}

// Q . K for R queries (q's rows ldq apart) and V vectors of 16 keys from the transposed keys' column j (keys_t rows ldk
// apart) -> scores (rows lds apart).
template <int R, int V>
inline void scores_tile(const float* q, int64_t ldq, const float* keys_t, int ldk, int j, int d_kv, float* scores,
                        int lds) {
  __m512 acc[R][V];
  outer_products<R, V>(q, ldq, keys_t + j, ldk, d_kv, acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
    for (int v = 0; v < V; v++) {
      _mm512_storeu_ps(scores + size_t(r) * lds + j + 16 * v, acc[r][v]);
    }
  }
}

// The weighted values of R queries (p's rows lds apart, n keys), output vectors [c0, c0 + V) of 16, each divided by
// its row's total -> out (rows ldo apart).
template <int R, int V>
inline void values_tile(const float* p, int lds, const float* values, int d_kv, int n, int c0, const float* totals,
                        float* out, int64_t ldo) {
  __m512 acc[R][V];
  outer_products<R, V>(p, lds, values + 16 * c0, d_kv, n, acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
    const __m512 total = _mm512_set1_ps(totals[r]);
#pragma GCC unroll 4
    for (int v = 0; v < V; v++) {
      _mm512_storeu_ps(out + r * ldo + 16 * (c0 + v), _mm512_div_ps(acc[r][v], total));
    }
  }
}

template <int R>
void attention_queries(const float* q, int64_t ldq, const float* keys_t, int ldk, const float* values, int n,
                       int d_kv, const float* const* bias, float* scores, float* out, int64_t ldo) {
  const int lds = ldk;
  int j = 0;
  for (; j + 64 <= ldk; j += 64) {
    scores_tile<R, 4>(q, ldq, keys_t, ldk, j, d_kv, scores, lds);
  }
  for (; j < ldk; j += 16) {
    scores_tile<R, 1>(q, ldq, keys_t, ldk, j, d_kv, scores, lds);
  }
  float totals[R];
  for (int r = 0; r < R; r++) {
    float* row = scores + size_t(r) * lds;
    if (bias[r]) {
      for (int k = 0; k < n; k += 16) {
        const __mmask16 valid = n - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1);
        const __m512 biased =
            _mm512_add_ps(_mm512_maskz_loadu_ps(valid, row + k), _mm512_maskz_loadu_ps(valid, bias[r] + k));
        _mm512_mask_storeu_ps(row + k, valid, biased);
      }
    }
    totals[r] = _mm512_cvtss_f32(softmax_numerators16(row, n));
  }
  const int chunks = d_kv / 16;
  int c0 = 0;
  for (; c0 + 4 <= chunks; c0 += 4) {
    values_tile<R, 4>(scores, lds, values, d_kv, n, c0, totals, out, ldo);
  }
  for (; c0 < chunks; c0++) {
    values_tile<R, 1>(scores, lds, values, d_kv, n, c0, totals, out, ldo);
  }
}

}  // namespace

// decoder_layer.cpp's attention of one query, vectorized: eight keys' scores at a time (then four, then one), their
// lanes summed in _mm512_reduce_add_ps's order so that a key's score is the same in any block, the softmax's
// exponentials 16 at a time and their sum in 16 lanes (key j in lane j % 16, summed as _mm512_reduce_add_ps sums), the
// values' weighted sum in registers (the even and the odd keys apart, then added), divided by the sum once. A masked
// key adds exact zeros: a query's result is the same whatever the number of keys past its own.
void attention_row_avx512(const float* q, const float* keys, int64_t key_stride, const float* values,
                          int64_t value_stride, int n, int d_kv, const float* bias, float* scores, float* out) {
  const int chunks = (d_kv + 15) / 16;
  const __mmask16 last = d_kv % 16 ? __mmask16((1u << (d_kv % 16)) - 1) : __mmask16(0xffff);
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m512 dots[8];
    dot_keys16<8>(q, keys + j * key_stride, key_stride, chunks, last, dots);
    __m128 low = sum_each(dots[0], dots[1], dots[2], dots[3]), high = sum_each(dots[4], dots[5], dots[6], dots[7]);
    if (bias) {
      low = _mm_add_ps(low, _mm_loadu_ps(bias + j));
      high = _mm_add_ps(high, _mm_loadu_ps(bias + j + 4));
    }
    _mm_storeu_ps(scores + j, low);
    _mm_storeu_ps(scores + j + 4, high);
  }
  for (; j + 4 <= n; j += 4) {
    __m512 dots[4];
    dot_keys16<4>(q, keys + j * key_stride, key_stride, chunks, last, dots);
    __m128 s = sum_each(dots[0], dots[1], dots[2], dots[3]);
    if (bias) {
      s = _mm_add_ps(s, _mm_loadu_ps(bias + j));
    }
    _mm_storeu_ps(scores + j, s);
  }
  for (; j < n; j++) {
    __m512 dot[1];
    dot_keys16<1>(q, keys + j * key_stride, key_stride, chunks, last, dot);
    scores[j] = _mm512_reduce_add_ps(dot[0]) + (bias ? bias[j] : 0.0f);
  }
  const __m512 total = softmax_numerators16(scores, n);
  for (int c0 = 0; c0 < chunks; c0 += 4) {  // 4 vectors of the output at a time
    switch (chunks - c0) {
      case 1:
        weighted_values16<1>(scores, values, value_stride, n, c0, chunks, last, total, out);
        break;
      case 2:
        weighted_values16<2>(scores, values, value_stride, n, c0, chunks, last, total, out);
        break;
      case 3:
        weighted_values16<3>(scores, values, value_stride, n, c0, chunks, last, total, out);
        break;
      default:
        weighted_values16<4>(scores, values, value_stride, n, c0, chunks, last, total, out);
    }
  }
}

void packed_quant_columns_avx512(const QuantProduct& p, int n0, int n1) {
  with_scale_type(p.stype, [&](auto stype) {
    constexpr WeightType ST = decltype(stype)::value;
    p.bits == 8 ? packed_quant_columns<8, ST>(p, n0, n1) : packed_quant_columns<4, ST>(p, n0, n1);
  });
}

void float_columns_avx512(const FloatProduct& p, int n0, int n1) {
  switch (p.wtype) {
    case kFloat32:
      return float_columns<kFloat32, false>(p, n0, n1);
    case kBFloat16:
      return p.x_bf16 ? float_columns<kBFloat16, true>(p, n0, n1) : split_columns(p, n0, n1);
    case kPackedBFloat16:
      return packed_columns<kPackedBFloat16>(p, n0, n1);
    case kPackedFloat32:
      return packed_columns<kPackedFloat32>(p, n0, n1);
    default:
      return float_columns<kFloat16, false>(p, n0, n1);
  }
}

void int_columns_avx512(const IntProduct& p, int n0, int n1) {
  p.dots ? int_columns_any<true>(p, n0, n1) : int_columns_any<false>(p, n0, n1);
}

void quantize_rows_avx512(const float* x, int ldx, int rows, int K, int group, int8_t* q, int ldq, float* x_scales,
                          float* x_sums, int lds, bool packed_nibbles) {
  // Per 8 k: the even ones, then the odd ones (bytes 0, 2, 4, 6, 1, 3, 5, 7 of each 8).
  const __m128i nibble_order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int m = 0; m < rows; m++) {
    const float* xm = x + size_t(m) * ldx;
    int8_t* qm = q + size_t(m) * ldq;
    for (int g = 0; g < K / group; g++) {
      __m512 largest = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int k = g * group; k < (g + 1) * group; k += 16) {
        const __m512 v = _mm512_loadu_ps(xm + k);
        largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
        sum = _mm512_add_ps(sum, v);
      }
      const float big = _mm512_reduce_max_ps(largest);
      const __m512 inverse = _mm512_set1_ps(big > 0 ? 127.0f / big : 0.0f);
      for (int k = g * group; k < (g + 1) * group; k += 16) {
        // vcvtps2dq rounds half to even, as nearbyint does; |x * inverse| <= 127 up to rounding.
        __m512i values = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + k), inverse));
        values = _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), values));
        __m128i bytes = _mm512_cvtepi32_epi8(values);
        if (packed_nibbles) {
          bytes = _mm_shuffle_epi8(bytes, nibble_order);
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qm + k), bytes);
      }
      x_scales[size_t(m) * lds + g] = big / 127.0f;
      x_sums[size_t(m) * lds + g] = _mm512_reduce_add_ps(sum);
    }
  }
}

void packed_int_columns_avx512(const IntProduct& p, int n0, int n1) {
  if (p.dots) {  // (no scales read)
    return p.bits == 8 ? packed_int_columns<8, true, kFloat32>(p, n0, n1)
                       : packed_int_columns<4, true, kFloat32>(p, n0, n1);
  }
  with_scale_type(p.stype, [&](auto stype) {
    constexpr WeightType ST = decltype(stype)::value;
    p.bits == 8 ? packed_int_columns<8, false, ST>(p, n0, n1) : packed_int_columns<4, false, ST>(p, n0, n1);
  });
}

void attention_queries_avx512(const float* q, int64_t ldq, int rows, const float* keys_t, int ldk,
                              const float* values, int n, int d_kv, const float* const* bias, float* scores,
                              float* out, int64_t ldo) {
  with_count<kAttentionQueries>(rows, [&](auto count) {
    constexpr int R = decltype(count)::value;
    attention_queries<R>(q, ldq, keys_t, ldk, values, n, d_kv, bias, scores, out, ldo);
  });
}

}  // namespace t5kernels
