"""The end-to-end benchmark's measurements of the matrix products: GB/s of the decode-shaped products per dtype against
the memory bandwidth, a decode step's share of its roofline per dtype, and the cost of verifying k + 1 tokens over
one."""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

import convert
import kernels
from model import T5, ModelArgs
from native_layers import FusedLinear
from tools.shapes import SHAPES, VOCAB_SIZE

# The shapes whose decode steps are timed in every dtype (float32 t5-large is 3 GB; larger ones outgrow a small box).
KERNEL_SHAPES = ("t5-base", "t5-large")
# (name, bits or None, dtype): the weights as convert.py writes them (quantized ones with groups of 64).
DTYPES = [("float32", None, mx.float32), ("bfloat16", None, mx.bfloat16), ("8-bit", 8, None), ("4-bit", 4, None)]
ROWS = [1, 2, 5, 8, 16, 32]
# The dtype of a quantized linear layer's scales and biases in a float32 model, as convert.py writes them.
SCALES = {bits: getattr(mx, convert.scales_dtype("float32", bits, "auto")) for bits in (4, 8)}
VERIFY_TOKENS = [5, 8]


def seconds(run, repeats):
    """Median seconds of `run` (which evaluates its own results), after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def weight_arrays(bits, dtype, out_features, in_features):
    w = mx.random.normal((out_features, in_features), scale=in_features**-0.5)
    if bits is None:
        return (w.astype(dtype),)
    words, scales, biases = mx.quantize(w, 64, bits)
    return words, scales.astype(SCALES[bits]), biases.astype(SCALES[bits])


def feed_forward_stack(bits, dtype):
    """Eight (4096, 1024) and eight (1024, 4096) matrices, t5-large's feed-forward shapes, read in turn as a decoder
    does (268 MB in float32: far more than the caches), evaluated; and their bytes."""
    matrices = [weight_arrays(bits, dtype, *shape) for shape in [(4096, 1024), (1024, 4096)] * 8]
    mx.eval(matrices)
    return matrices, sum(a.nbytes for arrays in matrices for a in arrays)


def stack_inputs(matrices, bits, rows):
    """A random x of `rows` rows for each matrix of the stack (its input width unpacked from the quantized words)."""
    return [mx.random.normal((rows, a[0].shape[-1] * (32 // bits if bits else 1))) for a in matrices]


def as_models_hold(arrays, bits):
    """A matrix's arrays as a model's native products read them: the packed copy where the kernels make one."""
    if kernels.native is None:
        return arrays
    packed = kernels.pack_quantized(*arrays, 64, bits) if bits else (kernels.pack(arrays[0]),)
    return arrays if packed is None or packed[0] is None else packed


def product(x, arrays, bits, native):
    """One product x @ W.T by the native kernels or MLX's own (OpenBLAS for float32)."""
    if native:
        return (
            kernels.native.decode_matmul(x, *arrays, 64, bits or 4, integer=kernels.int8_activations(bits))
            if bits
            else kernels.native.decode_matmul(x, arrays[0])
        )
    if bits:
        return mx.quantized_matmul(x, *arrays, transpose=True, group_size=64, bits=bits)
    return x @ arrays[0].T


def product_sweep(bandwidth, repeats=7):
    """GB/s of x @ W.T for a stack of t5-large-sized feed-forward matrices (`feed_forward_stack`),
    per dtype and rows, by the native kernels (on the packed copies a model's products read, where they are made) and
    by MLX's own. The bytes are the model's weights', whatever the copy read."""
    rows_out = []
    for name, bits, dtype in DTYPES:
        matrices, nbytes = feed_forward_stack(bits, dtype)
        native_matrices = [as_models_hold(arrays, bits) for arrays in matrices]
        for rows in ROWS:
            inputs = stack_inputs(matrices, bits, rows)
            mx.eval(inputs)
            row = dict(dtype=name, rows=rows, weight_mb=round(nbytes / 1e6, 1))
            for label, native in [("native", True), ("mlx", False)]:
                if native and kernels.native is None:
                    continue
                if not native and bits and rows > 8:
                    continue  # MLX's quantized CPU product re-reads the weights per row: minutes here
                stack = native_matrices if native else matrices
                s = seconds(lambda: mx.eval([product(x, a, bits, native) for x, a in zip(inputs, stack)]), repeats)
                row[f"{label}_gb_s"] = round(nbytes / s / 1e9, 2)
                row[f"{label}_share_of_bandwidth"] = round(nbytes / s / bandwidth, 3)
            rows_out.append(row)
    for row in rows_out:
        one = next(r for r in rows_out if r["dtype"] == row["dtype"] and r["rows"] == 1)
        for label in ("native", "mlx"):
            if f"{label}_gb_s" in row:
                # Seconds for `rows` rows over seconds for one: the same bytes in both.
                row[f"{label}_cost_vs_one_row"] = round(one[f"{label}_gb_s"] / row[f"{label}_gb_s"], 2)
    return rows_out


def random_model(shape, bits, dtype):
    """A T5 of a real shape with random weights, held as load_model holds a converted directory on a CPU."""
    model = T5(ModelArgs(vocab_size=VOCAB_SIZE, **SHAPES[shape]))
    if bits:
        # As convert.py -q: every linear layer and the embedding, not the position bias tables.
        quantizable = lambda path, module: hasattr(module, "to_quantized") and "relative" not in path  # noqa: E731
        nn.quantize(model, group_size=64, bits=bits, class_predicate=quantizable)
        for path, module in model.named_modules():
            if "scales" in module and path != "shared":  # (the embedding's stay float32)
                module.scales, module.biases = (module[name].astype(SCALES[bits]) for name in ("scales", "biases"))
    else:
        model.update(tree_map(lambda a: a.astype(dtype), model.parameters()))
    model.use_decoding_layout()
    mx.eval(model.parameters())
    return model


def step_products(model):
    """The products one decode step computes: every decoder layer's (not the cross-attention keys/values, computed
    once per prompt) and the head."""
    products = [
        module
        for name, module in model.decoder.named_modules()
        if isinstance(module, FusedLinear) and not name.endswith(("cross_attn.k", "cross_attn.v"))
    ]
    return products + [model.lm_head]


def step_weight_bytes(model):
    return sum(a.nbytes for module in step_products(model) for _, a in tree_flatten(module.parameters()))


def products_seconds(model, rows=1, repeats=20):
    """Seconds for the products of one decode step alone, for `rows` rows each."""
    inputs = [
        mx.ones((1, rows, module.weight.shape[1] * (32 // module.bits if "scales" in module else 1)))
        for module in step_products(model)
    ]
    return seconds(lambda: mx.eval([module(x) for module, x in zip(step_products(model), inputs)]), repeats)


def decode_seconds(model, tokens, repeats=10, prompt_length=32, context=16):
    """Seconds of one decoder call on `tokens` new tokens (1: a regular step; k + 1: a verification), after a
    `context`-token cache, the cache rewound after each call."""
    cross_kv = model.cross_kv(model.encode(mx.full((1, prompt_length), 3)))
    cache = model.make_cache()
    mx.eval(model.decode(mx.full((1, context), 3), cross_kv, cache))

    def call():
        mx.eval(model.decode(mx.full((1, tokens), 3), cross_kv, cache))
        for layer_cache in cache:
            layer_cache.trim(tokens)

    return seconds(call, repeats)


def decode_roofline(shape, bandwidth, repeats=10):
    """Per dtype: a decode step's time against the time to read its weights once at `bandwidth`, and the cost of
    verifying k + 1 tokens in one call over a one-token step."""
    out = []
    for name, bits, dtype in DTYPES:
        model = random_model(shape, bits, dtype)
        weight_bytes = step_weight_bytes(model)
        step = decode_seconds(model, 1, repeats)
        row = dict(
            shape=shape,
            dtype=name,
            step_weight_mb=round(weight_bytes / 1e6, 1),
            decode_step_ms=round(step * 1e3, 2),
            step_products_ms=round(products_seconds(model, 1, repeats) * 1e3, 2),
            roofline_ms=round(weight_bytes / bandwidth * 1e3, 2),
            share_of_roofline=round(weight_bytes / bandwidth / step, 3),
        )
        for tokens in VERIFY_TOKENS:
            row[f"verify_{tokens}_vs_one"] = round(decode_seconds(model, tokens, repeats) / step, 2)
        out.append(row)
        del model
    return out


def print_report(sweep, roofline, bandwidth):
    print(
        f"\nProducts x @ W.T, 64 MB of float32 weights per pass ({bandwidth / 1e9:.1f} GB/s measured bandwidth); "
        f"kernels: {kernels.active}"
    )
    print(f"{'dtype':<10}{'rows':>5}{'native GB/s':>13}{'share':>7}{'cost':>7}{'mlx GB/s':>10}{'share':>7}{'cost':>7}")
    for r in sweep:
        native = (
            f"{r['native_gb_s']:>13.1f}{r['native_share_of_bandwidth']:>7.0%}{r['native_cost_vs_one_row']:>6.2f}x"
            if "native_gb_s" in r
            else f"{'-':>13}{'':>14}"
        )
        mlx = (
            f"{r['mlx_gb_s']:>10.2f}{r['mlx_share_of_bandwidth']:>7.0%}{r['mlx_cost_vs_one_row']:>6.2f}x"
            if "mlx_gb_s" in r
            else f"{'-':>10}"
        )
        print(f"{r['dtype']:<10}{r['rows']:>5}{native}{mlx}")
    if roofline:
        print(f"\nDecode steps of a {roofline[0]['shape']}-shaped model (random weights), one token and verifications")
        print(
            f"{'dtype':<10}{'MB/step':>9}{'step ms':>9}{'products':>10}{'roofline':>10}{'share':>7}"
            + "".join(f"{f'{k} tokens':>11}" for k in VERIFY_TOKENS)
        )
        for r in roofline:
            print(
                f"{r['dtype']:<10}{r['step_weight_mb']:>9.0f}{r['decode_step_ms']:>9.2f}{r['step_products_ms']:>10.2f}"
                f"{r['roofline_ms']:>10.2f}{r['share_of_roofline']:>7.0%}"
                + "".join(f"{r[f'verify_{k}_vs_one']:>10.2f}x" for k in VERIFY_TOKENS)
            )
