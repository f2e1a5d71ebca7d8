#include "decoder_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "decode_matmul.h"
#include "dispatch.h"
#include "mlx/transforms.h"
#include "products.h"

namespace t5kernels {

namespace {

constexpr int kWeights = 6;  // qkv, o, cross q, cross o, wi, wo
enum { kQkv = 0, kO, kCrossQ, kCrossO, kWi, kWo };

// Rows of activations a product reads: K floats, rows a multiple of 8 floats plus 16 apart (see run_product).
int padded(int K) {
  return (K + 7) / 8 * 8 + 16;
}

// Element (i0, i1, i2, i3) of a 4-D float32 array of any strides; a dimension of size 1 broadcasts.
struct Strided4 {
  const float* data;
  int64_t s[4];
  Strided4(const mx::array& a) : data(a.data<float>()) {
    for (int d = 0; d < 4; d++) {
      s[d] = a.shape(d) == 1 ? 0 : a.strides()[d];
    }
  }
  const float* at(int64_t i0, int64_t i1, int64_t i2) const {
    return data + i0 * s[0] + i1 * s[1] + i2 * s[2];
  }
  float get(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return at(i0, i1, i2)[i3 * s[3]];
  }
};

// The attention's loops are written for the compiler to vectorize, in a version for each instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define T5_VECTOR_VERSIONS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define T5_VECTOR_VERSIONS
#endif

// e^x for x <= 0 (a score less the largest), to about one unit in the last place: x = k ln 2 + r with |r| <= ln 2 / 2,
// e^r by its Taylor polynomial to degree 7, times 2^k; exactly 0 below float's range (a masked score).
inline float exp_nonpositive(float x) {
  const float k = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int exponent = int(std::max(k, -126.0f)) + 127;
  uint32_t bits = uint32_t(exponent) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.0f ? 0.0f : p * scale;
}

// One query's attention: out (d_kv) = the softmax over j < n of (q . key j + bias[j]) weighted sum of value j. Keys
// and values are rows of d_kv floats, key_stride and value_stride floats apart; bias is n floats, or null for none;
// `scores` holds n floats. Each query is computed alone, in the same order whatever the other rows are: a row's
// result never depends on them.
T5_VECTOR_VERSIONS
void attention_row(const float* q, const float* keys, int64_t key_stride, const float* values, int64_t value_stride,
                   int n, int d_kv, const float* bias, float* scores, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; j++) {
    const float* k = keys + j * key_stride;
    // Sixteen partial sums: one vector register's lanes.
    float part[16] = {0};
    int d = 0;
    for (; d + 16 <= d_kv; d += 16) {
      for (int u = 0; u < 16; u++) {
        part[u] += q[d + u] * k[d + u];
      }
    }
    for (; d < d_kv; d++) {
      part[d % 16] += q[d] * k[d];
    }
    for (int width = 8; width > 0; width /= 2) {
      for (int u = 0; u < width; u++) {
        part[u] += part[u + width];
      }
    }
    scores[j] = part[0] + (bias ? bias[j] : 0.0f);
    top = std::max(top, scores[j]);
  }
  float total = 0;
  for (int j = 0; j < n; j++) {
    scores[j] = exp_nonpositive(scores[j] - top);
  }
  for (int j = 0; j < n; j++) {
    total += scores[j];
  }
  for (int d = 0; d < d_kv; d++) {
    out[d] = 0.0f;
  }
  for (int j = 0; j < n; j++) {
    const float p = scores[j] / total;
    const float* v = values + j * value_stride;
    for (int d = 0; d < d_kv; d++) {
      out[d] += p * v[d];
    }
  }
}

// attention_row's signature, and the one that runs on `isa`: AVX-512's or AVX2's own, else the compiler's vectors of
// the above.
using AttentionRow = void (*)(const float*, const float*, int64_t, const float*, int64_t, int, int, const float*,
                              float*, float*);

AttentionRow attention_for(int isa) {
  return isa == kAvx512 ? attention_row_avx512 : isa == kAvx2 ? attention_row_avx2 : attention_row;
}

// Rows of a 4-D array as attention_row reads them: (i0, i1, j, :) for j < n, d_kv contiguous floats each; copied into
// `scratch` where the last dimension is strided.
const float* key_rows(const Strided4& a, int i0, int i1, int n, int d_kv, std::vector<float>& scratch,
                      int64_t* stride) {
  if (a.s[3] == 1) {
    *stride = a.s[2];
    return a.at(i0, i1, 0);
  }
  scratch.resize(size_t(n) * d_kv);
  for (int j = 0; j < n; j++) {
    for (int d = 0; d < d_kv; d++) {
      scratch[size_t(j) * d_kv + d] = a.get(i0, i1, j, d);
    }
  }
  *stride = d_kv;
  return scratch.data();
}

// A bias row (i0, i1, i2, :) of n floats, contiguous (copied into `scratch` where it is not).
const float* bias_row(const Strided4& a, int i0, int i1, int i2, int n, std::vector<float>& scratch) {
  if (a.s[3] == 1) {
    return a.at(i0, i1, i2);
  }
  scratch.resize(n);
  for (int j = 0; j < n; j++) {
    scratch[j] = a.get(i0, i1, i2, j);
  }
  return scratch.data();
}

// rows of x (D floats, ld apart) -> out (rows ldo apart): x * rsqrt(mean(x^2) + eps) * weight. The squares are summed
// in 16 running sums (value d into sum d % 16), then those in a fixed order: independent additions the compiler puts
// in vectors, where one running sum waited four cycles an addition (a 16-row verification of the demo main model spent
// 74 of its 1150 us in its 25 norms).
void rms_norm(const float* x, int ld, int rows, int D, const float* weight, float eps, float* out, int ldo) {
  constexpr int kSums = 16;
  for (int r = 0; r < rows; r++) {
    const float* row = x + size_t(r) * ld;
    float sums[kSums] = {};
    int d = 0;
    for (; d + kSums <= D; d += kSums) {
      for (int i = 0; i < kSums; i++) {
        sums[i] += row[d + i] * row[d + i];
      }
    }
    for (int i = 0; d + i < D; i++) {
      sums[i] += row[d + i] * row[d + i];
    }
    for (int width = kSums / 2; width > 0; width /= 2) {
      for (int i = 0; i < width; i++) {
        sums[i] += sums[i + width];
      }
    }
    const float scale = 1.0f / std::sqrt(sums[0] / D + eps);
    for (int d = 0; d < D; d++) {
      out[size_t(r) * ldo + d] = weight[d] * (row[d] * scale);
    }
  }
}

// The activation of the feed-forward block on each of n values of u (times the gate's value where gated) -> out. The
// kind is chosen once, outside the loop: a choice per value made relu a branch per value, mispredicted half the time.
void activate(const float* u, const float* gate, int n, int activation, float* out) {
  auto each = [&](auto f) {
    if (gate) {
      for (int i = 0; i < n; i++) {
        out[i] = f(u[i]) * gate[i];
      }
    } else {
      for (int i = 0; i < n; i++) {
        out[i] = f(u[i]);
      }
    }
  };
  switch (activation) {
    case kRelu:
      return each([](float x) { return x < 0.0f ? 0.0f : x; });  // std::max(x, 0): NaN stays NaN
    case kGelu:
      return each([](float x) { return x * (1.0f + std::erf(x / std::sqrt(2.0f))) / 2.0f; });
    case kGeluTanh:
      return each([](float x) {
        return 0.5f * x * (1.0f + std::tanh(std::sqrt(2.0f / float(M_PI)) * (x + 0.044715f * (x * x * x))));
      });
    default:
      return each([](float x) { return x * (1.0f / (1.0f + std::exp(-x))); });
  }
}

// Runs fn(task) for tasks 0..n-1, on the thread pool when there is enough work to share (multiply-adds, about). An
// attention of 8 rows over their own caches and prompts (about 7e4 each) ran on one thread at 2e5, and a step of 8 rows
// of the demo main model took 1.10x as long as with both threads (5e4; one-row steps alike, interleaved, two runs).
template <class F>
void for_tasks(int n, double work, F&& fn) {
  if (work < 5e4 || n < 2) {
    for (int t = 0; t < n; t++) {
      fn(t);
    }
  } else {
    pool_run(n, fn);
  }
}

struct Weights {
  const mx::array* w;
  const mx::array* scales;
  const mx::array* biases;
  int group_size, bits;
};

void check(bool ok, const char* what, const char* op = "decoder_layers") {
  if (!ok) {
    throw std::invalid_argument(std::string(op) + ": " + what);
  }
}

// The inputs (K) of a weight's product: its columns, or the values its words or bytes hold where quantized.
int weight_inputs(const LayerWeight& w) {
  return w.bits ? w.w.shape(1) * (is_packed_quant(w.w) ? 8 : 32) / w.bits : w.w.shape(1);
}

// A product's weight (out, in): float (packed or not), or MLX's affine quantization of one (packed or not).
void check_weight(const LayerWeight& w, int in, int out, const char* op) {
  if (w.bits) {
    const bool packed = is_packed_quant(w.w);
    check(w.scales && w.biases && (w.bits == 4 || w.bits == 8) &&
              (w.group_size == 32 || w.group_size == 64 || w.group_size == 128) &&
              (w.w.dtype() == mx::uint32 || packed) && weight_inputs(w) == in &&
              in % w.group_size == 0 &&
              w.scales->shape() == mx::Shape{out, in / w.group_size} && w.biases->shape() == w.scales->shape() &&
              w.biases->dtype() == w.scales->dtype() &&
              (w.scales->dtype() == mx::float32 || w.scales->dtype() == mx::bfloat16 ||
               w.scales->dtype() == mx::float16),
          "quantized weights must be MLX affine 4/8-bit with groups of 32/64/128", op);
    check(!packed || out % kPackColumns == 0, "packed quantized weights need a multiple of 16 rows", op);
  } else {
    const bool packed = is_packed_dtype(w.w.dtype());
    check(w.w.shape(1) == in &&
              (w.w.dtype() == mx::float32 || w.w.dtype() == mx::bfloat16 || w.w.dtype() == mx::float16 || packed),
          "float weights must be float32, bfloat16, float16 or packed", op);
    check(!packed || w.w.shape(0) % kPackColumns == 0, "packed weights need a multiple of 16 rows", op);
  }
}

// Weights as a primitive takes them. Those the model holds evaluated stay with the primitive (`held`), not among its
// inputs: a primitive's inputs are copied into each of its outputs, which for every weight of every layer costs more
// than a step. Others (a weight just computed, or strided) become inputs (`late`, placed after the primitive's own).
struct WeightSlots {
  std::vector<mx::array> held, late;
  std::vector<int> slots;  // in order: held[slot] for slot >= 0, else late[~slot]
  mx::Stream stream;

  void push(const mx::array& a) {
    if (a.is_available() && a.flags().row_contiguous) {
      slots.push_back(int(held.size()));
      held.push_back(a);
    } else {
      slots.push_back(~int(late.size()));
      late.push_back(mx::contiguous(a, false, stream));
    }
  }
  void push(const LayerWeight& w) {
    push(w.w);
    if (w.bits) {
      push(*w.scales);
      push(*w.biases);
    }
  }
};

// Reads weights back in the order they were pushed, from the held ones and the inputs from `first_late` on.
struct WeightReader {
  const std::vector<mx::array>& held;
  const std::vector<int>& slots;
  const std::vector<mx::array>& inputs;
  int first_late;
  size_t next = 0;

  const mx::array& array() {
    const int slot = slots[next++];
    return slot >= 0 ? held[slot] : inputs[first_late + ~slot];
  }
  // A product's weight: its arrays (scales and biases where quantized) and layout.
  Weights weight(int group_size, int bits) {
    const mx::array* w = &array();
    const mx::array* scales = bits ? &array() : nullptr;
    const mx::array* biases = bits ? &array() : nullptr;
    return {w, scales, biases, group_size, bits};
  }
};

// One layer's inputs, as the primitive's input list holds them.
struct Layer {
  const mx::array* cross_keys;
  const mx::array* cross_values;
  const float* norms[3];
  Weights weights[kWeights];
};

// x (B, L, D) float32 of any strides -> B * L rows of D floats, ld apart (D unless given).
void read_rows(const mx::array& x, float* rows, int ld = 0) {
  const int B = x.shape(0), L = x.shape(1), D = x.shape(2);
  ld = ld ? ld : D;
  const float* base = x.data<float>();
  const auto& st = x.strides();
  for (int b = 0; b < B; b++) {
    for (int i = 0; i < L; i++) {
      for (int d = 0; d < D; d++) {
        rows[(size_t(b) * L + i) * ld + d] = base[b * st[0] + i * st[1] + d * st[2]];
      }
    }
  }
}

// The feed-forward block on h (R rows, ld_model apart, normed) -> y (R rows of D): wi (or the gate and linear halves
// of the stacked wi_0, wi_1), the activation, wo.
// A layer's working rows, made once for every layer of a call (up to `rows` rows): the normed input, the stacked
// query, key and value projections (or the cross-attention's queries), the attention's output, the feed-forward
// block's inner units before (u) and after (hidden) the activation, and a product's result to add to the residual
// stream. Made per layer instead, their allocation and zeroing took a tenth of a 16-row verification's feed-forward.
struct LayerRows {
  int ld_model, ld_inner, ld_ff, width;
  std::vector<float> h, qkv, att, u, hidden, y;

  LayerRows(int rows, int D, int inner, int d_ff, bool gated)
      : ld_model(padded(D)),
        ld_inner(padded(inner)),
        ld_ff(padded(d_ff)),
        width((gated ? 2 : 1) * d_ff),
        h(size_t(rows) * ld_model),
        qkv(size_t(rows) * 3 * inner),
        att(size_t(rows) * ld_inner, 0.0f),
        u(size_t(rows) * width),
        hidden(size_t(rows) * ld_ff, 0.0f),
        y(size_t(rows) * D) {}

  // x (R rows of D floats) += y's first R rows.
  void add_to(float* x, int R, int D) const {
    for (size_t i = 0; i < size_t(R) * D; i++) {
      x[i] += y[i];
    }
  }

  // The feed-forward block on h's first R rows (normed) -> y: wi (or the gate and linear halves of the stacked wi_0,
  // wi_1) into u, the activation into hidden (its padding stays zero), wo.
  template <class Product>
  void feed_forward(int R, int d_ff, bool gated, int activation, Product&& product) {
    product(kWi, h.data(), ld_model, u.data(), width);
    for (int r = 0; r < R; r++) {
      const float* row = &u[size_t(r) * width];
      activate(row, gated ? row + d_ff : nullptr, d_ff, activation, &hidden[size_t(r) * ld_ff]);
    }
    product(kWo, hidden.data(), ld_ff, y.data(), -1);
  }
};

// The layer's work on x (R rows of D floats, updated in place); keys and values: this layer's cache (outputs of the
// primitive, written here at each row's new positions, then read up to them).
void run_layer(const DecoderLayers::Spec& spec, const Layer& layer, int B, int L, int D, float* x,
               const std::vector<int>& offsets, const Strided4& self_bias, int S, bool bias_per_row,
               const std::optional<Strided4>& cross_bias, mx::array& keys, mx::array& values, LayerRows& rows) {
  const int H = spec.heads, dk = spec.d_kv, inner = H * dk, R = B * L;
  const int P = layer.cross_keys->shape(2);
  const Strided4 cross_k(*layer.cross_keys), cross_v(*layer.cross_values);
  auto product = [&](int which, const float* in, int ldx, int K, float* y, int N) {
    const Weights& w = layer.weights[which];
    product_rows(spec.isa, spec.integer, in, ldx, R, K, *w.w, w.scales, w.biases, w.group_size, w.bits, y, N);
  };
  const int ld_model = rows.ld_model, ld_inner = rows.ld_inner;
  std::vector<float>&h = rows.h, &qkv = rows.qkv, &att = rows.att, &y = rows.y;
  auto add_residual = [&]() { rows.add_to(x, R, D); };
  const AttentionRow attend = attention_for(spec.isa);

  // Self-attention. The new keys and values go into the cache first, at each row's positions offsets[b].., so that
  // row b attends to its cache entries 0..offsets[b] + L - 1 (those past a query are masked by the bias; stale
  // entries past a row's length are never read).
  rms_norm(x, D, R, D, layer.norms[0], spec.eps, h.data(), ld_model);
  product(kQkv, h.data(), ld_model, D, qkv.data(), 3 * inner);
  const int64_t C = keys.shape(2);
  float* key_data = keys.data<float>();
  float* value_data = values.data<float>();
  for (int b = 0; b < B; b++) {
    for (int hd = 0; hd < H; hd++) {
      for (int i = 0; i < L; i++) {
        const float* row = &qkv[(size_t(b) * L + i) * 3 * inner + hd * dk];
        const size_t at = ((size_t(b) * H + hd) * C + offsets[b] + i) * dk;
        std::memcpy(key_data + at, row + inner, dk * sizeof(float));
        std::memcpy(value_data + at, row + 2 * inner, dk * sizeof(float));
      }
    }
  }
  for_tasks(B * H, double(B) * H * L * (offsets[0] + L) * dk * 2, [&](int task) {
    const int b = task / H, hd = task % H, n = std::min(offsets[b] + L, S);
    const float* k_rows = key_data + (size_t(b) * H + hd) * C * dk;
    const float* v_rows = value_data + (size_t(b) * H + hd) * C * dk;
    std::vector<float> scores(n), scratch;
    for (int i = 0; i < L; i++) {
      const float* bias = bias_row(self_bias, bias_per_row ? b : 0, hd, i, n, scratch);
      attend(&qkv[(size_t(b) * L + i) * 3 * inner + hd * dk], k_rows, dk, v_rows, dk, n, dk, bias, scores.data(),
             &att[(size_t(b) * L + i) * ld_inner + hd * dk]);
    }
  });
  product(kO, att.data(), ld_inner, inner, y.data(), D);
  add_residual();

  // Cross-attention over the prompt's keys and values.
  rms_norm(x, D, R, D, layer.norms[1], spec.eps, h.data(), ld_model);
  float* q = qkv.data();  // (the self-attention's projections are used)
  product(kCrossQ, h.data(), ld_model, D, q, inner);
  for_tasks(B * H, double(B) * H * L * P * dk * 2, [&](int task) {
    const int b = task / H, hd = task % H;
    std::vector<float> scores(P), key_scratch, value_scratch, bias_scratch;
    int64_t key_stride, value_stride;
    const float* keys = key_rows(cross_k, b, hd, P, dk, key_scratch, &key_stride);
    const float* values = key_rows(cross_v, b, hd, P, dk, value_scratch, &value_stride);
    const float* bias = cross_bias ? bias_row(*cross_bias, b, 0, 0, P, bias_scratch) : nullptr;
    for (int i = 0; i < L; i++) {
      attend(&q[(size_t(b) * L + i) * inner + hd * dk], keys, key_stride, values, value_stride, P, dk, bias,
             scores.data(), &att[(size_t(b) * L + i) * ld_inner + hd * dk]);
    }
  });
  product(kCrossO, att.data(), ld_inner, inner, y.data(), D);
  add_residual();

  rms_norm(x, D, R, D, layer.norms[2], spec.eps, h.data(), ld_model);
  rows.feed_forward(R, spec.d_ff, spec.gated, spec.activation,
                    [&](int which, const float* in, int ldx, float* out, int N) {
                      product(which, in, ldx, which == kWi ? D : spec.d_ff, out, N < 0 ? D : N);
                    });
  add_residual();
}

// A layer's cache out: row b of it is row rows[b] of the input (row b where `rows` is empty; all zeros for -1, a row
// that joined the batch), its positions below `longest` (the longest row's length: every position a row could read,
// here or in MLX's attention over the batch), then zeros up to `end` where no new key will be written (all the new
// positions where `zero_new`: a call that may stop early leaves some unwritten), so that nothing read is left
// undefined. Positions from `end` on are never read. Taking the rows as they come saves the batch a copy of every
// cache each time rows leave or join it. Where `out` is `in`'s buffer (see DecoderLayers::eval_cpu), what a row
// holds is where it is, and only the zeros are written.
void copy_cache(const mx::array& in, mx::array& out, const std::vector<int>& offsets, const std::vector<int>& rows,
                int longest, int end, bool zero_new) {
  const Strided4 source(in);
  const int B = out.shape(0), H = out.shape(1), C = out.shape(2), dk = out.shape(3);
  float* data = out.data<float>();
  const bool in_place = data == in.data<float>();
  for (int b = 0; b < B; b++) {
    const int row = rows.empty() ? b : rows[b];
    for (int h = 0; h < H; h++) {
      float* positions = data + (size_t(b) * H + h) * C * dk;
      int copied = longest;
      if (row < 0) {
        copied = 0;
      } else if (!in_place && source.s[3] == 1 && source.s[2] == dk) {
        std::memcpy(positions, source.at(row, h, 0), size_t(longest) * dk * sizeof(float));
      } else if (!in_place) {
        for (int c = 0; c < longest; c++) {
          for (int d = 0; d < dk; d++) {
            positions[size_t(c) * dk + d] = source.get(row, h, c, d);
          }
        }
      }
      const int written = offsets[b] + end - longest;  // row b's new keys end here
      const int zero_from = row < 0 || zero_new ? copied : std::max(copied, written);
      std::fill(positions + size_t(zero_from) * dk, positions + size_t(end) * dk, 0.0f);
    }
  }
}

// The index of the largest of n values (the first of equals).
int argmax(const float* values, int n) {
  int best = 0;
  for (int i = 1; i < n; i++) {
    if (values[i] > values[best]) {
      best = i;
    }
  }
  return best;
}

void run_stack(const DecoderLayers::Spec& spec, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const mx::array& x_in = inputs[0];
  const int B = x_in.shape(0), L = x_in.shape(1), R = B * L;
  const int D = spec.token_ids ? spec.d_model : x_in.shape(2);
  const Strided4 self_bias(inputs[1]);
  const bool bias_per_row = inputs[1].shape(0) != 1;
  std::optional<Strided4> cross_bias;
  if (spec.has_cross_bias) {
    cross_bias.emplace(inputs[2]);
  }
  const int first_cache = spec.has_cross_bias ? 3 : 2;
  WeightReader weights{spec.held, spec.slots, inputs, first_cache + 4 * spec.layers};
  std::vector<Layer> layers(spec.layers);
  for (int l = 0; l < spec.layers; l++) {
    Layer& layer = layers[l];
    layer.cross_keys = &inputs[first_cache + 4 * l + 2];
    layer.cross_values = &inputs[first_cache + 4 * l + 3];
    for (auto& norm : layer.norms) {
      norm = weights.array().data<float>();
    }
    for (int i = 0; i < kWeights; i++) {
      layer.weights[i] = weights.weight(spec.group_sizes[l * kWeights + i], spec.bits[l * kWeights + i]);
    }
  }
  // Each layer's cache: what the rows hold, then room for every position this call writes.
  const int longest = *std::max_element(spec.offsets.begin(), spec.offsets.end());
  const int written = L + std::max(0, spec.greedy_steps - 1);
  for (int l = 0; l < spec.layers; l++) {
    const int cache_input = first_cache + 4 * l;
    for (int i = 0; i < 2; i++) {
      copy_cache(inputs[cache_input + i], outputs[1 + 2 * l + i], spec.offsets, spec.cache_rows, longest,
                 longest + written, spec.stop >= 0);
    }
  }
  // The layers on `rows` rows per batch row of x, the first at position offsets[b] + first, their bias rows from
  // `first` on.
  LayerRows scratch(R, D, spec.heads * spec.d_kv, spec.d_ff, spec.gated);
  auto run_layers = [&](float* x, int rows, int first) {
    std::vector<int> offsets = spec.offsets;
    for (int& offset : offsets) {
      offset += first;
    }
    Strided4 bias = self_bias;
    bias.data += int64_t(spec.bias_offset + first) * bias.s[2];
    for (int l = 0; l < spec.layers; l++) {
      run_layer(spec, layers[l], B, rows, D, x, offsets, bias, inputs[1].shape(3), bias_per_row, cross_bias,
                outputs[1 + 2 * l], outputs[2 + 2 * l], scratch);
    }
  };
  // x: the residual stream, R rows of D floats.
  std::vector<float> x(size_t(R) * D);
  const float* final_norm = nullptr;
  Weights head{};
  if (spec.has_head) {
    final_norm = weights.array().data<float>();
    head = weights.weight(spec.head_group_size, spec.head_bits);
  }
  // The final norm, the scale T5 v1.0 applies before its tied head, and the head: the logits of `rows` rows of x.
  const int ld = padded(D);
  auto logits = [&](const float* x_rows, int rows, float* out) {
    std::vector<float> h(size_t(rows) * ld);
    rms_norm(x_rows, D, rows, D, final_norm, spec.eps, h.data(), ld);
    if (spec.scale != 1.0f) {
      for (int r = 0; r < rows; r++) {
        for (int d = 0; d < D; d++) {
          h[size_t(r) * ld + d] *= spec.scale;
        }
      }
    }
    product_rows(spec.isa, spec.head_integer, h.data(), ld, rows, D, *head.w, head.scales, head.biases,
                 head.group_size, head.bits, out, spec.head_rows);
  };
  if (!spec.token_ids) {
    read_rows(x_in, x.data());
    run_layers(x.data(), L, 0);
    if (spec.has_head) {
      logits(x.data(), R, outputs[0].data<float>());
    } else {
      std::memcpy(outputs[0].data<float>(), x.data(), x.size() * sizeof(float));
    }
    return;
  }
  // Token ids in: rows of the embedding table, float32, or bfloat16 or float16 widened (exactly), or MLX's affine
  // quantization of one dequantized (scale * value + bias per group, in float32).
  const Weights table = weights.weight(spec.embedding_group_size, spec.embedding_bits);
  const int32_t* ids = x_in.data<int32_t>();
  const auto& st = x_in.strides();
  auto embed = [&](int token, float* row) {
    if (table.bits) {
      const int per_word = 32 / table.bits, groups = D / table.group_size;
      const uint32_t* words = table.w->data<uint32_t>() + size_t(token) * (D / per_word);
      const WeightType scale_type = weight_type(table.scales->dtype());
      const size_t first_group = size_t(token) * groups;
      const uint32_t mask = (1u << table.bits) - 1;
      for (int d = 0; d < D; d++) {
        const uint32_t value = (words[d / per_word] >> ((d % per_word) * table.bits)) & mask;
        const size_t group = first_group + d / table.group_size;
        row[d] = load_scalar(table.scales->data<void>(), group, scale_type) * float(value) +
                 load_scalar(table.biases->data<void>(), group, scale_type);
      }
    } else if (table.w->dtype() == mx::float32) {
      std::memcpy(row, table.w->data<float>() + size_t(token) * D, D * sizeof(float));
    } else {
      const WeightType type = weight_type(table.w->dtype());
      const uint16_t* values = table.w->data<uint16_t>() + size_t(token) * D;
      for (int d = 0; d < D; d++) {
        row[d] = load_scalar(values, d, type);
      }
    }
  };
  for (int b = 0; b < B; b++) {
    for (int i = 0; i < L; i++) {
      embed(ids[b * st[0] + i * st[1]], &x[(size_t(b) * L + i) * D]);
    }
  }
  if (spec.logits) {
    run_layers(x.data(), L, 0);
    logits(x.data(), R, outputs[0].data<float>());
    return;
  }
  int32_t* tokens = outputs[0].data<int32_t>();
  if (!spec.greedy_steps) {
    // Greedy verification: the most likely token after each position. With a stop token (one row), nothing is
    // computed from its first occurrence past the row's first token on (-1 there: no token matches it); whatever
    // follows the stop token is never kept.
    int rows = L;
    for (int i = 1; spec.stop >= 0 && i < L; i++) {
      if (ids[i * st[1]] == spec.stop) {
        rows = i;
        break;
      }
    }
    std::vector<float> scores(size_t(B) * rows * spec.head_rows);
    run_layers(x.data(), rows, 0);
    logits(x.data(), B * rows, scores.data());
    for (int r = 0; r < R; r++) {
      tokens[r] = r < B * rows ? argmax(&scores[size_t(r) * spec.head_rows], spec.head_rows) : -1;
    }
    return;
  }
  // Greedy drafting: each row's most likely token fed as its next step's, steps tokens a row out; after a stop token
  // (one row), nothing more is computed and the rest are the stop token too.
  const int steps = spec.greedy_steps;
  std::vector<float> scores(size_t(B) * spec.head_rows), last(size_t(B) * D);
  for (int step = 0; step < steps; step++) {
    const int rows = step ? 1 : L, first = step ? L + step - 1 : 0;
    run_layers(x.data(), rows, first);
    for (int b = 0; b < B; b++) {  // each row's last position
      std::memcpy(&last[size_t(b) * D], &x[(size_t(b) * rows + rows - 1) * D], D * sizeof(float));
    }
    logits(last.data(), B, scores.data());
    for (int b = 0; b < B; b++) {
      tokens[b * steps + step] = argmax(&scores[size_t(b) * spec.head_rows], spec.head_rows);
    }
    if (tokens[step] == spec.stop) {  // (a stop token is one row's)
      std::fill(tokens + step + 1, tokens + steps, spec.stop);
      break;
    }
    for (int b = 0; b < B && step + 1 < steps; b++) {
      embed(tokens[b * steps + step], &x[size_t(b) * D]);
    }
  }
}

// An encoder layer's products: qkv, o, wi, wo (EncoderLayerInputs' order).
enum { kEncQkv = 0, kEncO, kEncWi, kEncWo, kEncoderWeights };

void run_encoder(const EncoderLayers::Spec& spec, const std::vector<mx::array>& inputs, mx::array& out) {
  const mx::array& x_in = inputs[0];
  const int B = x_in.shape(0), L = x_in.shape(1), D = x_in.shape(2), R = B * L;
  const int H = spec.heads, dk = spec.d_kv, inner = H * dk;
  const Strided4 bias(inputs[1]);
  const bool bias_per_row = inputs[1].shape(0) != 1;
  WeightReader weights{spec.held, spec.slots, inputs, 2};
  std::vector<float> x(size_t(R) * D);
  read_rows(x_in, x.data());
  LayerRows rows(R, D, inner, spec.d_ff, spec.gated);
  const int ld_model = rows.ld_model, ld_inner = rows.ld_inner;
  std::vector<float>&h = rows.h, &qkv = rows.qkv, &att = rows.att, &y = rows.y;
  auto add_residual = [&]() { rows.add_to(x.data(), R, D); };
  const AttentionRow attend = attention_for(spec.isa);
  // With AVX-512, a head's queries go kAttentionQueries at a time over its keys, transposed, and values: a 510-token
  // t5-11b prompt's self-attention took 211 ms a layer a query at a time.
  const bool blocked = spec.isa == kAvx512 && dk % 16 == 0;
  const int ldk = (L + 15) / 16 * 16;
  auto blocked_attention = [&](const float* row0, int b, int hd, float* out0) {
    std::vector<float> keys_t(size_t(dk) * ldk, 0.0f), values(size_t(L) * dk), scores(kAttentionQueries * ldk);
    for (int j = 0; j < L; j++) {
      const float* key = row0 + size_t(j) * 3 * inner + inner;
      for (int d = 0; d < dk; d++) {
        keys_t[size_t(d) * ldk + j] = key[d];
      }
      std::copy_n(key + inner, dk, &values[size_t(j) * dk]);
    }
    std::vector<float> scratch[kAttentionQueries];
    const float* bias_rows[kAttentionQueries];
    for (int i = 0; i < L; i += kAttentionQueries) {
      const int rows = std::min(kAttentionQueries, L - i);
      for (int r = 0; r < rows; r++) {
        bias_rows[r] = bias_row(bias, bias_per_row ? b : 0, hd, i + r, L, scratch[r]);
      }
      attention_queries_avx512(row0 + size_t(i) * 3 * inner, 3 * inner, rows, keys_t.data(), ldk, values.data(), L,
                               dk, bias_rows, scores.data(), out0 + size_t(i) * ld_inner, ld_inner);
    }
  };
  for (int l = 0; l < spec.layers; l++) {
    const float* norms[2];
    for (auto& norm : norms) {
      norm = weights.array().data<float>();
    }
    Weights layer_weights[kEncoderWeights];
    for (int i = 0; i < kEncoderWeights; i++) {
      layer_weights[i] = weights.weight(spec.group_sizes[l * kEncoderWeights + i], spec.bits[l * kEncoderWeights + i]);
    }
    auto product = [&](int which, const float* in, int ldx, int K, float* out_rows, int N) {
      const Weights& w = layer_weights[which];
      product_rows(spec.isa, spec.integer, in, ldx, R, K, *w.w, w.scales, w.biases, w.group_size, w.bits, out_rows, N);
    };
    // Self-attention: each row's queries over its own keys and values, read in place from the stacked projections.
    rms_norm(x.data(), D, R, D, norms[0], spec.eps, h.data(), ld_model);
    product(kEncQkv, h.data(), ld_model, D, qkv.data(), 3 * inner);
    for_tasks(B * H, double(B) * H * L * L * dk * 2, [&](int task) {
      const int b = task / H, hd = task % H;
      const float* row0 = &qkv[size_t(b) * L * 3 * inner + hd * dk];
      float* out0 = &att[size_t(b) * L * ld_inner + hd * dk];
      if (blocked) {
        blocked_attention(row0, b, hd, out0);
        return;
      }
      // The head's keys and values side by side, copied once for all its queries, each of which reads them all: in
      // place they lie 3 * inner floats apart, each on a page of its own in a large model.
      std::vector<float> scores(L), scratch, keys(size_t(L) * dk), values(size_t(L) * dk);
      for (int j = 0; j < L; j++) {
        std::copy_n(row0 + size_t(j) * 3 * inner + inner, dk, &keys[size_t(j) * dk]);
        std::copy_n(row0 + size_t(j) * 3 * inner + 2 * inner, dk, &values[size_t(j) * dk]);
      }
      for (int i = 0; i < L; i++) {
        const float* bias_i = bias_row(bias, bias_per_row ? b : 0, hd, i, L, scratch);
        attend(row0 + size_t(i) * 3 * inner, keys.data(), dk, values.data(), dk, L, dk, bias_i, scores.data(),
               out0 + size_t(i) * ld_inner);
      }
    });
    product(kEncO, att.data(), ld_inner, inner, y.data(), D);
    add_residual();
    rms_norm(x.data(), D, R, D, norms[1], spec.eps, h.data(), ld_model);
    rows.feed_forward(R, spec.d_ff, spec.gated, spec.activation,
                      [&](int which, const float* in, int ldx, float* out_rows, int N) {
                        product(which == kWi ? kEncWi : kEncWo, in, ldx, which == kWi ? D : spec.d_ff, out_rows,
                                N < 0 ? D : N);
                      });
    add_residual();
  }
  rms_norm(x.data(), D, R, D, weights.array().data<float>(), spec.eps, out.data<float>(), D);
}

}  // namespace

std::vector<mx::array> decoder_layers(const mx::array& x, const mx::array& self_bias,
                                      const std::optional<mx::array>& cross_bias, const std::vector<int>& offsets,
                                      const std::vector<DecoderLayerInputs>& layers, int num_heads, float eps,
                                      int activation, bool gated, bool integer, const std::optional<Head>& head,
                                      const std::optional<LayerWeight>& embedding, int greedy_steps, int stop, bool logits,
                                      const std::vector<int>& cache_rows, bool cache_in_place, int bias_offset,
                                      mx::StreamOrDevice s) {
  // Everything is checked here, when the graph is built: the primitive itself runs on the stream's thread.
  const bool drafting = greedy_steps > 0, token_ids = embedding.has_value();
  check(greedy_steps >= 0, "greedy_steps must not be negative");
  check(stop < 0 || (token_ids && x.shape(0) == 1), "a stop token needs token ids of one row");
  check(!logits || (token_ids && !drafting && stop < 0), "logits from token ids: no drafting and no stop token");
  if (token_ids) {
    check(x.ndim() == 2 && x.dtype() == mx::int32, "token ids must be (B, L) int32");
    const mx::array& table = embedding->w;
    check(head.has_value() && table.ndim() == 2, "token ids need the head and a 2-D embedding table");
    if (embedding->bits) {
      check(table.dtype() == mx::uint32, "a quantized embedding table must be MLX's own (uint32 words)");
      check_weight(*embedding, weight_inputs(*embedding), table.shape(0), "decoder_layers");
    } else {
      check(table.dtype() == mx::float32 || table.dtype() == mx::bfloat16 || table.dtype() == mx::float16,
            "the embedding table must be float32, bfloat16, float16 or MLX-quantized");
    }
  } else {
    check(!drafting, "greedy drafting needs an embedding table");
    check(x.ndim() == 3 && x.dtype() == mx::float32, "x must be (B, L, D) float32");
  }
  const int B = x.shape(0), L = x.shape(1);
  const int D = token_ids ? weight_inputs(*embedding) : x.shape(2);
  // Positions written past each row's length: the new ones, and each draft fed but the last.
  const int new_positions = L + std::max(0, greedy_steps - 1);
  check(int(offsets.size()) == B, "one offset per row");
  check(cache_rows.empty() || int(cache_rows.size()) == B, "one cache row per row, or none");
  check(!layers.empty() && num_heads > 0, "at least one layer, and heads");
  check(activation >= kRelu && activation <= kSilu, "unknown activation");
  int longest = 0;
  for (int offset : offsets) {
    check(offset >= 0, "offsets must not be negative");
    longest = std::max(longest, offset);
  }
  check(bias_offset >= 0, "the bias offset must not be negative");
  check(self_bias.ndim() == 4 && self_bias.dtype() == mx::float32 &&
            (self_bias.shape(0) == 1 || self_bias.shape(0) == B) && self_bias.shape(1) == num_heads &&
            self_bias.shape(2) >= bias_offset + new_positions && self_bias.shape(3) >= longest + new_positions,
        "self bias must be (1 or B, H, L, S) float32 with L rows from the bias offset and S past every row's new "
        "positions");
  if (self_bias.shape(0) == 1) {
    for (int offset : offsets) {
      check(offset == offsets[0], "a bias of one row needs every row at the same offset");
    }
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, self_bias};
  DecoderLayers::Spec spec{offsets, cache_rows, cache_in_place, int(layers.size()), num_heads, 0, 0, eps, activation,
                           gated, cross_bias.has_value(), integer, current_kernel_isa(), {}, {}, head.has_value(),
                           head ? head->scale : 1.0f, 0, 0, 0, head && head->integer, greedy_steps, token_ids,
                           std::max(stop, -1), logits, D, 0, 0, bias_offset};
  WeightSlots weights{{}, {}, {}, stream};
  if (cross_bias) {
    inputs.push_back(*cross_bias);
  }
  std::vector<mx::Shape> shapes = {x.shape()};
  for (const auto& layer : layers) {
    const mx::array &keys = layer.cache_keys, &values = layer.cache_values;
    for (const mx::array* a : {&keys, &values, &layer.cross_keys, &layer.cross_values}) {
      check(a->ndim() == 4 && a->dtype() == mx::float32, "caches, cross keys and values must be 4-D float32");
    }
    check((cache_rows.empty() ? keys.shape(0) == B : keys.shape(0) >= 1) && keys.shape(1) == num_heads &&
              values.shape() == keys.shape(),
          "caches must be (B, H, C, d_kv), or (any, H, C, d_kv) with cache rows");
    for (int row : cache_rows) {
      check(row >= -1 && row < keys.shape(0), "a cache row must be -1 or a row of the caches");
    }
    check(keys.shape(2) >= longest + new_positions, "a cache has no room for the new positions");
    const int dk = keys.shape(3);
    check(spec.d_kv == 0 || spec.d_kv == dk, "every layer has the same d_kv");
    spec.d_kv = dk;
    const auto& cross = layer.cross_keys;
    check(cross.shape(0) == B && cross.shape(1) == num_heads && cross.shape(3) == dk &&
              layer.cross_values.shape() == cross.shape(),
          "cross keys and values must be (B, H, P, d_kv)");
    if (cross_bias) {
      check(cross_bias->ndim() == 4 && cross_bias->dtype() == mx::float32 && cross_bias->shape(0) == B &&
                cross_bias->shape(1) == 1 && cross_bias->shape(2) == 1 && cross_bias->shape(3) == cross.shape(2),
            "cross bias must be (B, 1, 1, P) float32");
    }
    check(layer.norms.size() == 3 && layer.weights.size() == kWeights, "three norms and six weights a layer");
    for (const auto& norm : layer.norms) {
      check(norm.ndim() == 1 && norm.shape(0) == D && norm.dtype() == mx::float32,
            "norm weights must be (D) float32");
    }
    const int inner = num_heads * dk;
    const auto& wo = layer.weights[kWo];
    const int d_ff = weight_inputs(wo);
    check(spec.d_ff == 0 || spec.d_ff == d_ff, "every layer has the same d_ff");
    spec.d_ff = d_ff;
    const int ins[kWeights] = {D, inner, D, inner, D, d_ff};
    const int outs[kWeights] = {3 * inner, D, inner, D, (gated ? 2 : 1) * d_ff, D};
    inputs.insert(inputs.end(), {keys, values, cross, layer.cross_values});  // read with their strides
    for (const auto& norm : layer.norms) {
      weights.push(norm);
    }
    for (int i = 0; i < kWeights; i++) {
      const LayerWeight& w = layer.weights[i];
      check(w.w.ndim() == 2 && w.w.shape(0) == outs[i], "a weight's shape does not fit the layer");
      check_weight(w, ins[i], outs[i], "decoder_layers");
      weights.push(w);
      spec.group_sizes.push_back(w.bits ? w.group_size : 0);
      spec.bits.push_back(w.bits);
    }
    shapes.push_back({B, num_heads, keys.shape(2), dk});
    shapes.push_back({B, num_heads, keys.shape(2), dk});
  }
  if (head) {
    const LayerWeight& w = head->weight;
    check(head->final_norm.ndim() == 1 && head->final_norm.shape(0) == D && head->final_norm.dtype() == mx::float32,
          "the final norm's weight must be (D) float32");
    check(w.w.ndim() == 2, "the head's weight must be 2-D");
    const int vocab = w.w.shape(0);
    check_weight(w, D, vocab, "decoder_layers");
    weights.push(head->final_norm);
    weights.push(w);
    spec.head_rows = vocab;
    spec.head_group_size = w.bits ? w.group_size : 0;
    spec.head_bits = w.bits;
    shapes[0] = {B, L, vocab};
  }
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  if (token_ids) {
    check(embedding->w.shape(0) >= spec.head_rows, "the embedding table must have a row for every id the head gives");
    weights.push(*embedding);
    spec.embedding_group_size = embedding->bits ? embedding->group_size : 0;
    spec.embedding_bits = embedding->bits;
    if (!logits) {  // (with logits, the head's (B, L, vocab) float32 above)
      shapes[0] = !drafting ? x.shape() : B == 1 ? mx::Shape{greedy_steps} : mx::Shape{B, greedy_steps};
      dtypes[0] = mx::int32;
    }
  }
  inputs.insert(inputs.end(), weights.late.begin(), weights.late.end());
  spec.held = std::move(weights.held);
  spec.slots = std::move(weights.slots);
  auto primitive = std::make_shared<DecoderLayers>(stream, std::move(spec));
  return mx::array::make_arrays(std::move(shapes), dtypes, primitive, inputs);
}

// Where the inputs of layer l's cache keys are: after x, the self bias and the cross bias (if any), four a layer.
int cache_input(const DecoderLayers::Spec& spec, int layer) {
  return (spec.has_cross_bias ? 3 : 2) + 4 * layer;
}

namespace {

// Each cache computed in place takes its input's buffer; the other outputs are allocated later (dispatch, allocate).
void share_cache_buffers(const DecoderLayers::Spec& spec, const std::vector<mx::array>& inputs,
                         std::vector<mx::array>& outputs) {
  // In place, each cache comes out in its input's buffer with the new positions written into it, where its rows are
  // x's and the buffer is laid out row after row; else in a new buffer, the positions in use copied (copy_cache).
  // MLX would not hand the buffer over by itself (an input of a primitive with several outputs is held by each of
  // them, so it is never donated), so in place is the caller's word that nothing reads the input's positions past
  // each row's length: those are the ones written (KVCache, which replaces its arrays with the outputs).
  if (spec.cache_in_place && spec.cache_rows.empty()) {
    for (int l = 0; l < spec.layers; l++) {
      for (int i = 0; i < 2; i++) {
        const mx::array& in = inputs[cache_input(spec, l) + i];
        mx::array& out = outputs[1 + 2 * l + i];
        if (in.shape() == out.shape() && in.flags().row_contiguous && in.data_size() == in.size()) {
          out.copy_shared_buffer(in);
        }
      }
    }
  }
}

}  // namespace

void DecoderLayers::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  share_cache_buffers(spec_, inputs, outputs);
  dispatch(stream(), inputs, outputs,
           [inputs, outputs, spec = spec_]() mutable { run_stack(spec, inputs, outputs); });
}

void DecoderLayers::eval_here(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  share_cache_buffers(spec_, inputs, outputs);
  allocate(outputs);
  run_stack(spec_, inputs, outputs);
}

void run_now(std::vector<mx::array>& outputs) {
  std::vector<mx::array> inputs = outputs[0].inputs();
  std::vector<mx::array> pending;
  for (const auto& input : inputs) {
    if (input.status() == mx::array::Status::unscheduled) {
      pending.push_back(input);
    }
  }
  if (!pending.empty()) {
    mx::eval(pending);
  }
  for (auto& input : inputs) {
    input.wait();  // (computed by an earlier evaluation that nothing waited for)
  }
  auto& primitive = static_cast<DecoderLayers&>(outputs[0].primitive());
  std::vector<mx::array> siblings = outputs[0].outputs();
  ComputedAtOnce at_once;
  primitive.eval_here(inputs, siblings);
  for (auto& out : siblings) {
    out.set_status(mx::array::Status::available);
    out.detach();
  }
}

void DecoderLayers::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("DecoderLayers runs on the CPU only");
}

std::vector<mx::Shape> DecoderLayers::output_shapes(const std::vector<mx::array>& inputs) {
  // x, or each position's token (token ids in), or the greedy continuation, or the logits.
  mx::Shape first = inputs[0].shape();
  if (spec_.greedy_steps) {
    first = first[0] == 1 ? mx::Shape{spec_.greedy_steps} : mx::Shape{first[0], spec_.greedy_steps};
  } else if (spec_.has_head && !spec_.token_ids) {
    first.back() = spec_.head_rows;
  } else if (spec_.logits) {
    first = {first[0], first[1], spec_.head_rows};
  }
  std::vector<mx::Shape> shapes = {first};
  for (int l = 0; l < spec_.layers; l++) {
    mx::Shape cache = inputs[cache_input(spec_, l)].shape();
    cache[0] = inputs[0].shape(0);  // (with cache rows, the input's rows may be others)
    shapes.push_back(cache);
    shapes.push_back(cache);
  }
  return shapes;
}


mx::array encoder_layers(const mx::array& x, const mx::array& bias, const std::vector<EncoderLayerInputs>& layers,
                         const mx::array& final_norm, int num_heads, float eps, int activation, bool gated, bool integer,
                         mx::StreamOrDevice s) {
  const char* op = "encoder_layers";
  check(x.ndim() == 3 && x.dtype() == mx::float32, "x must be (B, L, D) float32", op);
  const int B = x.shape(0), L = x.shape(1), D = x.shape(2);
  check(!layers.empty() && num_heads > 0, "at least one layer, and heads", op);
  check(activation >= kRelu && activation <= kSilu, "unknown activation", op);
  check(bias.ndim() == 4 && bias.dtype() == mx::float32 && (bias.shape(0) == 1 || bias.shape(0) == B) &&
            bias.shape(1) == num_heads && bias.shape(2) == L && bias.shape(3) == L,
        "bias must be (1 or B, H, L, L) float32", op);
  check(final_norm.ndim() == 1 && final_norm.shape(0) == D && final_norm.dtype() == mx::float32,
        "the final norm's weight must be (D) float32", op);
  auto stream = mx::to_stream(s);
  EncoderLayers::Spec spec{int(layers.size()), num_heads, 0, 0, eps, activation, gated, integer, current_kernel_isa()};
  WeightSlots weights{{}, {}, {}, stream};
  for (const auto& layer : layers) {
    check(layer.norms.size() == 2 && layer.weights.size() == kEncoderWeights, "two norms and four weights a layer",
          op);
    for (const auto& norm : layer.norms) {
      check(norm.ndim() == 1 && norm.shape(0) == D && norm.dtype() == mx::float32, "norm weights must be (D) float32",
            op);
      weights.push(norm);
    }
    const auto& qkv = layer.weights[kEncQkv];
    check(qkv.w.ndim() == 2 && qkv.w.shape(0) % (3 * num_heads) == 0, "qkv's weight must be (3 H d_kv, D)", op);
    const int dk = qkv.w.shape(0) / (3 * num_heads), inner = num_heads * dk;
    check(spec.d_kv == 0 || spec.d_kv == dk, "every layer has the same d_kv", op);
    spec.d_kv = dk;
    const auto& wo = layer.weights[kEncWo];
    const int d_ff = weight_inputs(wo);
    check(spec.d_ff == 0 || spec.d_ff == d_ff, "every layer has the same d_ff", op);
    spec.d_ff = d_ff;
    const int ins[kEncoderWeights] = {D, inner, D, d_ff};
    const int outs[kEncoderWeights] = {3 * inner, D, (gated ? 2 : 1) * d_ff, D};
    for (int i = 0; i < kEncoderWeights; i++) {
      const LayerWeight& w = layer.weights[i];
      check(w.w.ndim() == 2 && w.w.shape(0) == outs[i], "a weight's shape does not fit the layer", op);
      check_weight(w, ins[i], outs[i], op);
      weights.push(w);
      spec.group_sizes.push_back(w.bits ? w.group_size : 0);
      spec.bits.push_back(w.bits);
    }
  }
  weights.push(final_norm);
  std::vector<mx::array> inputs = {x, bias};
  inputs.insert(inputs.end(), weights.late.begin(), weights.late.end());
  spec.held = std::move(weights.held);
  spec.slots = std::move(weights.slots);
  return mx::array(x.shape(), mx::float32, std::make_shared<EncoderLayers>(stream, std::move(spec)), inputs);
}

void EncoderLayers::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch(stream(), inputs, outputs,
           [inputs, out = outputs[0], spec = spec_]() mutable { run_encoder(spec, inputs, out); });
}

void EncoderLayers::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("EncoderLayers runs on the CPU only");
}

std::vector<mx::array> cross_projections(const mx::array& x, const std::vector<LayerWeight>& weights, int num_heads,
                                         bool integer, mx::StreamOrDevice s) {
  const char* op = "cross_projections";
  check(x.ndim() == 3 && x.dtype() == mx::float32, "x must be (B, P, D) float32", op);
  check(!weights.empty() && weights.size() % 2 == 0 && num_heads > 0, "keys and values of at least one layer, and heads",
        op);
  const int B = x.shape(0), P = x.shape(1), D = x.shape(2);
  auto stream = mx::to_stream(s);
  CrossProjections::Spec spec{num_heads, 0, integer, current_kernel_isa()};
  WeightSlots slots{{}, {}, {}, stream};
  for (const LayerWeight& w : weights) {
    check(w.w.ndim() == 2 && w.w.shape(0) % num_heads == 0, "a projection's weight must be (H d_kv, D)", op);
    const int inner = w.w.shape(0);
    check(spec.d_kv == 0 || spec.d_kv * num_heads == inner, "every projection has the same d_kv", op);
    spec.d_kv = inner / num_heads;
    check_weight(w, D, inner, op);
    slots.push(w);
    spec.group_sizes.push_back(w.bits ? w.group_size : 0);
    spec.bits.push_back(w.bits);
  }
  std::vector<mx::array> inputs = {x};
  inputs.insert(inputs.end(), slots.late.begin(), slots.late.end());
  spec.held = std::move(slots.held);
  spec.slots = std::move(slots.slots);
  const int outputs = int(weights.size());
  const mx::Shape shape = {B, num_heads, P, spec.d_kv};
  auto primitive = std::make_shared<CrossProjections>(stream, std::move(spec));
  return mx::array::make_arrays(std::vector<mx::Shape>(outputs, shape), std::vector<mx::Dtype>(outputs, mx::float32),
                                primitive, inputs);
}

void CrossProjections::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch(stream(), inputs, outputs, [inputs, outputs, spec = spec_]() mutable {
    const mx::array& x_in = inputs[0];
    const int B = x_in.shape(0), P = x_in.shape(1), D = x_in.shape(2), R = B * P;
    const int H = spec.heads, dk = spec.d_kv, inner = H * dk, ld = padded(D);
    // x's rows, ld apart (see run_product).
    std::vector<float> x(size_t(R) * ld, 0.0f);
    read_rows(x_in, x.data(), ld);
    WeightReader weights{spec.held, spec.slots, inputs, 1};
    std::vector<Weights> projections;
    for (size_t i = 0; i < outputs.size(); i++) {
      projections.push_back(weights.weight(spec.group_sizes[i], spec.bits[i]));
    }
    // Projection i into y (its rows before they are split by head), then out i (B, P, H, d_kv) -> (B, H, P, d_kv).
    auto project = [&](int i, float* y) {
      const Weights& w = projections[i];
      product_rows(spec.isa, spec.integer, x.data(), ld, R, D, *w.w, w.scales, w.biases, w.group_size, w.bits, y,
                   inner);
      float* out = outputs[i].data<float>();
      for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
          for (int p = 0; p < P; p++) {
            std::memcpy(out + ((size_t(b) * H + h) * P + p) * dk, &y[(size_t(b) * P + p) * inner + size_t(h) * dk],
                        dk * sizeof(float));
          }
        }
      }
    };
    const int count = int(outputs.size());
    if (count >= 2 * kernel_threads()) {
      // Whole projections per task, one job for all (the demo main model's 16 of a 20-token prompt: 16 jobs took
      // 0.24-0.38 ms, their multiply-adds about 0.12).
      products_in_one_job(count, [&](int i) {
        std::vector<float> y(size_t(R) * inner);
        project(i, y.data());
      });
    } else {
      std::vector<float> y(size_t(R) * inner);
      for (int i = 0; i < count; i++) {
        project(i, y.data());
      }
    }
  });
}

void CrossProjections::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("CrossProjections runs on the CPU only");
}

}  // namespace t5kernels
