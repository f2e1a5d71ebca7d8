// T5 decoder layers for decoding as one MLX primitive on the CPU: self-attention over a cache, cross-attention,
// the feed-forward block, their norms and residual sums, in float32 activations. A decode step of a small model is
// mostly operations, each a few microseconds of scheduling whatever its size; these are one operation for all the layers.
#pragma once

#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace t5kernels {

namespace mx = mlx::core;

// A linear layer as the layer takes it: a float weight (out, in), or MLX's affine quantization of one.
struct LayerWeight {
  mx::array w;
  std::optional<mx::array> scales;
  std::optional<mx::array> biases;
  int group_size = 0;
  int bits = 0;
};

enum Activation { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

// One layer's inputs: its self-attention cache (B, H, C, d_kv), the prompt's cross-attention keys and values
// (B, H, P, d_kv), the three RMS norm weights (self-attention, cross-attention, feed-forward) and the six products:
// qkv (the three projections stacked), o, cross q, cross o, wi (wi_0 and wi_1 stacked where gated), wo.
struct DecoderLayerInputs {
  mx::array cache_keys, cache_values, cross_keys, cross_values;
  std::vector<mx::array> norms;
  std::vector<LayerWeight> weights;
};

// The output layer, where the layers compute the logits too: the final RMS norm's weight, a scale (T5 v1.0 scales
// before its tied head; else 1), the head's weight (vocab, D), and whether a quantized head takes int8 activations.
struct Head {
  mx::array final_norm;
  float scale;
  LayerWeight weight;
  bool integer;
};

// Decoder layers, one after the other, on x (B, L, D) float32: the L new positions of rows whose earlier
// self-attention keys and values are in each layer's cache below offsets[b]. self_bias (1 or B, H, L, S) is the
// additive causal bias of row b's queries (at positions offsets[b]..) over keys 0..S-1, and cross_bias (B, 1, 1, P)
// an optional additive bias over the prompt's positions. Returns x out and each layer's cache with the new keys and
// values written at each row's positions offsets[b]..offsets[b] + L - 1 (in the input's buffer where nothing else
// holds it, else in a copy); the cache needs room for them. With a head, the first output is the logits
// (B, L, vocab) instead of x. With an `embedding` (vocab, D) table (float32, bfloat16, float16, or MLX's affine 4/8-bit
// quantization of one: bits > 0) and the head, x is token ids
// (B, L) int32 instead, and the first output each position's most likely next token (B, L) int32, the greedy
// verification of drafts. With greedy_steps > 0 too, the first output is each row's greedy continuation of
// greedy_steps tokens (int32; (greedy_steps) for one row, else (B, greedy_steps)): each step's most likely token is fed
// to the row's next step (the last is not fed), all in one operation; self_bias then covers the L + greedy_steps - 1 positions fed. A `stop` token (one row of ids; EOS where it
// ends the output) ends the work early: greedy drafting stops after drafting it (the remaining tokens are the stop
// token), and a verification computes nothing from the first stop token past the first id on (their tokens are -1).
// With token ids and `logits` (no drafting, no stop token), the first output is the logits (B, L, vocab): a step that
// needs the whole distribution (sampling) without the embedding's own operations.
// With `cache_rows` (one per row of x), row b's cache is row cache_rows[b] of the caches given (-1: an empty row,
// which has joined the batch), whatever rows they have; the caches out have x's rows. Without, the caches' rows are
// x's. With `cache_in_place`, a cache whose rows are x's comes out in its input's buffer (see DecoderLayers::eval_cpu).
std::vector<mx::array> decoder_layers(const mx::array& x, const mx::array& self_bias,
                                      const std::optional<mx::array>& cross_bias, const std::vector<int>& offsets,
                                      const std::vector<DecoderLayerInputs>& layers, int num_heads, float eps,
                                      int activation, bool gated, bool integer,
                                      const std::optional<Head>& head = std::nullopt,
                                      const std::optional<LayerWeight>& embedding = std::nullopt, int greedy_steps = 0,
                                      int stop = -1, bool logits = false, const std::vector<int>& cache_rows = {},
                                      bool cache_in_place = false, int bias_offset = 0, mx::StreamOrDevice s = {});

// One encoder layer's inputs: the two RMS norm weights (self-attention, feed-forward) and the four products: qkv (the
// three projections stacked), o, wi (wi_0 and wi_1 stacked where gated), wo.
struct EncoderLayerInputs {
  std::vector<mx::array> norms;
  std::vector<LayerWeight> weights;
};

// Encoder layers, one after the other, then the final RMS norm, on x (B, L, D) float32: each layer's self-attention of
// every position over every position of its row, with `bias` (1 or B, H, L, L) added to the scores (the relative
// position bias and the padding's), and its feed-forward block. Returns the encoder output (B, L, D).
mx::array encoder_layers(const mx::array& x, const mx::array& bias, const std::vector<EncoderLayerInputs>& layers,
                         const mx::array& final_norm, int num_heads, float eps, int activation, bool gated, bool integer,
                         mx::StreamOrDevice s = {});

class EncoderLayers : public mx::Primitive {
 public:
  struct Spec {
    int layers, heads, d_kv, d_ff;
    float eps;
    int activation;
    bool gated, integer;
    int isa;
    std::vector<int> group_sizes, bits;  // per layer and weight
    // Each layer's two norms and four products' arrays, then the final norm, as DecoderLayers::Spec keeps them; the
    // inputs not held come after x and the bias.
    std::vector<mx::array> held;
    std::vector<int> slots;
  };

  EncoderLayers(mx::Stream stream, Spec spec) : mx::Primitive(stream), spec_(std::move(spec)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "EncoderLayers";
  }

 private:
  Spec spec_;
};

// Each decoder layer's cross-attention keys and values of the encoder output x (B, P, D) float32, as one operation:
// weights holds each layer's key and value projections in turn (2 per layer, each (H d_kv, D)), and the outputs are
// their products with x as (B, H, P, d_kv) float32, keys and values of each layer in turn. integer: quantized weights
// take int8 activations (as decode_matmul's integer).
std::vector<mx::array> cross_projections(const mx::array& x, const std::vector<LayerWeight>& weights, int num_heads,
                                         bool integer, mx::StreamOrDevice s = {});

class CrossProjections : public mx::Primitive {
 public:
  struct Spec {
    int heads, d_kv;
    bool integer;
    int isa;
    std::vector<int> group_sizes, bits;  // per weight
    std::vector<mx::array> held;  // the weights' arrays, as DecoderLayers::Spec keeps them
    std::vector<int> slots;
  };

  CrossProjections(mx::Stream stream, Spec spec) : mx::Primitive(stream), spec_(std::move(spec)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "CrossProjections";
  }

 private:
  Spec spec_;
};

class DecoderLayers : public mx::Primitive {
 public:
  struct Spec {
    std::vector<int> offsets;
    std::vector<int> cache_rows;  // row b's cache is the input's row cache_rows[b] (-1: none); empty: row b
    bool cache_in_place;  // a cache of x's rows written into its input's buffer
    int layers, heads, d_kv, d_ff;
    float eps;
    int activation;
    bool gated, has_cross_bias, integer;
    int isa;
    std::vector<int> group_sizes, bits;  // per layer and weight
    bool has_head;
    float scale;
    int head_rows, head_group_size, head_bits;
    bool head_integer;
    int greedy_steps = 0;  // > 0: greedy drafting of that many tokens from token ids (decoder_layers)
    bool token_ids = false;  // x is token ids: greedy drafting, or each position's most likely next token
    int stop = -1;  // with token ids, a token after which nothing is computed (-1: none)
    bool logits = false;  // with token ids, the logits out instead of the most likely tokens
    int d_model = 0;
    int embedding_group_size = 0, embedding_bits = 0;  // a quantized embedding table's (bits 0: float)
    int bias_offset = 0;  // the self bias's row of the first new position
    // Where each weight is, in order (each layer's three norms and six products' arrays, then the final norm and
    // the head's): held[slot] for slot >= 0, else the input ~slot places after the layers' caches.
    std::vector<mx::array> held;
    std::vector<int> slots;
  };

  DecoderLayers(mx::Stream stream, Spec spec) : mx::Primitive(stream), spec_(std::move(spec)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "DecoderLayers";
  }
  // Computes the outputs on the calling thread, not the stream's (see run_now).
  void eval_here(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs);

 private:
  Spec spec_;
};

// Computes `outputs` (the arrays decoder_layers returned, not yet evaluated) on the calling thread and the kernels'
// own, without MLX's scheduler: each evaluation through the stream's thread waits for that thread to wake and then for
// the caller to, which cost about 50 microseconds on a 2-core VM, a third of a small model's step. Inputs not yet
// computed are evaluated first. The outputs come out evaluated, detached from the graph.
void run_now(std::vector<mx::array>& outputs);

}  // namespace t5kernels
