"""A T5 encoder-decoder in MLX, exact to transformers' T5ForConditionalGeneration for every T5 variant."""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear

import kernels
from cache import KVCache
from native_layers import FusedLinear, Module, NativeDecoderSteps, float32, kept_parts, native_parts, native_weights

# The encoder's self-attention runs in blocks of query rows whose scores take about this many bytes (at least one
# row), so that its memory grows linearly with the prompt's length beyond one block.
ATTENTION_BLOCK_BYTES = 64 << 20

# A prompt whose encoder bias (1 or B, heads, L, L) float32 may take more than this is encoded before its
# cross-attention keys and values are made (T5.cross_kv), so that the bias is freed first (a 510-token t5-11b prompt's
# 133 MB beside their 1.6 GB); a shorter one's are one graph with the encoder, one wait fewer.
SEPARATE_ENCODER_BYTES = 16 << 20

# Activations transformers' T5 configs name in `feed_forward_proj` ("relu", "gated-gelu", ...).
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # exact erf gelu, as transformers' ACT2FN["gelu"]
    "gelu_new": nn.gelu_approx,  # tanh approximation
    "gelu_pytorch_tanh": nn.gelu_approx,
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclass
class ModelArgs:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: Optional[bool] = None
    decoder_start_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 0
    # Derived in __post_init__.
    is_gated: bool = field(init=False)
    activation: str = field(init=False)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        parts = self.feed_forward_proj.split("-")
        self.is_gated = parts[0] == "gated"
        self.activation = parts[-1]
        # transformers maps "gated-gelu" to the tanh approximation for backwards compatibility.
        if self.feed_forward_proj == "gated-gelu":
            self.activation = "gelu_new"
        if len(parts) > 2 or (len(parts) == 2 and not self.is_gated) or self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported feed_forward_proj {self.feed_forward_proj!r}")
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucketing of (key position - query position), in float32 exactly as transformers computes it."""
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    with np.errstate(divide="ignore"):
        scaled = np.log(relative_position.astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, relative_position, large)


@mx.compile
def rms_norm(x, weight, eps: float):
    # Accumulate in float32 (transformers does), then cast to the weight's dtype. Compiled: on a CPU the norm is a
    # chain of a dozen small operations, which compile fuses into three.
    return weight * mx.fast.rms_norm(x.astype(mx.float32), None, eps).astype(weight.dtype)


class RMSNorm(Module):
    """T5's layer norm: no mean subtraction, no bias; the result takes the weight's dtype when it is half."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        inner = args.num_heads * args.d_kv  # not always d_model (t5-3b, t5-11b)
        self.num_heads = args.num_heads
        self.q = nn.Linear(args.d_model, inner, bias=False)
        self.k = nn.Linear(args.d_model, inner, bias=False)
        self.v = nn.Linear(args.d_model, inner, bias=False)
        self.o = nn.Linear(inner, args.d_model, bias=False)

    def heads(self, x):
        # (B, L, heads * d_kv) -> (B, heads, L, d_kv)
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

    def project_kv(self, source):
        return self.heads(self.k(source)), self.heads(self.v(source))

    def __call__(self, x, bias, keys=None, values=None, cache=None):
        """Attend from x to itself, or to precomputed `keys`/`values` (cross-attention). `bias` is additive (None:
        every key is attended to)."""
        B, L, _ = x.shape
        if "qkv" in self:  # the decoding layout: one product for all three projections
            queries, keys, values = map(self.heads, mx.split(self.qkv(x), 3, axis=-1))
        else:
            queries = self.heads(self.q(x))
            if keys is None:
                keys, values = self.project_kv(x)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        return self.o(self.attend(queries, keys, values, bias).transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, queries, keys, values, bias):
        # T5 attention has no 1/sqrt(d_kv) scaling.
        mask = None if bias is None else bias.astype(queries.dtype)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)

    def attend_in_blocks(self, x, bias_of, block):
        """Self-attention of x over itself, `block` query rows at a time; bias_of(start, stop) is the additive bias
        (B or 1, heads, stop - start, L) of queries start..stop-1, built per block so that none is (L, L) whole."""
        B, L, _ = x.shape
        if "qkv" in self:
            queries, keys, values = map(self.heads, mx.split(self.qkv(x), 3, axis=-1))
        else:
            queries = self.heads(self.q(x))
            keys, values = self.project_kv(x)
        if block >= L:
            out = self.attend(queries, keys, values, bias_of(0, L))
        else:
            blocks = []
            for start in range(0, L, block):
                stop = min(start + block, L)
                blocks.append(self.attend(queries[:, :, start:stop], keys, values, bias_of(start, stop)))
                # Evaluated now, so that one block's scores are freed before the next block's are made.
                mx.eval(blocks[-1])
            out = mx.concatenate(blocks, axis=2)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.is_gated:
            self.wi_0 = nn.Linear(args.d_model, args.d_ff, bias=False)
            self.wi_1 = nn.Linear(args.d_model, args.d_ff, bias=False)
        else:
            self.wi = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.wo = nn.Linear(args.d_ff, args.d_model, bias=False)
        self.act = ACTIVATIONS[args.activation]
        self.is_gated = args.is_gated

    def __call__(self, x):
        if "wi_01" in self:  # the decoding layout: both gated projections in one product
            gate, linear = mx.split(self.wi_01(x), 2, axis=-1)
            h = self.act(gate) * linear
        elif self.is_gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.act(self.wi(x))
        # A float16 conversion keeps wo in float32 (as transformers does); compute it there.
        if "weight" in self.wo and self.wo.weight.dtype == mx.float32:
            h = h.astype(mx.float32)
        return self.wo(h)


def clamp_fp16(x):
    # transformers clamps float16 hidden states so that residual sums never reach inf.
    if x.dtype == mx.float16:
        limit = float(np.finfo(np.float16).max) - 1000
        return mx.clip(x, -limit, limit)
    return x


class EncoderLayer(Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.self_attn_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)
        self.mlp = MLP(args)
        self.mlp_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)

    def __call__(self, x, bias_of, block):
        x = clamp_fp16(x + self.self_attn.attend_in_blocks(self.self_attn_norm(x), bias_of, block))
        return clamp_fp16(x + self.mlp(self.mlp_norm(x)))

    def native_parts(self):
        """The layer's norms and products (modules) that kernels.encoder_layers computes it from, or None where it
        cannot (as DecoderLayer.native_parts)."""
        attention, mlp = self["self_attn"], self["mlp"]
        if "qkv" not in attention:
            return None
        return native_parts((self["self_attn_norm"], self["mlp_norm"]), (attention["qkv"], attention["o"]), mlp)


class DecoderLayer(Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.self_attn_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)
        self.cross_attn = Attention(args)
        self.cross_attn_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)
        self.mlp = MLP(args)
        self.mlp_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)
        # Cross-attention and feed-forward keep their shapes from step to step, so they compile once per prompt into
        # fewer op dispatches (5-20% faster decode steps on small models). The layer's weights are inputs, not
        # constants, so loading or editing them later is seen.
        self.cross_and_mlp = mx.compile(self.cross_and_mlp_uncompiled, inputs=self)

    def __call__(self, x, self_bias, cross_kv, cross_bias, cache):
        x = clamp_fp16(x + self.self_attn(self.self_attn_norm(x), self_bias, cache=cache))
        return self.cross_and_mlp(x, *cross_kv, cross_bias)

    def native_parts(self):
        """The layer's norms and products (modules) that kernels.decoder_layers computes it from, or None where it
        cannot: it needs the decoding layout (every product a FusedLinear, none summed across ranks)."""
        attention, cross, mlp = self["self_attn"], self["cross_attn"], self["mlp"]
        if "qkv" not in attention:
            return None
        norms = (self["self_attn_norm"], self["cross_attn_norm"], self["mlp_norm"])
        return native_parts(norms, (attention["qkv"], attention["o"], cross["q"], cross["o"]), mlp)

    def cross_and_mlp_uncompiled(self, x, keys, values, cross_bias):
        x = clamp_fp16(x + self.cross_attn(self.cross_attn_norm(x), cross_bias, keys, values))
        return clamp_fp16(x + self.mlp(self.mlp_norm(x)))


def padding_bias(attention_mask, dtype):
    """(B, L) mask of 1 = token, 0 = padding -> additive (B, 1, 1, L) attention bias."""
    return mx.where(attention_mask[:, None, None, :].astype(mx.bool_), 0.0, mx.finfo(dtype).min).astype(dtype)


@functools.lru_cache(maxsize=256)
def distance_buckets(length: int, num_buckets: int, max_distance: int) -> mx.array:
    """The encoder's bucket of each key-minus-query distance -(L-1)..L-1, kept per prompt length (a function of the
    length and the model's settings alone)."""
    distances = np.arange(1 - length, length)
    return mx.array(relative_position_bucket(distances, True, num_buckets, max_distance))


class Encoder(Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.relative_attention_bias = nn.Embedding(args.relative_attention_num_buckets, args.num_heads)
        self.layers = [EncoderLayer(args) for _ in range(args.num_layers)]
        self.final_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)

    def distance_bias(self, length):
        """(heads, 2L - 1): the bias of each key-minus-query distance -(L-1)..L-1, from the bucket of each."""
        args = self.args
        buckets = distance_buckets(length, args.relative_attention_num_buckets, args.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).T

    def block_rows(self, batch_size, length):
        """Query rows per block of self-attention: scores of about ATTENTION_BLOCK_BYTES, at least one row."""
        heads = self.relative_attention_bias.weight.shape[1]  # this rank's heads, once sharded
        return max(1, ATTENTION_BLOCK_BYTES // (batch_size * heads * length * 4))

    def __call__(self, x, attention_mask):
        B, L, _ = x.shape
        distance_bias = mx.contiguous(self.distance_bias(L))
        heads = distance_bias.shape[0]
        padding = padding_bias(attention_mask, mx.float32)

        def bias_of(start, stop):
            # (1 or B, heads, stop - start, L); the same for every layer (relative bias only in the first). Row q is
            # the window distance_bias[:, L-1-q : 2L-1-q]: a strided view (-1 per query row, 1 per key) read in one
            # copy, ten times faster than gathering every (query, key) distance.
            rows = mx.as_strided(distance_bias, (heads, stop - start, L), (2 * L - 1, -1, 1), L - 1 - start)
            return rows[None] + padding

        block = self.block_rows(B, L)
        # The native layers attend one query row at a time and make no scores beyond it, only the whole bias, up to
        # three blocks of scores (what the memory estimate counts for a block's bias, scores and weights).
        native = kernels.native_layers_take(x) and B * heads * L * L * 4 <= 3 * ATTENTION_BLOCK_BYTES
        parts = kept_parts(self) if native else None
        if parts is not None:  # every layer and the final norm in one native operation, in float32
            first = self.layers[0]
            layers, final_norm = native_weights(self, parts)
            return kernels.encoder_layers(
                float32(x),
                bias_of(0, L),
                layers,
                final_norm,
                heads,
                first.mlp_norm.eps,
                self.args.activation,
                self.args.is_gated,
            )
        if block >= L:  # one block: its bias computed once and shared by all layers
            whole = bias_of(0, L)

            def whole_bias(start, stop):
                return whole

        for layer in self.layers:
            x = layer(x, whole_bias if block >= L else bias_of, block)
        return self.final_norm(x)


# The decoder's table of self-attention biases grows by this many positions, up to this many bytes.
BIAS_TABLE_STEP = 256
BIAS_TABLE_BYTES = 64 << 20


class Decoder(NativeDecoderSteps, Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.relative_attention_bias = nn.Embedding(args.relative_attention_num_buckets, args.num_heads)
        self.layers = [DecoderLayer(args) for _ in range(args.num_decoder_layers)]
        self.final_norm = RMSNorm(args.d_model, args.layer_norm_epsilon)
        # The bucket of each query-key distance 0..max_distance, computed once (a decoder never looks ahead); the
        # leading underscore keeps it out of the parameters.
        distances = -np.arange(args.relative_attention_max_distance + 1)
        self._distance_buckets = mx.array(
            relative_position_bucket(
                distances, False, args.relative_attention_num_buckets, args.relative_attention_max_distance
            )
        )
        self._bias_table = (None, None)  # (the bias of every position up to a size, the weights it came from)

    def position_bias(self, offsets, length):
        """Causal bias (rows, heads, L, S) for each row's queries at positions offset..offset+L-1 over keys
        0..S-1 (S: the longest row's offset + L); one row stands for all when every row is at the same offset."""
        same = len(set(offsets)) == 1
        end = max(offsets) + length
        table = self.bias_table(end)
        if table is not None:
            if same:
                return table[:, :, offsets[0] : end, :end]
            # Row b's queries are the table's rows offsets[b]..: one gather (heads, rows, L, C), a view of it after.
            # Computing the bias instead takes about twenty operations a step.
            queries = mx.array([[offset + i for i in range(length)] for offset in offsets])
            return mx.take(table[0, :, :, :end], queries, axis=1).transpose(1, 0, 2, 3)
        return self.compute_position_bias(offsets[:1] if same else offsets, length)

    def position_bias_rows(self, offsets, length):
        """(bias, row): position_bias(offsets, length) as the bias's rows from `row` on: where one row stands for all,
        the kept table itself (no slicing operation), else the bias computed for these positions (row 0)."""
        if len(set(offsets)) == 1:
            table = self.bias_table(offsets[0] + length)
            if table is not None:
                return table, offsets[0]
        return self.position_bias(offsets, length), 0

    def bias_table(self, end):
        """The causal bias of every query over every key up to a multiple of BIAS_TABLE_STEP positions past `end`,
        (1, heads, C, C), kept for the steps that follow (a slice of it is one operation, computing a step's bias
        about twenty); None where it would take more than BIAS_TABLE_BYTES."""
        weight = self.relative_attention_bias.weight
        table, source = self._bias_table
        if table is None or source is not weight or table.shape[-1] < end:
            size = -(-end // BIAS_TABLE_STEP) * BIAS_TABLE_STEP
            if weight.shape[1] * size * size * 4 > BIAS_TABLE_BYTES:
                return None
            table = self.compute_position_bias([0], size)
            self._bias_table = (table, weight)  # rebuilt when the weights are replaced
        return table

    def compute_position_bias(self, offsets, length):
        end = max(offsets) + length
        # (rows, L, S): query position minus key position
        distance = (mx.array(offsets)[:, None, None] + mx.arange(length)[:, None]) - mx.arange(end)
        # Every distance from max_distance on shares the last bucket.
        buckets = self._distance_buckets[mx.clip(distance, 0, self.args.relative_attention_max_distance)]
        bias = self.relative_attention_bias(buckets).transpose(0, 3, 1, 2).astype(mx.float32)
        return mx.where(distance[:, None] < 0, mx.finfo(mx.float32).min, bias)

    def __call__(self, x, cross_kv, cross_bias, cache, head, scale=None):
        """The logits of x (B, L, d_model), the embedded tokens that continue what `cache` holds: the layers, the final
        norm, the `scale` (if any) and the `head` (a layer)."""
        # (Reserving room makes a new cache take x's rows: the offsets are read after it.)
        layers = self.native_layers(*x.shape[:2], cross_kv, cache) if kernels.native_layers_take(x) else None
        self_bias = self.position_bias(cache[0].offsets, x.shape[1])
        if layers is not None:
            # Every layer in one native operation (in float32), which writes each layer's new keys and values into its
            # cache, and the logits too where the head is one the kernels compute.
            layers, final_norm, rows = layers
            head_weight = head.native_weight() if type(head) is FusedLinear else None
            output_layer = None
            if head_weight is not None:
                output_layer = (final_norm, 1.0 if scale is None else scale, head_weight)
            x = self.run_native(float32(x), self_bias, cross_bias, cache, layers, output_layer, x.shape[1], rows=rows)
            if output_layer is not None:
                return x
        else:
            for layer, layer_kv, layer_cache in zip(self.layers, cross_kv, cache):
                x = layer(x, self_bias, layer_kv, cross_bias, layer_cache)
        x = self.final_norm(x)
        return head(x if scale is None else x * scale)


class T5(Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.group = None  # the ranks sharing the attention heads and feed-forward units, once sharded

    def embed(self, ids):
        """The embeddings of token ids, in the activations' dtype (the norms'): a float32 model may keep its table in
        bfloat16 (convert.py's keep_bfloat16), whose rows float32 holds exactly."""
        x = self.shared(ids)
        dtype = self.decoder.final_norm.weight.dtype
        return x.astype(dtype) if x.dtype == mx.bfloat16 and dtype == mx.float32 else x

    def encode(self, input_ids, attention_mask=None):
        """(B, L) padded token ids and their 0/1 mask -> encoder output (B, L, d_model)."""
        if attention_mask is None:
            attention_mask = mx.ones(input_ids.shape, dtype=mx.int32)
        return self.encoder(self.embed(input_ids), attention_mask)

    def memory_needed(self, length: int, batch_size: int = 1, max_tokens: int = 0) -> int:
        """Bytes beyond the weights that encoding `batch_size` prompts of `length` tokens and decoding `max_tokens`
        for each takes, estimated from above: one encoder layer's activations (float32 at most) and its blocks of
        attention scores, and every decoder layer's cross-attention keys and values and self-attention cache."""
        args, size = self.args, 4
        inner = args.num_heads * args.d_kv
        tokens = batch_size * length
        # x, its norm, q, k, v, the attention output, the residual sums; the feed-forward's inner units (two or three).
        encoder = tokens * size * (4 * args.d_model + 5 * inner + (3 if args.is_gated else 2) * args.d_ff)
        # A block's bias, scores and weights (at least one query row however long the prompt); the bias per distance.
        rows = min(self.encoder.block_rows(batch_size, length), length)
        attention = 3 * rows * batch_size * args.num_heads * length * size + 2 * length * (size + 8)
        cross_kv = args.num_decoder_layers * 2 * inner * size * tokens
        cache = args.num_decoder_layers * 2 * inner * size * batch_size * max_tokens
        logits = 16 * batch_size * args.vocab_size * size  # a verification step's rows
        return encoder + attention + cross_kv + cache + logits

    def cross_kv(self, encoder_output):
        """Each decoder layer's cross-attention keys and values, computed once per prompt: as one native operation, in
        float32, where the layers are native (on the CPU, each projection one the kernels take). A long prompt's
        encoder output is evaluated first (SEPARATE_ENCODER_BYTES)."""
        batch, length = encoder_output.shape[:2]
        if batch * self.args.num_heads * length**2 * 4 > SEPARATE_ENCODER_BYTES:
            mx.eval(encoder_output)
        attentions = [layer.cross_attn for layer in self.decoder.layers]
        if kernels.native_layers_take(encoder_output) and all(type(a["k"]) is FusedLinear for a in attentions):
            weights = [w for a in attentions for w in (a.k.native_weight(), a.v.native_weight())]
            if None not in weights and len({w[4] for w in weights}) == 1:
                projected = kernels.cross_projections(float32(encoder_output), weights, attentions[0].num_heads)
                return list(zip(projected[::2], projected[1::2]))
        return [attention.project_kv(encoder_output) for attention in attentions]

    def make_cache(self, batch_size: int = 1):
        """An empty self-attention cache per decoder layer, for `batch_size` rows."""
        return [KVCache(batch_size) for _ in self.decoder.layers]

    def decode(self, decoder_ids, cross_kv, cache, attention_mask=None):
        """Logits (B, L, vocab) for decoder_ids (B, L) that continue what `cache` holds."""
        # Natively: the embedding looked up by the layers' own operation (a few operations fewer a step).
        logits = self.greedy_tokens(decoder_ids, cross_kv, cache, attention_mask, 0, logits=True)
        if logits is not None:
            return logits
        # Without padding no cross-attention bias: adding zeros would cost operations and change nothing.
        cross_bias = None if attention_mask is None else padding_bias(attention_mask, mx.float32)
        # Original T5 rescales before its head (transformers does so whenever the config ties embeddings).
        scale = self.args.d_model**-0.5 if self.args.scale_decoder_outputs else None
        head = self["lm_head"] if "lm_head" in self else self.shared.as_linear
        return self.decoder(self.embed(decoder_ids), cross_kv, cross_bias, cache, head, scale)

    def greedy_draft(self, decoder_ids, cross_kv, cache, count, stop=None, now=False):
        """The greedy continuation (count,) int32 of decoder_ids (1, L) in one native operation, or None where the
        native layers do not apply (see Decoder.greedy_tokens). After a `stop` token (EOS where it ends the output)
        nothing is computed, and the rest of the tokens are `stop`. With `now`, computed before it returns (on the
        calling thread: for a caller that would wait for it next, see kernels.decoder_layers)."""
        return self.greedy_tokens(decoder_ids, cross_kv, cache, None, count, stop, now=now)

    def greedy_choices(self, decoder_ids, cross_kv, cache, attention_mask=None, stop=None, now=False):
        """The most likely token after each of decoder_ids (B, L), int32 (the argmax of `decode`'s logits, the first of
        equal ones), computed in one native operation without the logits; None where the native layers do not apply.
        With a `stop` token (one row: EOS where it ends the output), nothing is computed from its first occurrence past
        the first id on, and the tokens there are -1 (what follows a stop token is never kept). `now`: as
        greedy_draft's."""
        return self.greedy_tokens(decoder_ids, cross_kv, cache, attention_mask, 0, stop, now=now)

    def choices(self, decoder_ids, cross_kv, cache, attention_mask=None, stop=None, now=False):
        """The most likely token after each of decoder_ids (B, L): `greedy_choices` where the native layers apply, else
        the argmax of `decode`'s logits (which computes every position, a stop token or not)."""
        choices = self.greedy_choices(decoder_ids, cross_kv, cache, attention_mask, stop, now)
        if choices is None:
            return mx.argmax(self.decode(decoder_ids, cross_kv, cache, attention_mask), axis=-1)
        return choices

    def greedy_tokens(self, decoder_ids, cross_kv, cache, attention_mask, count, stop=None, logits=False, now=False):
        """greedy_draft (count > 0) and greedy_choices (count 0): the decoder's native greedy tokens (with `logits`,
        the logits), with this model's head, scale and embedding table; None where they do not apply."""
        table = self.embedding_table()
        if table is None or "lm_head" not in self:
            return None
        cross_bias = None if attention_mask is None else padding_bias(attention_mask, mx.float32)
        scale = self.args.d_model**-0.5 if self.args.scale_decoder_outputs else None
        return self.decoder.greedy_tokens(
            decoder_ids, cross_kv, cross_bias, cache, self["lm_head"], scale, table, count, stop, logits, now
        )

    def embedding_table(self):
        """The token embeddings as kernels.decoder_layers takes them: the table (float), or (weight, scales, biases,
        group_size, bits) where MLX's affine quantization holds it; None for another kind of embedding."""
        shared = self["shared"]
        if type(shared) is nn.Embedding:
            return shared.weight
        if (
            type(shared) is nn.QuantizedEmbedding
            and getattr(shared, "mode", "affine") == "affine"
            and "biases" in shared
        ):
            return shared.weight, shared.scales, shared.biases, shared.group_size, shared.bits
        return None

    def __call__(self, input_ids, decoder_ids, attention_mask=None):
        cross_kv = self.cross_kv(self.encode(input_ids, attention_mask))
        return self.decode(decoder_ids, cross_kv, self.make_cache(), attention_mask)

    def use_decoding_layout(self):
        """Compute every linear layer with `kernels.linear` (fast products of a few rows on a CPU, in every dtype),
        the self-attention projections (and the gated feed-forward's two input projections) fused into one each."""
        for layer in [*self.encoder.layers, *self.decoder.layers]:
            attention, mlp = layer.self_attn, layer.mlp
            attention.qkv = FusedLinear(attention.q, attention.k, attention.v)
            attention.o = FusedLinear(attention.o, group=self.group)
            del attention.q, attention.k, attention.v
            if "cross_attn" in layer:
                cross = layer.cross_attn
                cross.q, cross.k, cross.v = (FusedLinear(cross[name]) for name in ("q", "k", "v"))
                cross.o = FusedLinear(cross.o, group=self.group)
            if mlp.is_gated:
                mlp.wi_01 = FusedLinear(mlp.wi_0, mlp.wi_1)
                del mlp.wi_0, mlp.wi_1
            else:
                mlp.wi = FusedLinear(mlp.wi)
            mlp.wo = FusedLinear(mlp.wo, group=self.group)
        # Untied: the head itself; tied: the embedding table's own arrays (no copy).
        self.lm_head = FusedLinear(self.lm_head if "lm_head" in self else self.shared)

    def pack_for_kernels(self):
        """Make the native kernels' packed copies of the linear layers' weights now, as a prompt's first native calls
        would (native_weights per stack, FusedLinear.native_weight for the cross-attention keys and values and the
        head), in the order a prompt first uses them: the encoder, the cross-attention keys and values, the decoder's
        steps, the head. Made at a process's first prompt instead, they took 15 of the demo pair's 25 ms there (a fresh
        `python main.py`), and a model under the budget of copies packs the same layers either way. Nothing where the
        native layers do not run (kernels.fused_layers off, or another device than the CPU)."""
        if not kernels.fused_layers or mx.default_device() != mx.cpu:
            return

        def pack_stack(stack):
            parts = kept_parts(stack)
            if parts is not None:
                native_weights(stack, parts)

        def pack_each(linears):
            for linear in linears:
                if type(linear) is FusedLinear:
                    linear.native_weight()

        pack_stack(self.encoder)
        pack_each(layer.cross_attn[name] for layer in self.decoder.layers for name in ("k", "v"))
        pack_stack(self.decoder)
        pack_each([self.get("lm_head")])

    def pack_quantized_in_place(self) -> bool:
        """Where the packed copies of the layers' quantized weights would not fit the process's budget for copies
        (kernels.pack_budget; 0 packs none), hold every layer's weight packed instead of MLX's layout (FusedLinear.
        pack_in_place): a large model's products all read the layout the kernels multiply fastest, and the model
        keeps one copy of each weight. The head stays as it is (tied, it is the embedding table). Returns whether it
        packed."""
        layers = [m for m in self.modules() if type(m) is FusedLinear and m is not self.get("lm_head")]
        total = sum(layer.packed_in_place_bytes() for layer in layers)
        budget = kernels.pack_budget()
        if not budget or total <= budget:
            return False
        for layer in layers:
            layer.pack_in_place()
        return True

    def shard(self, group):
        """Split the attention heads and the feed-forward's inner units across the ranks of `group` (tensor
        parallelism, as Megatron-LM): q, k, v and wi by output rows, o and wo by input columns with their partial
        products summed over the group, and each rank's heads' columns of the relative position bias. Embeddings,
        norms and the head stay whole on every rank. Float and quantized layers alike; call before loading weights."""
        ranks = group.size()
        if self.args.num_heads % ranks or self.args.d_ff % ranks:
            raise ValueError(
                f"{self.args.num_heads} heads and {self.args.d_ff} feed-forward units do not split across {ranks} ranks"
            )
        self.group = group
        for stack in (self.encoder, self.decoder):
            # (buckets, heads): this rank's heads are a block of columns.
            shard_inplace(stack.relative_attention_bias, lambda path, weight: -1, group=group)
            for layer in stack.layers:
                attentions = [layer.self_attn] + ([layer.cross_attn] if "cross_attn" in layer else [])
                for attention in attentions:
                    for name in ("q", "k", "v"):
                        attention[name] = shard_linear(attention[name], "all-to-sharded", group=group)
                    attention.o = shard_linear(attention.o, "sharded-to-all", group=group)
                    attention.num_heads //= ranks
                mlp = layer.mlp
                for name in ("wi", "wi_0", "wi_1"):
                    if name in mlp:
                        mlp[name] = shard_linear(mlp[name], "all-to-sharded", group=group)
                mlp.wo = shard_linear(mlp.wo, "sharded-to-all", group=group)
