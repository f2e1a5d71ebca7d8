// Portable kernels (any CPU) and the helpers both paths share.
#include <cmath>
#include <cstring>

#include "products.h"

namespace t5kernels {

float f16_to_float(uint16_t v) {
  uint32_t sign = uint32_t(v & 0x8000) << 16, exponent = (v >> 10) & 0x1f, mantissa = v & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {  // inf, nan
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while (!(mantissa & 0x400)) {
      mantissa <<= 1;
      exponent--;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void float_columns_portable(const FloatProduct& p, int n0, int n1) {
  const bool packed = is_packed(p.wtype);
  for (int n = n0; n < n1; n++) {
    float acc[kMaxRows] = {};
    for (int k = 0; k < p.K; k++) {
      float w = load_scalar(p.w, packed ? packed_index(n, k, p.K) : size_t(n) * p.K + k, p.wtype);
      for (int m = 0; m < p.rows; m++) {
        acc[m] += p.x[size_t(m) * p.ldx + k] * w;
      }
    }
    for (int m = 0; m < p.rows; m++) {
      p.out[size_t(m) * p.N + n] = acc[m];
    }
  }
}

void quant_columns_portable(const QuantProduct& p, int n0, int n1) {
  const int per_word = 32 / p.bits, words = p.K / per_word, groups = p.K / p.group;
  const uint32_t mask = (1u << p.bits) - 1;
  for (int n = n0; n < n1; n++) {
    float acc[kMaxRows] = {};
    const uint32_t* row = p.w + size_t(n) * words;
    for (int g = 0; g < groups; g++) {
      float scale = load_scalar(p.scales, size_t(n) * groups + g, p.stype);
      float bias = load_scalar(p.biases, size_t(n) * groups + g, p.stype);
      for (int k = g * p.group; k < (g + 1) * p.group; k++) {
        uint32_t value = (row[k / per_word] >> (p.bits * (k % per_word))) & mask;
        float w = scale * float(value) + bias;
        for (int m = 0; m < p.rows; m++) {
          acc[m] += p.x[size_t(m) * p.ldx + k] * w;
        }
      }
    }
    for (int m = 0; m < p.rows; m++) {
      p.out[size_t(m) * p.N + n] = acc[m];
    }
  }
}

void packed_quant_columns_portable(const QuantProduct& p, int n0, int n1) {
  const int groups = p.K / p.group, per_word = 32 / p.bits;
  const uint32_t mask = (1u << p.bits) - 1;
  for (int m = 0; m < p.rows; m++) {
    const float* x = p.x + size_t(m) * p.ldx;
    for (int n = n0; n < n1; n++) {
      float total = 0.0f;
      for (int g = 0; g < groups; g++) {
        float sum = 0.0f;
        for (int k = g * p.group; k < (g + 1) * p.group; k++) {
          const uint32_t word = p.w[packed_index(n, k / per_word, p.K / per_word)];
          sum += x[k] * float((word >> (p.bits * (k % per_word))) & mask);
        }
        const size_t index = packed_quant_scale_index(n, g, groups);
        total += load_scalar(p.scales, index, p.stype) * sum;
        total += load_scalar(p.biases, index, p.stype) * p.x_sums[size_t(m) * p.ldx + g];
      }
      p.out[size_t(m) * p.N + n] = total;
    }
  }
}

void prepare_quant_x(const float* x, int ldx, int rows, int K, int bits, int group, float* x_words,
                     float* x_sums) {
  // A block of 8 words holds 8 * per_word weights; the AVX2 kernel takes value i of all 8 words at once (lane j =
  // word j), still shifted left by bits * i (only the top value is shifted down), so x is stored in that order and
  // scaled by 2^(-bits * i) to undo the shift exactly.
  const int per_word = 32 / bits, block = 8 * per_word;
  for (int m = 0; m < rows; m++) {
    const float* xm = x + size_t(m) * ldx;
    float* out = x_words + size_t(m) * ldx;
    for (int b = 0; b < K / block; b++) {
      for (int i = 0; i < per_word; i++) {
        float undo = i == per_word - 1 ? 1.0f : std::ldexp(1.0f, -bits * i);
        for (int j = 0; j < 8; j++) {
          out[b * block + i * 8 + j] = xm[b * block + j * per_word + i] * undo;
        }
      }
    }
  }
  group_sums(x, ldx, rows, K, group, x_sums);
}

void group_sums(const float* x, int ldx, int rows, int K, int group, float* sums) {
  for (int m = 0; m < rows; m++) {
    const float* xm = x + size_t(m) * ldx;
    for (int g = 0; g < K / group; g++) {
      float sum = 0;
      for (int k = 0; k < group; k++) {
        sum += xm[g * group + k];
      }
      sums[size_t(m) * ldx + g] = sum;
    }
  }
}

}  // namespace t5kernels

namespace t5kernels {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace t5kernels

namespace t5kernels {

void quantize_rows(const float* x, int ldx, int rows, int K, int group, int8_t* q, int ldq, float* x_scales,
                   float* x_sums, int lds) {
  for (int m = 0; m < rows; m++) {
    const float* xm = x + size_t(m) * ldx;
    for (int g = 0; g < K / group; g++) {
      float largest = 0, sum = 0;
      for (int k = g * group; k < (g + 1) * group; k++) {
        largest = std::fmax(largest, std::fabs(xm[k]));
        sum += xm[k];
      }
      const float inverse = largest > 0 ? 127.0f / largest : 0.0f;
      for (int k = g * group; k < (g + 1) * group; k++) {
        // Round half to even, as the reference's numpy.rint; |x * inverse| <= 127 up to rounding.
        const float value = std::nearbyint(xm[k] * inverse);
        q[size_t(m) * ldq + k] = int8_t(std::fmax(-127.0f, std::fmin(127.0f, value)));
      }
      x_scales[size_t(m) * lds + g] = largest / 127.0f;
      x_sums[size_t(m) * lds + g] = sum;
    }
  }
}

void order_for_nibbles(const int8_t* q, int ldq, int rows, int K, int8_t* out) {
  for (int m = 0; m < rows; m++) {
    const int8_t* row = q + size_t(m) * ldq;
    int8_t* ordered = out + size_t(m) * ldq;
    for (int k0 = 0; k0 < K; k0 += 128) {
      for (int j = 0; j < 64; j++) {
        ordered[k0 + j] = k0 + 2 * j < K ? row[k0 + 2 * j] : 0;
        ordered[k0 + 64 + j] = k0 + 2 * j + 1 < K ? row[k0 + 2 * j + 1] : 0;
      }
    }
  }
}

namespace {

// The integer products one value at a time, on MLX's layout (column n's words in a row of its own) or the packed one
// (products.h).
void int_columns_any_layout(const IntProduct& p, int n0, int n1, bool packed) {
  const int per_word = 32 / p.bits, words = p.K / per_word, groups = p.K / p.group;
  const uint32_t mask = (1u << p.bits) - 1;
  for (int n = n0; n < n1; n++) {
    for (int m = 0; m < p.rows; m++) {
      const int8_t* q = p.xq + size_t(m) * p.ldq;
      float result = 0;
      for (int g = 0; g < groups; g++) {
        int32_t dot = 0;
        for (int k = g * p.group; k < (g + 1) * p.group; k++) {
          const size_t at = packed ? packed_index(n, k / per_word, words) : size_t(n) * words + k / per_word;
          dot += int32_t((p.w[at] >> (p.bits * (k % per_word))) & mask) * q[k];
        }
        if (p.dots) {
          p.dots[(size_t(m) * p.N + n) * groups + g] = dot;
          continue;
        }
        const size_t index = packed ? packed_quant_scale_index(n, g, groups) : size_t(n) * groups + g;
        const float x_scale = p.x_scales[size_t(m) * p.lds + g], x_sum = p.x_sums[size_t(m) * p.lds + g];
        result += load_scalar(p.scales, index, p.stype) * x_scale * float(dot) +
                  load_scalar(p.biases, index, p.stype) * x_sum;
      }
      if (!p.dots) {
        p.out[size_t(m) * p.N + n] = result;
      }
    }
  }
}

}  // namespace

void int_columns_portable(const IntProduct& p, int n0, int n1) {
  int_columns_any_layout(p, n0, n1, false);
}

void packed_int_columns_portable(const IntProduct& p, int n0, int n1) {
  int_columns_any_layout(p, n0, n1, true);
}

}  // namespace t5kernels

namespace t5kernels {

int lane_scales(const float* x_scales, int lds, int rows, int K, int ldq, int bits, int group, float* out) {
  const int values_per_lane = 32 / bits, lanes_per_group = group / values_per_lane;
  const int lanes_per_step = lanes_per_group > 16 ? lanes_per_group : 16;
  const int ldl = ldq / values_per_lane / lanes_per_step * 16;
  if (out == nullptr) {
    return ldl;
  }
  for (int m = 0; m < rows; m++) {
    for (int i = 0; i < ldl; i++) {
      // lane i of the row's steps covers k from (i / 16 * lanes_per_step + i % 16) * values_per_lane
      const int step = i / 16, lane = i % 16;
      const int k = (step * lanes_per_step + (lanes_per_group > 16 ? 0 : lane)) * values_per_lane;
      out[size_t(m) * ldl + i] = k < K ? x_scales[size_t(m) * lds + k / group] : 0.0f;
    }
  }
  return ldl;
}

}  // namespace t5kernels
