"""The native decoder layers (kernels.decoder_layers: every decoder layer of a step as one operation) against the
same model's MLX operations: logits and caches, for every T5 variant, one row, verifications, batches of rows at
their own lengths with padded prompts, quantized weights, half-precision models (computed in float32) and every
instruction set this CPU runs."""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import PROMPTS, VARIANTS
from mlx.utils import tree_map

import convert
import kernels
from cache import KVCache
from decoder import SpeculativeDecoder
from loader import load_model
from model import padding_bias
from native_layers import FusedLinear, kept_parts, native_weights

pytestmark = pytest.mark.skipif(kernels.native is None, reason="native kernels not built")


def prompt_state(model, tokenizer, prompts):
    """The cross-attention keys and values of padded prompts, and their mask (None for one prompt)."""
    encoded = tokenizer(prompts, padding=True)
    ids = mx.array(encoded.input_ids)
    mask = mx.array(encoded.attention_mask) if len(prompts) > 1 else None
    cross_kv = model.cross_kv(model.encode(ids, mask))
    mx.eval(cross_kv)
    return cross_kv, mask


def run_steps(model, cross_kv, mask, steps):
    """Logits of a sequence of decode calls on one cache; a step is (token ids (B, L), rows to rewind first)."""
    cache = model.make_cache(len(steps[0][0]))
    logits = []
    for ids, rewind in steps:
        if rewind:
            for layer_cache in cache:
                layer_cache.trim_rows(rewind)
        logits.append(model.decode(mx.array(ids), cross_kv, cache, mask))
        mx.eval(logits[-1])
    return logits, cache


def widened(path):
    """The model at `path` with every half-precision parameter widened to float32 (exactly): the arithmetic the
    native layers do on a half-precision model, as MLX's operations."""
    model, _, _ = load_model(path)
    half = (mx.bfloat16, mx.float16)
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype in half else a, model.parameters()))
    return model


def compare(model, tokenizer, prompts, steps, fused, reference=None):
    """model's native layers against `reference`'s MLX operations (model's own by default): the prompts encoded by
    each, then the steps."""
    kernels.used.discard("native decoder layers")
    fused(False)
    reference = reference or model
    expected, expected_cache = run_steps(reference, *prompt_state(reference, tokenizer, prompts), steps)
    assert "native decoder layers" not in kernels.used
    fused(True)
    got, cache = run_steps(model, *prompt_state(model, tokenizer, prompts), steps)
    assert "native decoder layers" in kernels.used
    for ours, reference in zip(got, expected):
        scale = float(mx.abs(reference).max())
        np.testing.assert_allclose(np.array(ours), np.array(reference), atol=2e-5 * max(1.0, scale), rtol=0)
        # The greedy choice is the same wherever it is clear.
        best = np.sort(np.array(reference), axis=-1)
        clear = best[..., -1] - best[..., -2] > 1e-3 * max(1.0, scale)
        assert (np.array(ours).argmax(-1) == np.array(reference).argmax(-1))[clear].all()
    # Each row's cache holds the same keys and values below its length.
    for layer_cache, reference in zip(cache, expected_cache):
        assert layer_cache.offsets == reference.offsets
        for row, length in enumerate(reference.offsets):
            for ours, theirs in ((layer_cache.keys, reference.keys), (layer_cache.values, reference.values)):
                np.testing.assert_allclose(
                    np.array(ours[row, :, :length]), np.array(theirs[row, :, :length]), atol=1e-5, rtol=1e-5
                )


# One row: a first call of several tokens, single tokens, then a rewind and a verification of five.
ONE_ROW = [([[0, 5, 9, 14]], None), ([[21]], None), ([[7]], None), ([[3, 8, 2, 11, 40]], [2]), ([[12]], None)]
# Three rows: rewound by different counts, so that they continue at their own lengths (the first row shorter than
# another, and longer than another).
BATCH = [
    ([[0, 5, 9], [0, 4, 4], [0, 30, 2]], None),
    ([[6, 7], [8, 9], [10, 11]], [2, 0, 1]),
    ([[13], [14], [15]], [0, 1, 2]),
    ([[16, 17, 18], [19, 20, 21], [22, 23, 24]], [1, 0, 0]),
]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_one_row_and_verifications(variant, converted, fused):
    model, tokenizer, _ = load_model(converted(variant))
    compare(model, tokenizer, PROMPTS[:1], ONE_ROW, fused)


@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])
def test_batch_of_rows_at_their_own_lengths_with_padded_prompts(variant, converted, fused):
    model, tokenizer, _ = load_model(converted(variant))
    prompts = [PROMPTS[0], PROMPTS[1][:12], PROMPTS[2] + " " + PROMPTS[3]]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) == 3  # padding differs per row
    compare(model, tokenizer, prompts, BATCH, fused)


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64)])
def test_quantized_weights(bits, group, converted, fused, monkeypatch):
    # 4-bit weights' scales and biases are bfloat16 (convert.scales_dtype), 8-bit weights' float32; the packed copies
    # keep their dtype.
    model, tokenizer, _ = load_model(converted("t5-v1_1", quantize=True, q_bits=bits, q_group_size=group))
    monkeypatch.setattr(kernels, "integer", False)
    compare(model, tokenizer, PROMPTS[:1], ONE_ROW, fused)
    compare(model, tokenizer, PROMPTS[:3], BATCH[:3], fused)
    held = mx.bfloat16 if bits == 4 else mx.float32
    layers = [m for m in model.modules() if type(m) is FusedLinear and "scales" in m]
    assert layers and all(m.scales.dtype == m.biases.dtype == held for m in layers)
    copies = [m.packed_quantized() for m in layers]
    packed = [(scales, biases) for weight, scales, biases in copies if weight.dtype == mx.uint8]
    assert bool(packed) == kernels.packed_quantized_run(bits)
    assert all(scales.dtype == biases.dtype == held for scales, biases in packed)


@pytest.mark.skipif(kernels.native is None or "avx512" not in kernels.native.isas(), reason="no AVX-512 kernels")
def test_quantized_weights_run_packed_on_avx512_and_their_own_elsewhere(converted, fused, isa, monkeypatch):
    # On the AVX-512 kernel with float activations the products read packed copies of the quantized weights (the same
    # logits within float tolerance: test_quantized_weights), and with int8 activations the same copies where the CPU
    # has VNNI; on another instruction set, set after the copies were made, the layers read the model's own arrays
    # again.
    model, tokenizer, _ = load_model(converted("t5-v1_1", quantize=True, q_bits=4, q_group_size=32))
    qkv = model.decoder.layers[0].self_attn.qkv
    cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:1])
    fused(True)
    isa("avx512")
    monkeypatch.setattr(kernels, "integer", False)
    logits = {}
    for setting in ("packed", "avx2", "integer"):
        if setting == "avx2":
            isa("avx2")
        if setting == "integer":
            isa("avx512")
            monkeypatch.setattr(kernels, "integer", True)
        logits[setting] = np.stack([np.array(step[0, -1]) for step in run_steps(model, cross_kv, mask, ONE_ROW)[0]])
        weight = native_weights(model.decoder, kept_parts(model.decoder))[0][0][1][0][0]
        packed = setting == "packed" or (setting == "integer" and kernels.native.integer_products())
        assert (weight.dtype == mx.uint8) == packed, setting
        assert (weight is qkv["weight"]) == (not packed), setting
    assert qkv.__dict__["_packed"][1][0].dtype == mx.uint8  # the copy is kept for when it runs again
    np.testing.assert_allclose(logits["avx2"], logits["packed"], atol=2e-4, rtol=1e-4)
    assert np.abs(logits["integer"] - logits["packed"]).max() > 1e-4  # int8 activations did run


@pytest.mark.skipif(kernels.native is None or not kernels.native.integer_products(), reason="no integer products")
@pytest.mark.skipif(kernels.native is None or "avx512" not in kernels.native.isas(), reason="no AVX-512 kernels")
@pytest.mark.parametrize("integer", [False, True])
def test_a_model_over_the_packing_budget_holds_its_layers_packed(integer, converted, fused, isa, monkeypatch):
    # A model whose quantized layers' packed copies would not fit T5_PACKED_MB holds them packed in place of MLX's
    # layout: the same greedy tokens and, within float32, logits as the same model beside its copies; none is packed
    # in place within the budget, or with a budget of 0.
    fused(True)
    isa("avx512")
    monkeypatch.setattr(kernels, "integer", integer)
    path = converted("t5-v1_1", quantize=True, q_bits=4, q_group_size=32)

    def layer_dtypes(model):
        return {m.weight.dtype for m in model.modules() if type(m) is FusedLinear and m is not model.lm_head}

    results = {}
    for budget in ["2048", "0.01", "0"]:
        monkeypatch.setenv(kernels.PACK_ENV_VAR, budget)
        model, tokenizer, _ = load_model(path)
        assert layer_dtypes(model) == ({mx.uint8} if budget == "0.01" else {mx.uint32}), budget
        assert model.lm_head.weight.dtype == mx.uint32
        cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:1])
        logits = np.stack([np.array(step[0, -1]) for step in run_steps(model, cross_kv, mask, ONE_ROW)[0]])
        tokens = SpeculativeDecoder(model, None, tokenizer).generate(PROMPTS[0], 12, regular=True).tokens
        results[budget] = logits, tokens
    np.testing.assert_allclose(results["0.01"][0], results["2048"][0], atol=1e-4, rtol=1e-4)
    assert results["0.01"][1] == results["2048"][1]


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activations_stay_within_their_own_error(bits, converted, fused, monkeypatch):
    # With x quantized to int8 per row and group, a difference in x's last float bits (the attention's order of
    # summation) can round a value of x the other way: the native layers cannot match MLX's operations to float
    # tolerance. They must stay as close to them as int8 activations are to float ones, and use int8 activations.
    model, tokenizer, _ = load_model(converted("t5-v1_1", quantize=True, q_bits=bits, q_group_size=32))
    cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:1])
    logits = {}
    for integer in (False, True):
        monkeypatch.setattr(kernels, "integer", integer)
        for on in (False, True):
            fused(on)
            logits[integer, on] = np.stack(
                [np.array(step[0, -1]) for step in run_steps(model, cross_kv, mask, ONE_ROW)[0]]
            )
    int8_error = np.abs(logits[True, False] - logits[False, False]).max()
    assert int8_error > 1e-4  # the integer products did run
    # (Over three random 4-bit models, with float32 and with bfloat16 scales, the largest difference was 1.1-2.6x the
    # largest int8 error; a wrong product would be off by about the logits themselves, 20x or more.)
    assert np.abs(logits[True, True] - logits[True, False]).max() <= 3 * int8_error
    assert np.abs(logits[True, True] - logits[False, True]).max() > 1e-4


@pytest.mark.parametrize("name", kernels.native.isas() if kernels.native else [])
def test_every_instruction_set(name, converted, fused, isa):
    isa(name)
    model, tokenizer, _ = load_model(converted("t5"))
    compare(model, tokenizer, PROMPTS[:3], BATCH, fused)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])
def test_half_precision_models_compute_in_float32(variant, dtype, converted, fused):
    # A bfloat16 or float16 model's layers run natively on its own weights with float32 activations: MLX's
    # operations on the same weights widened to float32 give the same logits and caches within float32's tolerance.
    # (A float16 conversion keeps the feed-forward's wo in float32: products of both dtypes in one layer.)
    path = converted(variant, dtype=dtype)
    model, tokenizer, _ = load_model(path)
    assert model.decoder.layers[0].self_attn.qkv.weight.dtype == getattr(mx, dtype)
    reference = widened(path)
    compare(model, tokenizer, PROMPTS[:1], ONE_ROW, fused, reference)
    compare(model, tokenizer, PROMPTS[:3], BATCH, fused, reference)
    # The MLX operations in half precision (the path off the CPU) round at every step: they agree to their own
    # precision.
    fused(True)
    native, _ = run_steps(model, *prompt_state(model, tokenizer, PROMPTS[:1]), ONE_ROW[:2])
    fused(False)
    rounded, _ = run_steps(model, *prompt_state(model, tokenizer, PROMPTS[:1]), ONE_ROW[:2])
    assert native[-1].dtype == mx.float32 and rounded[-1].dtype == getattr(mx, dtype)
    scale = float(mx.abs(native[-1]).max())
    np.testing.assert_allclose(np.array(rounded[-1].astype(mx.float32)), np.array(native[-1]), atol=0.05 * scale)


def test_a_cache_written_by_half_precision_operations_keeps_them(converted, fused):
    # A cache of another dtype than float32 (MLX's operations on a half-precision model) is continued by them.
    model, tokenizer, _ = load_model(converted("t5", dtype="bfloat16"))
    cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:1])
    cache = model.make_cache()
    fused(False)
    mx.eval(model.decode(mx.array([[0, 5]]), cross_kv, cache))
    fused(True)
    kernels.used.discard("native decoder layers")
    logits = model.decode(mx.array([[9]]), cross_kv, cache)
    mx.eval(logits)
    assert "native decoder layers" not in kernels.used and cache[0].keys.dtype == mx.bfloat16
    assert model.greedy_draft(mx.array([[9]]), cross_kv, cache, 2) is None


def test_a_cache_written_in_place_or_not_gives_the_same_steps(converted, fused, monkeypatch):
    # Not in place, the layers write each cache's new positions into a new buffer: an array that still holds the old
    # one (MLX arrays are values) keeps its contents. In place (KVCache.in_place, the default), they write into the
    # cache's own buffer: an old array of it shows the positions written past the length it was trimmed to, and the
    # positions below that length as they were. The logits and caches are the same either way.
    model, tokenizer, _ = load_model(converted("t5"))
    fused(True)
    cross_kv, _ = prompt_state(model, tokenizer, PROMPTS[:1])
    results = {}
    for in_place in (False, True):
        monkeypatch.setattr(KVCache, "in_place", in_place)
        cache = model.make_cache()
        mx.eval(model.decode(mx.array([[0, 5, 9]]), cross_kv, cache))
        old_keys = cache[0].keys
        before = np.array(old_keys)
        for layer_cache in cache:
            layer_cache.trim(1)
        logits = model.decode(mx.array([[7, 8]]), cross_kv, cache)
        mx.eval(logits)
        keys = np.array(cache[0].keys)[:, :, :4]
        assert cache[0].offset == 4 and not np.array_equal(keys[:, :, 2:4], before[:, :, 2:4])
        np.testing.assert_array_equal(np.array(old_keys)[:, :, :2], before[:, :, :2])
        np.testing.assert_array_equal(np.array(old_keys)[:, :, :4], keys if in_place else before[:, :, :4])
        results[in_place] = np.array(logits), keys
    for copied, written in zip(results[False], results[True]):
        np.testing.assert_array_equal(copied, written)


def test_bad_inputs_are_refused_when_the_graph_is_built(converted):
    model, tokenizer, _ = load_model(converted("t5"))
    decoder = model.decoder
    cross_kv, _ = prompt_state(model, tokenizer, PROMPTS[:1])
    cache = model.make_cache()
    x = model.shared(mx.array([[0, 5]]))
    layers, _, _ = decoder.native_layers(x.shape[0], x.shape[1], cross_kv, cache)
    bias = decoder.position_bias([0], 2)
    heads = model.args.num_heads
    call = kernels.native.decoder_layers
    with pytest.raises(ValueError, match="one offset per row"):
        call(x, bias, None, [0, 0], layers, heads, 1e-6, 0, False, False)
    with pytest.raises(ValueError, match="self bias"):
        call(x, bias[:, :, :1], None, [0], layers, heads, 1e-6, 0, False, False)
    with pytest.raises(ValueError, match="self bias"):  # (rows from the offset on: one short)
        call(x, bias, None, [0], layers, heads, 1e-6, 0, False, False, bias_offset=1)
    with pytest.raises(ValueError, match="bias offset must not be negative"):
        call(x, bias, None, [0], layers, heads, 1e-6, 0, False, False, bias_offset=-1)
    with pytest.raises(ValueError, match="float32"):
        call(x.astype(mx.float16), bias, None, [0], layers, heads, 1e-6, 0, False, False)
    with pytest.raises(ValueError, match="cross bias"):
        call(x, bias, padding_bias(mx.ones((1, 3)), mx.float32), [0], layers, heads, 1e-6, 0, False, False)
    keys, values, *rest = layers[0]
    with pytest.raises(ValueError, match="no room"):
        call(x, bias, None, [0], [(keys[:, :, :1], values[:, :, :1], *rest)], heads, 1e-6, 0, False, False)
    weights = list(rest[3])
    weights[1] = (weights[0][0],) + weights[1][1:]  # qkv's weight where o's belongs
    with pytest.raises(ValueError, match="weight's shape"):
        call(x, bias, None, [0], [(keys, values, *rest[:3], weights)], heads, 1e-6, 0, False, False)
    with pytest.raises(ValueError, match="activation"):
        call(x, bias, None, [0], layers, heads, 1e-6, 9, False, False)
    with pytest.raises(ValueError, match="one cache row per row"):
        call(x, bias, None, [0], layers, heads, 1e-6, 0, False, False, cache_rows=[0, 0])
    with pytest.raises(ValueError, match="a cache row must be -1 or a row"):
        call(x, bias, None, [0], layers, heads, 1e-6, 0, False, False, cache_rows=[1])
    # Token ids need an embedding table the kernels read: float, or MLX's own 4/8-bit words with their scales.
    head = (model.decoder.final_norm.weight, 1.0, model.lm_head.native_weight(), False)
    ids = mx.array([[0, 5]])
    table = model.shared.weight
    with pytest.raises(ValueError, match="embedding table must be float32"):
        call(ids, bias, None, [0], layers, heads, 1e-6, 0, False, False, head, table.astype(mx.int32))
    words, scales, biases = mx.quantize(table, 32, 4)
    with pytest.raises(ValueError, match="quantized weights must be MLX affine"):
        call(ids, bias, None, [0], layers, heads, 1e-6, 0, False, False, head, (words, scales, biases, 32, 3))
    with pytest.raises(ValueError, match="uint32 words"):
        packed = (words.view(mx.uint8), scales, biases, 32, 4)
        call(ids, bias, None, [0], layers, heads, 1e-6, 0, False, False, head, packed)
    mx.eval(call(ids, bias, None, [0], layers, heads, 1e-6, 0, False, False, head, (words, scales, biases, 32, 4)))


def test_weights_changed_after_a_step_are_seen(converted, fused):
    # The layers' inputs are found once and kept until an assignment to the model's modules: a weight replaced, a
    # module replaced, or an array changed in place must all be seen by the next step.
    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:1])

    def logits(on):
        fused(on)
        return np.array(run_steps(model, cross_kv, mask, ONE_ROW[:2])[0][-1])

    before = logits(True)
    layer = model.decoder.layers[0]
    layer.mlp.wo.weight = layer.mlp.wo.weight * 3
    changed = logits(True)
    np.testing.assert_allclose(changed, logits(False), atol=1e-4, rtol=0)
    assert np.abs(changed - before).max() > 1e-3
    layer.self_attn_norm.weight[:4] = 0  # in place: the same array object
    changed_again = logits(True)
    np.testing.assert_allclose(changed_again, logits(False), atol=1e-4, rtol=0)
    assert np.abs(changed_again - changed).max() > 1e-3


# Conversions of the greedy tests' models beyond float32: half precision, and quantized (the embedding table too,
# which the native layers dequantize).
CONVERSIONS = {"float16": dict(dtype="float16"), "8-bit": dict(quantize=True, q_bits=8, q_group_size=32)}


@pytest.mark.parametrize(
    "variant, conversion",
    [("t5", None), ("t5-v1_1", None), ("gated-silu", None), ("t5", "float16"), ("t5-v1_1", "8-bit")],
)
def test_greedy_drafting_in_one_operation_is_the_step_by_step_argmax(
    variant, conversion, converted, fused, monkeypatch
):
    # T5.greedy_draft: a draft model's greedy steps as one operation. Its tokens are the argmax of MLX's operations
    # step by step (where the best is clear; a half-precision model's weights widened to float32, as the native
    # layers compute), and its cache holds the same keys and values, across two calls (the second fed two tokens, as
    # a drafter feeds after a full acceptance).
    monkeypatch.setattr(kernels, "integer", False)
    path = converted(variant, **CONVERSIONS.get(conversion, {}))
    model, tokenizer, _ = load_model(path)
    reference = widened(path)
    fused(True)
    cross_kv, _ = prompt_state(model, tokenizer, PROMPTS[:1])
    fused(False)
    reference_kv, _ = prompt_state(reference, tokenizer, PROMPTS[:1])
    native_cache, reference_cache = model.make_cache(), model.make_cache()
    fed = [[0]]
    for count in (5, 3):
        fused(True)
        tokens = model.greedy_draft(mx.array(fed), cross_kv, native_cache, count)
        assert tokens is not None and tokens.dtype == mx.int32
        tokens = tokens.tolist()
        fused(False)
        expected, step_input = [], fed
        for _ in range(count):
            logits = np.array(reference.decode(mx.array(step_input), reference_kv, reference_cache)[0, -1])
            best = np.sort(logits)
            assert best[-1] - best[-2] > 1e-4  # a clear choice (else the comparison below could not be exact)
            expected.append(int(logits.argmax()))
            step_input = [[expected[-1]]]
        assert tokens == expected
        assert native_cache[0].offsets == reference_cache[0].offsets
        for ours, theirs in zip(native_cache, reference_cache):
            length = theirs.offsets[0]
            np.testing.assert_allclose(
                np.array(ours.keys[:, :, :length]), np.array(theirs.keys[:, :, :length]), atol=1e-5, rtol=1e-5
            )
        # Both fed every token but the last; the next call feeds the last two, as a drafter does after a full
        # acceptance.
        fed = [[expected[-2], expected[-1]]]
        for layer_cache in (*native_cache, *reference_cache):
            layer_cache.trim(1)


@pytest.mark.parametrize("variant, conversion", [("t5", None), ("t5-v1_1", "8-bit"), ("wide", None)])
def test_steps_computed_now_are_those_computed_on_the_stream(
    variant, conversion, converted, hf_checkpoint, fused, tmp_path
):
    # now=True computes a greedy step on the calling thread before it returns, not on MLX's stream: the same tokens,
    # the same caches, over a sequence of drafting and verification calls that grow and rewind the caches, the first
    # with inputs not yet computed (the cross-attention keys and values, evaluated first). "wide": products of one row
    # large enough (256 x 256 float32, 262 KB) that a step computed at once shares them among the threads, where on
    # the stream the calling thread computes them alone.
    if variant == "wide":
        checkpoint = hf_checkpoint("t5", d_model=256, d_kv=64, d_ff=512)
        model, tokenizer, _ = load_model(convert.convert(str(checkpoint), mlx_path=str(tmp_path / "wide")))
    else:
        model, tokenizer, _ = load_model(converted(variant, **CONVERSIONS.get(conversion, {})))
    fused(True)
    ids = mx.array(tokenizer(PROMPTS[:1]).input_ids)
    cross_kv = model.cross_kv(model.encode(ids))  # (not evaluated)
    calls = [("draft", [[0]], 6), ("choices", [[4, 9, 2, 7]], 0), ("draft", [[3, 5]], 20), ("choices", [[8] * 9], 0)]
    caches = {now: model.make_cache() for now in (False, True)}
    for kind, fed, count in calls:
        outputs, jobs = {}, {}
        for now in (False, True):
            before = kernels.native.pool_jobs()
            if kind == "draft":
                out = model.greedy_draft(mx.array(fed), cross_kv, caches[now], count, now=now)
            else:
                out = model.greedy_choices(mx.array(fed), cross_kv, caches[now], now=now)
            # Computed before it returned: no operation left in its graph (else the native one, to be computed).
            graph = operations(out, tmp_path)
            assert graph == [] if now else "DecoderLayers" in graph
            outputs[now] = out.tolist()
            jobs[now] = kernels.native.pool_jobs() - before
        assert outputs[True] == outputs[False]
        if variant == "wide" and kind == "draft" and count == 20 and kernels.native.threads() > 1:
            assert jobs[True] > jobs[False]  # one-row products shared among the threads at once only
        assert caches[True][0].offsets == caches[False][0].offsets
        for ours, theirs in zip(caches[True], caches[False]):
            length = ours.offset
            for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                assert np.array_equal(np.array(a[:, :, :length]), np.array(b[:, :, :length]))
        for layer_cache in (*caches[False], *caches[True]):
            layer_cache.trim(2)


def operations(array, tmp_path):
    """The operations left in an array's graph, by name (none once it is computed and detached)."""
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), array)
    return re.findall(r'label ="(\w+)", shape=rectangle', path.read_text())


def test_greedy_drafting_is_declined_where_the_native_layers_do_not_apply(converted, fused):
    model, tokenizer, _ = load_model(converted("t5"))
    cross_kv, _ = prompt_state(model, tokenizer, PROMPTS[:1])
    fused(False)
    assert model.greedy_draft(mx.array([[0]]), cross_kv, model.make_cache(), 3) is None

    cache = model.make_cache()
    wo = model.decoder.layers[1].mlp.wo
    model.decoder.layers[1].mlp.wo = nn.Linear(*wo.weight.shape[::-1], bias=False)  # not a product the kernels compute
    fused(True)
    assert model.greedy_draft(mx.array([[0]]), cross_kv, cache, 3) is None
    assert cache[0].offsets == [0]  # nothing was reserved or written


@pytest.mark.parametrize("variant, conversion", [("t5", None), ("t5-v1_1", None), ("t5", "8-bit")])
@pytest.mark.parametrize("rows", [1, 2])
def test_greedy_choices_are_the_argmax_of_the_native_logits(variant, conversion, rows, converted, fused):
    # T5.greedy_choices: a greedy verification as one native operation that returns the main model's choice after
    # each token instead of the logits. The choices are exactly the argmax (the first of equal values) of the same
    # native layers' logits, for one row and for padded prompts whose rows are at their own lengths, and the cache
    # takes the same keys and values (a quantized table's rows dequantized as MLX's operations dequantize them).
    model, tokenizer, _ = load_model(converted(variant, **CONVERSIONS.get(conversion, {})))
    cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:rows])
    fused(True)
    caches = model.make_cache(rows), model.make_cache(rows)
    steps = [([[0, 5, 9, 2]] * rows, None), ([[7, 3, 3], [1, 8, 4]][:rows], [2, 0][:rows]), ([[6]] * rows, None)]
    for ids, rewind in steps:
        if rewind:
            for layer_cache in (*caches[0], *caches[1]):
                layer_cache.trim_rows(rewind)
        expected = mx.argmax(model.decode(mx.array(ids), cross_kv, caches[0], mask), axis=-1)
        choices = model.greedy_choices(mx.array(ids), cross_kv, caches[1], mask)
        assert choices is not None and choices.dtype == mx.int32 and choices.shape == (rows, len(ids[0]))
        assert choices.tolist() == expected.tolist()
        assert caches[0][0].offsets == caches[1][0].offsets
        for ours, theirs in zip(caches[1], caches[0]):
            assert np.array_equal(np.array(ours.keys[:, :, : ours.offset]), np.array(theirs.keys[:, :, : ours.offset]))
    fused(False)
    assert model.greedy_choices(mx.array([[0]]), cross_kv, model.make_cache(rows), mask) is None


def test_a_stop_token_ends_greedy_drafting_and_verification_early(converted, fused):
    # With a stop token (EOS where it ends the output), drafting stops computing once it drafts it (the rest of the
    # tokens are the stop token) and a verification computes nothing from the first stop token past its first id on
    # (the choices there are -1, which no draft matches). What is computed is what the call without a stop computes.
    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    cross_kv, _ = prompt_state(model, tokenizer, PROMPTS[:1])
    fused(True)
    full = model.greedy_draft(mx.array([[0]]), cross_kv, model.make_cache(), 6).tolist()
    stop = full[2]
    first = full.index(stop)
    cache = model.make_cache()
    stopped = model.greedy_draft(mx.array([[0]]), cross_kv, cache, 6, stop=stop).tolist()
    assert stopped == full[: first + 1] + [stop] * (5 - first)
    assert cache[0].offsets == [6]  # every position fed is the cache's, the unwritten ones zeros
    assert not np.any(np.array(cache[0].keys[:, :, first + 1 : 6]))

    ids = [0, 7, stop, 9, stop]
    expected = model.greedy_choices(mx.array([ids]), cross_kv, model.make_cache()).tolist()[0]
    choices = model.greedy_choices(mx.array([ids]), cross_kv, model.make_cache(), stop=stop).tolist()[0]
    assert choices == expected[:2] + [-1, -1, -1]
    # The first id is the token before the drafts, never a reason to stop.
    assert model.greedy_choices(mx.array([[stop, 7]]), cross_kv, model.make_cache(), stop=stop).tolist()[0] == (
        model.greedy_choices(mx.array([[stop, 7]]), cross_kv, model.make_cache()).tolist()[0]
    )
    two_rows, _ = prompt_state(model, tokenizer, PROMPTS[:2])
    with pytest.raises(ValueError, match="stop token"):
        model.greedy_choices(mx.array([[0, 7], [0, 8]]), two_rows, model.make_cache(2), stop=stop)


@pytest.mark.parametrize("name", kernels.native.isas() if kernels.native else [])
def test_wide_heads_over_many_keys_and_rows_alike(name, hf_checkpoint, tmp_path, fused, isa):
    """Heads of 76 values (whole vectors and a part, on every instruction set) attending to more keys than a vector
    holds, against MLX's operations; and each row of a verification is its one-token step's, bit for bit (what keeps
    greedy speculative decoding the same as regular decoding)."""
    import convert

    isa(name)
    checkpoint = hf_checkpoint("t5", d_kv=76, num_heads=2)
    model, tokenizer, _ = load_model(convert.convert(str(checkpoint), mlx_path=str(tmp_path / "wide")))
    prompts = [PROMPTS[4]]  # more tokens than a vector's 16 lanes
    start, verified = [list(range(3, 24))], [5, 6, 7, 8, 9, 10, 11]
    compare(model, tokenizer, prompts, [(start, None), ([[25]], None), ([verified], None), ([[12]], [3])], fused)
    fused(True)
    cross_kv, mask = prompt_state(model, tokenizer, prompts)
    together, _ = run_steps(model, cross_kv, mask, [(start, None), ([verified], None)])
    alone, _ = run_steps(model, cross_kv, mask, [(start, None)] + [([[token]], None) for token in verified])
    np.testing.assert_array_equal(np.array(together[1][0]), np.concatenate([np.array(step[0]) for step in alone[1:]]))


@pytest.mark.parametrize("variant, conversion", [("t5", None), ("t5-v1_1", "8-bit")])
def test_logits_from_token_ids_in_one_operation(variant, conversion, converted, fused, monkeypatch):
    # model.decode hands the native layers the token ids (the embedding looked up inside the same operation): its
    # logits are those of the layers fed the embedded rows by MLX's operations, for one row and padded rows at their
    # own lengths, and the caches take the same keys and values.
    model, tokenizer, _ = load_model(converted(variant, **CONVERSIONS.get(conversion, {})))
    fused(True)
    cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:2])
    calls = []
    from_ids = model.greedy_tokens
    monkeypatch.setattr(model, "greedy_tokens", lambda *a, **k: calls.append(k) or from_ids(*a, **k))
    caches = model.make_cache(2), model.make_cache(2)
    for ids in ([[0, 5, 9], [0, 4, 4]], [[6], [8]]):
        got = model.decode(mx.array(ids), cross_kv, caches[0], mask)
        assert calls.pop() == {"logits": True} and got.shape == (2, len(ids[0]), model.args.vocab_size)
        monkeypatch.setattr(model, "greedy_tokens", lambda *a, **k: None)  # the embedding as MLX's operations
        expected = model.decode(mx.array(ids), cross_kv, caches[1], mask)
        monkeypatch.setattr(model, "greedy_tokens", lambda *a, **k: calls.append(k) or from_ids(*a, **k))
        np.testing.assert_allclose(
            np.array(got), np.array(expected), atol=1e-5 * max(1.0, float(mx.abs(expected).max()))
        )
        for ours, theirs in zip(*caches):
            assert np.array_equal(np.array(ours.keys[:, :, : ours.offset]), np.array(theirs.keys[:, :, : ours.offset]))
    # Logits come only from a plain step: not with greedy drafting or a stop token.
    one_row, _ = prompt_state(model, tokenizer, PROMPTS[:1])
    for count, stop in ((3, None), (0, 1)):
        with pytest.raises(ValueError, match="logits from token ids"):
            model.greedy_tokens(mx.array([[0, 5]]), one_row, model.make_cache(), None, count, stop=stop, logits=True)


def test_rows_that_leave_and_join_are_read_in_place_as_if_gathered(converted, fused):
    """A batch's caches after rows leave and join (KVCache.rows) are read by the native layers through the rows' map,
    with the same numbers as caches gathered into place first, and the same as MLX's operations on gathered caches."""
    model, tokenizer, _ = load_model(converted("t5"))
    cross_kv, mask = prompt_state(model, tokenizer, PROMPTS[:3])
    index = mx.array([2, 0, 1, 1])  # rows 2 and 0 stay; two rows join, with row 1's prompt

    def run(gather, native):
        fused(native)
        cache = model.make_cache(3)
        first = model.decode(mx.array([[0, 5, 9], [0, 4, 4], [0, 30, 2]]), cross_kv, cache, mask)
        for layer_cache in cache:
            layer_cache.keep_rows([2, 0])
            layer_cache.add_rows(2)
            if gather:
                layer_cache.gather_rows()
        assert (cache[0].rows is None) == gather
        rows_kv = [(keys[index], values[index]) for keys, values in cross_kv]
        ids = mx.array([[6, 7], [8, 9], [0, 11], [0, 12]])
        second = model.decode(ids, rows_kv, cache, mask[index])
        assert cache[0].offsets == [5, 5, 2, 2] and cache[0].rows is None
        mx.eval(first, second, [(c.keys, c.values) for c in cache])
        return first, second, cache

    got = run(gather=False, native=True)
    for expected, exact in ((run(gather=True, native=True), True), (run(gather=True, native=False), False)):
        for ours, theirs in zip(got[:2], expected[:2]):
            if exact:
                np.testing.assert_array_equal(np.array(ours), np.array(theirs))
            else:
                np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=1e-4)
        for ours, theirs in zip(got[2], expected[2]):
            for row, length in enumerate(theirs.offsets):
                np.testing.assert_allclose(
                    np.array(ours.keys[row, :, :length]), np.array(theirs.keys[row, :, :length]), atol=1e-5, rtol=0
                )


def test_a_loaded_model_holds_its_packed_copies_before_its_first_prompt(converted, fused):
    # load_model packs every linear layer's float weight for the native kernels, so that a process's first prompt does
    # not; a lazy load packs nothing, and neither does a load with the native layers off. The packed model's tokens are
    # those of the same model packing as it goes.
    path = converted("t5-v1_1")

    def packed(model):
        linears = [m for m in model.modules() if type(m) is FusedLinear]
        return [m.__dict__.get("_packed", (None, None))[1] is not None for m in linears]

    fused(True)
    model, tokenizer, _ = load_model(path)
    assert all(packed(model))
    tokens = SpeculativeDecoder(model, None, tokenizer).generate(PROMPTS[0], 12, regular=True).tokens
    lazy, _, _ = load_model(path, lazy=True)
    assert not any(packed(lazy))
    assert SpeculativeDecoder(lazy, None, tokenizer).generate(PROMPTS[0], 12, regular=True).tokens == tokens
    fused(False)
    assert not any(packed(load_model(path)[0]))
