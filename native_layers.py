"""The T5's side of the native kernels: its linear layers as `FusedLinear` (products that `kernels.linear` computes,
on the kernels' packed copies of the weights), and each stack's layers gathered into what `kernels.encoder_layers` and
`kernels.decoder_layers` take, kept while the weights stay the same (`Module` counts what would change them)."""

import operator

import mlx.core as mx
import mlx.nn as nn

import kernels


class Module(nn.Module):
    """nn.Module that counts assignments to any module of the model (a parameter, or a module replaced) in
    `Module.assignments`, so that what is derived from the weights (the native decoder layers' inputs) can be kept
    until they change. (An array changed in place is the same object, and what is kept holds the object.)"""

    assignments = 0

    def __setitem__(self, key, value):
        Module.assignments += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        Module.assignments += 1
        super().__delitem__(key)


NO_SCALES = (None, None, 0, 0, "affine")  # kernels.native_takes's arguments past the weight for a float product
# The activations whose products read packed copies of the weights: float32, and bfloat16 (a bfloat16 model's), which
# the kernels widen to float32 exactly; its products with bfloat16 weights are exact in float32, as vdpbf16ps's are,
# and a packed copy is multiplied by up to 16 rows in one pass where the unpacked weights sum lanes per row.
PACKED_X = (mx.float32, mx.bfloat16)


class FusedLinear(Module):
    """Bias-free linear layers (nn.Linear, nn.QuantizedLinear or a tied embedding), stacked into one product (their
    outputs side by side) that `kernels.linear` computes: native decode-shaped kernels on the CPU where built.

    With a `group`, the weights hold this rank's input columns and the products are summed over the group's ranks.
    """

    def __init__(self, *layers, group=None):
        super().__init__()
        first = layers[0]
        self.group_size, self.bits = getattr(first, "group_size", None), getattr(first, "bits", None)
        for name in ("weight", "scales", "biases"):
            if name in first:
                arrays = [layer[name] for layer in layers]
                setattr(self, name, arrays[0] if len(arrays) == 1 else mx.concatenate(arrays))
        self.group = group

    def native_weight(self):
        """(weight, scales, biases, group_size, bits) as kernels.decoder_layers takes a product (bits 0: float), or
        None where it cannot (summed across ranks, or a quantization without biases). A float weight comes packed
        where the kernels pack it (kernels.pack: made at the first call, kept while the weight stays the same)."""
        if self.group is not None:
            return None
        if "scales" not in self:
            return self.packed_weight(), None, None, 0, 0
        if "biases" not in self:
            return None
        return (*self.packed_quantized(), self.group_size, self.bits)

    def packed_weight(self):
        """The float weight, packed where kernels.pack packs it (the same numbers in the native kernels' fastest
        layout); made once per weight array, kept (not a parameter) and released with it. A new array (an assignment,
        `update`, `load_weights`) is packed again; an array changed in place keeps the copy of what it held."""
        weight = self.kept_packing(kernels.pack)
        return self["weight"] if weight is None else weight

    def packed_quantized(self):
        """(weight, scales, biases) of a quantized layer, packed where kernels.pack_quantized packs them, kept as
        packed_weight keeps a float weight's copy; the layer's own while the packed copies do not run (another
        instruction set or int8 activations, chosen after the copy was made)."""
        if kernels.packed_quantized_run(self.bits):
            packed = self.kept_packing(lambda weight: kernels.pack_quantized(weight, *self.quantized_parts()))
            if packed is not None:
                return packed
        return self["weight"], self["scales"], self["biases"]

    def packed_in_place_bytes(self) -> int:
        """The bytes pack_in_place would hold (0: it would not pack this layer)."""
        if self.group is not None or "scales" not in self or "biases" not in self:
            return 0
        if not kernels.packs_quantized(self["weight"], self["scales"], self.group_size, self.bits):
            return 0
        return kernels.packed_quantized_bytes(self["weight"], self["scales"])

    def pack_in_place(self):
        """Hold a quantized layer's weight in the kernels' packed layout instead of MLX's (the same values, scales and
        biases, moved: kernels.pack_quantized's copy without the original beside it), where packed_in_place_bytes says
        it packs. Every product of the layer then goes to the native kernels, which read that layout on any
        instruction set."""
        if self.packed_in_place_bytes():
            packed = kernels.quantized_in_blocks(self["weight"], self["scales"], self["biases"])
            mx.eval(packed)
            for array in packed:  # read whole at every step: on huge pages, far fewer TLB misses (see kernels.md)
                kernels.native.collapse_huge_pages(array)
            self.weight, self.scales, self.biases = packed

    def quantized_parts(self):
        return self["scales"], self["biases"], self.group_size, self.bits

    def kept_packing(self, pack):
        """pack(weight), made once per weight array and kept (not a parameter) while it is the layer's weight."""
        weight = self["weight"]
        kept = self.__dict__.get("_packed")
        if kept is None or kept[0] is not weight:
            kept = (weight, pack(weight))
            object.__setattr__(self, "_packed", kept)  # (not a parameter, and not an assignment)
        return kept[1]

    def __call__(self, x):
        if "scales" in self:
            weight, scales, biases = self.weight, self.scales, self.biases
            if (
                x.dtype in PACKED_X
                and self.group is None
                and kernels.native_takes(x, weight, *self.quantized_parts(), "affine")
            ):
                weight, scales, biases = self.packed_quantized()
            y = kernels.linear(x, weight, scales, biases, self.group_size, self.bits)
        elif x.dtype in PACKED_X and self.group is None and kernels.native_takes(x, self.weight, *NO_SCALES):
            y = kernels.linear(x, self.packed_weight())
        else:
            y = kernels.linear(x, self.weight)
        return y if self.group is None else mx.distributed.all_sum(y, group=self.group)


def native_parts(norms, attention_linears, mlp):
    """(norms, linears) of a layer for the native layers: the attention's products, then the feed-forward's wi (or
    the stacked wi_01) and wo; None unless every product is a FusedLinear the kernels compute alone (not summed across
    ranks)."""
    linears = (*attention_linears, mlp["wi_01" if mlp.is_gated else "wi"], mlp["wo"])
    if any(type(linear) is not FusedLinear or linear.native_weight() is None for linear in linears):
        return None
    return norms, linears


def kept_parts(stack):
    """Each layer's native parts (or None) for `stack` (the encoder or the decoder), found once and kept until an
    assignment to the model's modules; their arrays are read at every call (compiled MLX functions may put other
    array objects in their place)."""
    kept = stack.__dict__.get("_native_parts")
    if kept is None or kept[0] != Module.assignments:
        kept = (Module.assignments, [layer.native_parts() for layer in stack["layers"]])
        object.__setattr__(stack, "_native_parts", kept)  # (not a parameter, and not an assignment)
    return None if None in kept[1] else kept[1]


def native_weights(stack, parts):
    """(each layer's (norm weights, native products), the final norm's weight) for the native layers, from `parts`
    (kept_parts(stack)); the norms in float32 (the layers compute in float32). Kept while every module's weight is the
    object they were made from (a new weight comes with its new scales and biases) and the kernels' settings are the
    same (kernels.settings), since reading them anew (native_weight per product) costs a few microseconds each and a
    decoding step reads a few dozen. A compiled function's arrays (other objects) are read anew."""
    # (parts, their modules, those modules' weights, the kernels' settings, what was made)
    kept = stack.__dict__.get("_native_weights")
    settings = kernels.settings()
    if kept is None or kept[0] is not parts:
        modules = [module for norms, linears in parts for module in (*norms, *linears)] + [stack["final_norm"]]
    else:
        modules = kept[1]
        if kept[3] == settings and all(map(operator.is_, kept[2], map(WEIGHT, modules))):
            return kept[4]
    layers = [
        ([float32(norm["weight"]) for norm in norms], [linear.native_weight() for linear in linears])
        for norms, linears in parts
    ]
    made = (layers, float32(stack["final_norm"]["weight"]))
    object.__setattr__(stack, "_native_weights", (parts, modules, list(map(WEIGHT, modules)), settings, made))
    return made


def float32(x):
    """x in float32: itself if it is, else widened (bfloat16 and float16 values exactly)."""
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


WEIGHT = operator.itemgetter("weight")


class NativeDecoderSteps:
    """The decoder's steps as one native operation (`kernels.decoder_layers`): what `Decoder` computes with MLX's
    operations, every layer, the head and the greedy choices included, from the same weights and caches."""

    def native_layers(self, batch, length, cross_kv, cache):
        """(each layer's inputs as kernels.decoder_layers takes them (its cache made room for `length` new positions of
        `batch` rows), the final norm's weight, the caches' rows (KVCache.rows)), all float32, or None where it cannot
        compute every layer (or the cache holds another dtype's keys, written by MLX operations)."""
        parts = kept_parts(self)
        if parts is None or (cache[0].keys is not None and cache[0].keys.dtype != mx.float32):
            return None
        shape = (batch, self.layers[0].self_attn.num_heads, length, self.args.d_kv)
        layers, final_norm = native_weights(self, parts)
        buffers = [layer_cache.reserve(shape, mx.float32, mapped=True) for layer_cache in cache]
        rows = cache[0].rows
        if any(layer_cache.rows != rows for layer_cache in cache):  # (every layer's rows come and go alike)
            buffers, rows = [layer_cache.reserve(shape, mx.float32) for layer_cache in cache], None
        return (
            [
                (*layer_buffers, float32(cross_keys), float32(cross_values), norms, linears)
                for layer_buffers, (cross_keys, cross_values), (norms, linears) in zip(buffers, cross_kv, layers)
            ],
            final_norm,
            rows,
        )

    def greedy_tokens(
        self, ids, cross_kv, cross_bias, cache, head, scale, embedding, count, stop=None, logits=False, now=False
    ):
        """Greedy tokens of the token ids (B, L) that continue what `cache` holds, computed as one native operation.
        count 0: the most likely token after each position (B, L) int32, and the cache grows by L. count > 0: each
        row's greedy continuation ((count,) int32 for one row, else (B, count)), each token's most likely successor
        fed to the row's next step (all but the last fed, so each row's cache grows by L + count - 1). `stop` (one
        row): a token after which nothing is computed (see kernels.decoder_layers). With `logits` (count 0, no stop):
        the logits (B, L, vocab) float32 instead, the embedding looked up in the same operation. None where the native
        layers cannot compute it (the caller takes the logits then).With `now`,
        computed before it returns (kernels.decoder_layers)."""
        # The layers run natively in float32 on the table's rows (float32, half precision widened, or dequantized).
        if not kernels.native_layers_take(embedding if isinstance(embedding, mx.array) else embedding[1]):
            return None
        if type(head) is not FusedLinear:
            return None
        head_weight = head.native_weight()
        fed = ids.shape[1] + max(count - 1, 0)
        layers = None if head_weight is None else self.native_layers(ids.shape[0], fed, cross_kv, cache)
        if layers is None:
            return None
        layers, final_norm, rows = layers
        output_layer = (final_norm, 1.0 if scale is None else scale, head_weight)
        bias, bias_offset = self.position_bias_rows(cache[0].offsets, fed)
        return self.run_native(
            ids if ids.dtype == mx.int32 else ids.astype(mx.int32),
            bias,
            cross_bias,
            cache,
            layers,
            output_layer,
            fed,
            embedding,
            count,
            stop,
            logits,
            rows,
            bias_offset,
            now,
        )

    def run_native(
        self,
        x,
        self_bias,
        cross_bias,
        cache,
        layers,
        output_layer,
        fed,
        embedding=None,
        greedy_steps=0,
        stop=None,
        logits=False,
        rows=None,
        bias_offset=0,
        now=False,
    ):
        """kernels.decoder_layers on this decoder's layers (`rows`: the caches' KVCache.rows); each cache takes its new
        buffers with `fed` positions written. Returns the first output (x, the logits, or the greedy tokens). The
        self bias's rows start at `bias_offset`; with `now`, computed before it returns."""
        first = self.layers[0]
        out, *caches = kernels.decoder_layers(
            x,
            self_bias,
            cross_bias,
            cache[0].offsets,
            layers,
            first.self_attn.num_heads,
            first.mlp_norm.eps,
            self.args.activation,
            self.args.is_gated,
            output_layer,
            embedding=embedding,
            greedy_steps=greedy_steps,
            stop=stop,
            logits=logits,
            cache_rows=rows,
            cache_in_place=all(layer_cache.in_place for layer_cache in cache),
            bias_offset=bias_offset,
            now=now,
        )
        for layer_cache, keys, values in zip(cache, caches[::2], caches[1::2]):
            layer_cache.replace(keys, values, fed)
        return out
