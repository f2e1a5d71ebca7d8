"""Matrix products for decoding: native kernels on a Linux CPU where they are built, MLX's own everywhere else.

`linear(x, weight, ...)` is x @ weight.T with weight as nn.Linear holds it (out, in), or quantized as
nn.QuantizedLinear holds it. The native kernels (kernels/*.cpp, an MLX extension that `pip install .` builds with
kernels/build.py) read each weight from memory once per product (rows in blocks of 16 over stretches of columns that
stay in L2), in float32, bfloat16, float16, or MLX's affine 4- and 8-bit quantization; products of many rows too (a
long prompt), which no longer need OpenBLAS.

T5_KERNELS=0 turns the native kernels off; T5_KERNELS=exact keeps x in floating point for quantized weights and
T5_KERNELS=integer quantizes each row of x to int8 per group for them (integer dot products; by default only for
INTEGER_DEFAULT_BITS).
T5_KERNEL_ISA=avx512|avx2|portable forces an instruction set (the fastest this CPU runs by default).
`pack(weight)` copies a float32 or bfloat16 weight into the layout the kernels multiply several rows by fastest (see
PACKED), `pack_quantized(...)` a 4/8-bit one (for the AVX-512 kernel); T5_PACKED_MB bounds the bytes of such copies a
process keeps.
`decoder_layers(...)` computes the T5 decoder layers of a decode step as one operation, in float32 (a bfloat16 or
float16 model's activations widened, its weights read as they are): a small model's step is otherwise mostly the
scheduling of a few hundred small operations. T5_FUSED_LAYERS=0 keeps the
layers as MLX operations (whose products still run here).
A module built for another MLX, or one whose trial product is wrong, is not used (one warning line says so and how to
rebuild).
"""

import importlib.machinery
import os
import platform
import sys
import weakref
from pathlib import Path

import mlx.core as mx

ENV_VAR = "T5_KERNELS"
ISA_ENV_VAR = "T5_KERNEL_ISA"
FUSED_ENV_VAR = "T5_FUSED_LAYERS"
# The activations decoder_layers computes, by the names model.ACTIVATIONS uses, and its codes for them.
LAYER_ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "silu": 3, "swish": 3}
# The weights' bit widths whose products take int8 activations unless T5_KERNELS says otherwise. Their price in
# quality (benchmarks/int8_activations.py, the translation pair) is at most a tenth of quantizing the weights for
# 4-bit (0.014x) and not for 8-bit (12x). With packed weights they also compute 2-3x the products a second of float
# activations on many rows (a prompt, a verification; docs/kernels.md). They turn float-order differences (the last
# bits of x) into whole steps of a group's int8 grid, so a 4-bit model sharded over ranks (its partial products summed
# across them) gives logits up to 0.05-0.19 away from the same model whole, where float activations (T5_KERNELS=exact)
# agree to 1e-4 (tests/test_distributed.py).
INTEGER_DEFAULT_BITS = (4,)
BUILD_COMMAND = "python kernels/build.py"

native = None
# Whether decode steps' decoder layers run as one native operation each (where the native kernels are loaded).
fused_layers = False
# Quantized products with int8 activations (where the instruction set has integer kernels): always, never, or None
# for INTEGER_DEFAULT_BITS.
integer = None
# What serves the products, for reports: "native avx2, 2 threads", "mlx (...)".
active = "mlx"
# The kernels that have served a product since start-up, e.g. {"native 4-bit", "mlx float32"}.
used = set()
# Where bindings.cpp writes the MLX version it was compiled against, in the module file itself.
VERSION_MARKER = b"t5-kernels-built-for-mlx:"
FLOATS = (mx.float32, mx.bfloat16, mx.float16)
# Packed weights (products.h): a float32 or bfloat16 (N, K) weight's copy with each block of 16 outputs' weights
# stored k by k, as uint32 or uint16 (N, K). The kernels then multiply a row's x[k], broadcast, by 16 outputs' weights
# at once, with no sums across a vector's lanes: several rows run at the speed of the multiply-adds, however short K
# (the demo main model's 9-row verification products 0.50 ms a step against 0.72 for its own bfloat16 weights, one
# thread). The packed type each float type takes:
PACKED = {mx.bfloat16: mx.uint16, mx.float32: mx.uint32}
PACKED_NAMES = {packed: f"packed {dtype}".replace("mlx.core.", "") for dtype, packed in PACKED.items()}  # for `used`
PACK_ENV_VAR = "T5_PACKED_MB"
PACK_COLUMNS = 16
# Megabytes of packed copies a process keeps at most (they are made at a weight's first product, beside the model's
# own weights): the first weights used take them.
DEFAULT_PACK_MB = 2048
packed_bytes = 0  # of the live packed copies


def built_for() -> str | None:
    """The MLX version the module Python would import was built for ("" if it names none); None if none is built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).parent / f"_native{suffix}"
        if path.exists():
            data = path.read_bytes()
            start = data.find(VERSION_MARKER)
            if start < 0:
                return ""
            start += len(VERSION_MARKER)
            return data[start : data.find(b"\n", start)].decode(errors="replace")
    return None


def trial_problem(module) -> str:
    """Why `module`'s products cannot be trusted ("" if a small float and 4-bit product each match MLX's)."""
    try:
        with mx.stream(mx.cpu):  # the kernels' device, whichever is the default
            x = mx.arange(2 * 64, dtype=mx.float32).reshape(2, 64) / 64
            w = mx.cos(mx.arange(40 * 64, dtype=mx.float32)).reshape(40, 64)
            quantized = mx.quantize(w, 64, 4)
            for ours, reference in [
                (module.decode_matmul(x, w), x @ w.T),
                (module.decode_matmul(x, *quantized, 64, 4), mx.quantized_matmul(x, *quantized, True, 64, 4)),
            ]:
                if not mx.allclose(ours, reference, rtol=1e-4, atol=1e-4).item():
                    return "its trial product differs from MLX's"
    except Exception as e:  # any failure of a foreign module means: do not use it
        return f"its trial product failed ({type(e).__name__}: {e})"
    return ""


def refuse(reason: str, summary: str) -> str:
    global active
    print(
        f"warning: native kernels {reason}; MLX's slower CPU kernels are used (to build: {BUILD_COMMAND})",
        file=sys.stderr,
    )
    active = f"mlx (native kernels {summary})"
    return active


def load() -> str:
    """Load the native kernels as the environment asks; return a description of what serves the products."""
    global native, active, integer, fused_layers
    native = None
    integer = None
    fused_layers = False
    mode = os.environ.get(ENV_VAR, "").lower()
    if mode in ("0", "off", "none"):
        active = f"mlx ({ENV_VAR}={os.environ[ENV_VAR]})"
        return active
    if sys.platform != "linux":
        active = "mlx"
        return active
    version = built_for()
    if version is None:
        return refuse("not built", "not built")
    if version != mx.__version__:
        # Loading it would put code compiled for one libmlx into another: refused before it is loaded.
        built = f"MLX {version}" if version else "an unknown MLX"
        return refuse(f"were built for {built}, not the installed {mx.__version__}", "stale")
    try:
        from kernels import _native
    except ImportError as e:
        return refuse(f"cannot be loaded ({e})", "cannot be loaded")
    if getattr(_native, "mlx_version", None) != mx.__version__:
        return refuse(f"were built for another MLX, not the installed {mx.__version__}", "stale")
    problem = trial_problem(_native)
    if problem:
        return refuse(f"are not used: {problem}", "failed their trial")
    requested = os.environ.get(ISA_ENV_VAR, "")
    if requested:
        if requested not in _native.isas():
            print(
                f"error: {ISA_ENV_VAR}={requested} is not an instruction set this CPU runs "
                f"({', '.join(_native.isas())}); unset {ISA_ENV_VAR} to use the fastest",
                file=sys.stderr,
            )
            raise SystemExit(2)
        _native.set_isa(requested)
    native = _native
    integer = {"integer": True, "exact": False}.get(mode)
    fused_layers = os.environ.get(FUSED_ENV_VAR, "1").lower() not in ("0", "off", "no")
    active = f"native {isa_description()}, {native.threads()} threads ({platform.machine()})"
    return active


def isa_description() -> str:
    """The native kernels' instruction set, its extensions in use and the quantized products' activations."""
    features = native.features()
    if not native.integer_products():
        activations = "float"
    elif integer is None and INTEGER_DEFAULT_BITS:
        activations = f"int8 for {'/'.join(map(str, INTEGER_DEFAULT_BITS))}-bit"
    elif integer is None:
        activations = "float"
    else:
        activations = "int8" if integer else "float"
    return f"{native.isa()}{f' ({features})' if features else ''}, quantized x {activations}"


def pack_budget() -> int:
    """Bytes of packed copies a process may keep ($T5_PACKED_MB megabytes; 0 packs none)."""
    value = os.environ.get(PACK_ENV_VAR, "")
    try:
        return max(0, int(float(value) * (1 << 20))) if value else DEFAULT_PACK_MB << 20
    except ValueError:
        print(
            f"error: {PACK_ENV_VAR}={value} is not a number of megabytes; unset it or set, say, 2048", file=sys.stderr
        )
        raise SystemExit(2)


def pack(weight):
    """The packed copy of a float32 or bfloat16 weight (N, K) (see PACKED), evaluated; None where the native kernels
    would not take it (not loaded, another dtype, N not a multiple of 16) or the process's budget of packed bytes
    (pack_budget) is spent. Its bytes count against the budget while it lives."""
    global packed_bytes
    if native is None or weight.ndim != 2 or weight.dtype not in PACKED or weight.shape[0] % PACK_COLUMNS:
        return None
    if packed_bytes + weight.nbytes > pack_budget():
        return None
    N, K = weight.shape
    blocks = weight.view(PACKED[weight.dtype]).reshape(N // PACK_COLUMNS, PACK_COLUMNS, K)
    packed = mx.contiguous(blocks.transpose(0, 2, 1)).reshape(N, K)
    try:
        mx.eval(packed)
    except ValueError:  # inside a function transformation (compile, vmap), where nothing may be evaluated
        return None
    packed_bytes += packed.nbytes
    weakref.finalize(packed, release, packed.nbytes)
    return packed


def settings():
    """What the native layers' weights as FusedLinear.native_weight gives them depend on beside the weights: the
    instruction set and the quantized products' activations (packed copies run on one, with one)."""
    return (native.isa() if native is not None else None, integer)


def packed_quantized_run(bits) -> bool:
    """Whether products of `bits`-bit weights run packed copies now: on the AVX-512 kernel, with float activations or,
    where it has integer products (VNNI), int8 ones. (The instruction set and the activations may change after a copy
    was made; the model's own arrays serve then.)"""
    if native is None or native.isa() != "avx512":
        return False
    return not int8_activations(bits) or native.integer_products()


def pack_quantized(weight, scales, biases, group_size, bits):
    """The packed copy (values, scales, biases) of an MLX affine-quantized weight (N, K * bits / 32) uint32 with `bits`
    4 or 8: its words in blocks of 16 columns, word by word (see products.h), as bytes, uint8 (N, K * bits / 8), and its
    scales and biases in the same blocks, in their own dtype (bfloat16 ones stay half the bytes), evaluated. The AVX-512
    kernels multiply several rows by it with one pass over the weights (float activations, or int8 ones with VNNI).
    None where those kernels do not run (packed_quantized_run), N is not a multiple of 16, or the budget (pack_budget)
    is spent; its bytes count against the budget while it lives."""
    global packed_bytes
    if not packs_quantized(weight, scales, group_size, bits):
        return None
    if packed_bytes + packed_quantized_bytes(weight, scales) > pack_budget():
        return None
    packed = quantized_in_blocks(weight, scales, biases)
    try:
        mx.eval(packed)
    except ValueError:  # inside a function transformation (compile, vmap), where nothing may be evaluated
        return None
    for array in packed:
        packed_bytes += array.nbytes
        weakref.finalize(array, release, array.nbytes)
    return packed


def packs_quantized(weight, scales, group_size, bits) -> bool:
    """Whether pack_quantized would pack this weight, its budget aside."""
    if not packed_quantized_run(bits) or weight.ndim != 2 or weight.dtype != mx.uint32:
        return False
    return bits in (4, 8) and group_size in (32, 64, 128) and weight.shape[0] % PACK_COLUMNS == 0


def packed_quantized_bytes(weight, scales) -> int:
    """The bytes of a quantized weight's packed copy (its words, scales and biases)."""
    return weight.nbytes + 2 * scales.nbytes


def quantized_in_blocks(weight, scales, biases):
    """(values, scales, biases) of a quantized weight in pack_quantized's layout, not evaluated."""
    (N, words), groups = weight.shape, scales.shape[1]

    def blocked(a, width):  # (N, width) -> per block of 16 rows, column by column
        return mx.contiguous(a.reshape(N // PACK_COLUMNS, PACK_COLUMNS, width).transpose(0, 2, 1)).reshape(N, width)

    return (
        blocked(weight, words).view(mx.uint8),
        blocked(scales, groups),
        blocked(biases, groups),
    )


def release(nbytes: int):
    """A packed copy of `nbytes` bytes was freed."""
    global packed_bytes
    packed_bytes -= nbytes


def native_takes(x, weight, scales, biases, group_size, bits, mode) -> bool:
    """Whether the native kernels compute this product (the rest goes to MLX's kernels, which check their inputs)."""
    if native is None or mx.default_device() != mx.cpu or x.dtype not in FLOATS or weight.ndim != 2:
        return False
    if scales is None:
        return weight.dtype in FLOATS or weight.dtype in PACKED.values()
    return (
        mode == "affine"
        and biases is not None
        and bits in (4, 8)
        and group_size in (32, 64, 128)
        and weight.dtype in (mx.uint32, mx.uint8)
        and scales.dtype in FLOATS
        and biases.dtype == scales.dtype
    )


def linear(x, weight, scales=None, biases=None, group_size=64, bits=4, mode="affine"):
    """x (..., in) @ weight.T -> (..., out); with scales, weight is MLX-quantized (`mode`, biases for affine)."""
    if native_takes(x, weight, scales, biases, group_size, bits, mode):
        if scales is None:
            used.add(f"native {PACKED_NAMES.get(weight.dtype, weight.dtype)}".replace("mlx.core.", ""))
            return native.decode_matmul(x, weight)
        used.add(f"native {bits}-bit")
        return native.decode_matmul(x, weight, scales, biases, group_size, bits, integer=int8_activations(bits))
    if scales is None:
        used.add(f"mlx {weight.dtype}".replace("mlx.core.", ""))
        return x @ weight.T
    used.add(f"mlx {bits}-bit")
    return mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def native_layers_take(x) -> bool:
    """Whether the native encoder and decoder layers compute on x: float activations (they compute in float32, a
    half-precision x widened exactly), CPU, native layers on."""
    return fused_layers and x.dtype in FLOATS and mx.default_device() == mx.cpu


def decoder_layers(
    x,
    self_bias,
    cross_bias,
    offsets,
    layers,
    num_heads,
    eps,
    activation,
    gated,
    head=None,
    embedding=None,
    greedy_steps=0,
    stop=None,
    logits=False,
    cache_rows=None,
    cache_in_place=False,
    bias_offset=0,
    now=False,
):
    """Decoder layers on x (B, L, D) float32 as one operation -> [x out, then each layer's cache keys and values with
    the new ones written at each row's offset]. layers: (cache keys, cache values, cross keys, cross values, norms,
    weights), weights (weight, scales, biases, group_size, bits) of qkv, o, cross q, cross o, wi, wo (bits 0: float).
    With head (final norm weight, scale, weight), the first output is the logits (B, L, vocab). With an `embedding`
    (vocab, D) float32, bfloat16 or float16 table (or (weight, scales, biases, group_size, bits) of MLX's affine 4/8-bit
    quantization of one) and the head, x is token ids (B, L) and the first output each position's most likely next
    token (B, L) int32 (a greedy verification); with greedy_steps > 0 too, each row's greedy continuation of that many
    tokens (int32; (greedy_steps,) for one row, else (B, greedy_steps)), each fed to its next step: a draft model's
    steps as one operation. A
    `stop` token id (one row; EOS where it ends the output) ends the work early: drafting stops after drafting it (the
    remaining tokens are the stop token), and a verification computes nothing from the first stop token past the first
    id on (their tokens are -1). With token ids and `logits` (no drafting, no stop), the first output is the logits
    (B, L, vocab). With `cache_rows` (one per row of x), row b's cache is row cache_rows[b] of the caches given (-1: an
    empty row), whatever rows they have; the caches out have x's rows. With `cache_in_place`, a cache of x's rows comes
    out in the buffer given, the new positions written into it: the caller reads nothing past each row's length from
    the array given (a cache that replaces its arrays with the outputs); else each comes out in a new buffer. The self
    bias's rows for the new positions start at `bias_offset` (a table of every position's, sliced by the kernel rather
    than by an operation). With `now`, the outputs are computed before the call returns, on the calling thread and
    the kernels' own, not on MLX's stream: no wait for its thread to wake, nor for the caller to, which cost a small
    model about a third of its step (inputs not yet computed are evaluated first)."""
    used.add("native decoder layers")
    if head is not None:
        head = (*head, int8_layer(head[2][4]))
    return native.decoder_layers(
        x,
        self_bias,
        cross_bias,
        offsets,
        layers,
        num_heads,
        eps,
        LAYER_ACTIVATIONS[activation],
        gated,
        int8_layer(layers[0][5][0][4]),
        head,
        embedding,
        greedy_steps,
        -1 if stop is None else stop,
        logits,
        cache_rows or [],
        cache_in_place,
        bias_offset,
        now,
    )


def encoder_layers(x, bias, layers, final_norm, num_heads, eps, activation, gated):
    """Encoder layers and the final norm on x (B, L, D) float32 as one operation -> the encoder output. bias (1 or B,
    heads, L, L): the additive position and padding bias; layers: (norms, weights), the norms of the self-attention and
    the feed-forward block, weights (weight, scales, biases, group_size, bits) of qkv, o, wi, wo (bits 0: float)."""
    used.add("native encoder layers")
    return native.encoder_layers(
        x,
        bias,
        layers,
        final_norm,
        num_heads,
        eps,
        LAYER_ACTIVATIONS[activation],
        gated,
        int8_layer(layers[0][1][0][4]),
    )


def cross_projections(x, weights, num_heads):
    """Every decoder layer's cross-attention keys and values of the encoder output x (B, P, D) float32 as one
    operation -> [keys, values of each layer in turn], each (B, H, P, d_kv). weights: each layer's key and value
    projections in turn, (weight, scales, biases, group_size, bits) each (bits 0: float)."""
    used.add("native cross projections")
    return native.cross_projections(x, weights, num_heads, int8_layer(weights[0][4]))


def batch_rows(arrays, rows, appended, width):
    """For each of `arrays` (B, H, P, d) float32, its rows `rows` in that order, then the rows of its counterpart in
    `appended` (a list as long, or empty), as (len(rows) + B2, H, width, d) with zeros past each row's own P: one
    operation for them all (a batch's cross-attention keys and values as rows leave and join it). None where the native
    layers do not apply (not the CPU, another dtype, T5_FUSED_LAYERS=0): the caller uses MLX's operations."""
    if not fused_layers or mx.default_device() != mx.cpu or any(a.dtype != mx.float32 for a in [*arrays, *appended]):
        return None
    used.add("native batch rows")
    return native.batch_rows(arrays, rows, appended, width)


def int8_layer(bits) -> bool:
    """Whether native layers whose first product has `bits`-bit weights (0: float) take int8 activations."""
    return bool(bits) and int8_activations(bits)


def int8_activations(bits) -> bool:
    """Whether products of `bits`-bit weights quantize x to int8 (where the instruction set has integer products)."""
    return integer if integer is not None else bits in INTEGER_DEFAULT_BITS


def description() -> str:
    """What serves the products and which kernels have run, for main.py's backend line."""
    return f"{active}; ran: {', '.join(sorted(used)) or 'none yet'}"


load()
