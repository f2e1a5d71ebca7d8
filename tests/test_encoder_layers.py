"""The native encoder layers (kernels.encoder_layers: every encoder layer and the final norm as one operation) against
the same model's MLX operations, for every T5 variant, a single prompt and a padded batch, quantized weights and every
instruction set this CPU runs, and half-precision models (computed in float32); where they do not apply (long prompts
attended in blocks) MLX's operations run."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPTS, VARIANTS
from mlx.utils import tree_map

import kernels
import model as model_module
import native_layers
from loader import load_model

pytestmark = pytest.mark.skipif(kernels.native is None, reason="native kernels not built")

USED = "native encoder layers"


def encoded(model, tokenizer, prompts, fused, on):
    """(encoder output, mask) of the padded prompts, natively or with MLX's operations; checks which ran."""
    batch = tokenizer(prompts, padding=True)
    ids, mask = mx.array(batch.input_ids), mx.array(batch.attention_mask)
    fused(on)
    kernels.used.discard(USED)
    out = model.encode(ids, mask)
    mx.eval(out)
    assert (USED in kernels.used) == on
    return np.array(out), np.array(mask).astype(bool)


def compare(model, tokenizer, prompts, fused):
    expected, mask = encoded(model, tokenizer, prompts, fused, False)
    got, _ = encoded(model, tokenizer, prompts, fused, True)
    # Padding positions are never attended to (their keys are masked); compare the prompts' own positions.
    scale = max(1.0, float(np.abs(expected[mask]).max()))
    np.testing.assert_allclose(got[mask], expected[mask], atol=2e-5 * scale, rtol=0)
    assert np.abs(expected[mask]).max() > 1e-2  # not trivially small


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_one_prompt_and_a_padded_batch(variant, converted, fused):
    model, tokenizer, _ = load_model(converted(variant))
    compare(model, tokenizer, PROMPTS[:1], fused)
    prompts = [PROMPTS[0], PROMPTS[1][:12], PROMPTS[2] + " " + PROMPTS[3]]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) == 3  # padding differs per row
    compare(model, tokenizer, prompts, fused)


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64)])
def test_quantized_weights(bits, group, converted, fused, monkeypatch):
    model, tokenizer, _ = load_model(converted("t5-v1_1", quantize=True, q_bits=bits, q_group_size=group))
    monkeypatch.setattr(kernels, "integer", False)
    compare(model, tokenizer, PROMPTS[:3], fused)


@pytest.mark.parametrize("name", kernels.native.isas() if kernels.native else [])
def test_every_instruction_set(name, converted, fused, isa):
    isa(name)
    model, tokenizer, _ = load_model(converted("t5"))
    compare(model, tokenizer, PROMPTS[:3], fused)


@pytest.mark.parametrize("name", kernels.native.isas() if kernels.native else [])
@pytest.mark.parametrize("d_kv", [16, 64, 80])
def test_heads_of_whole_vectors_every_instruction_set(name, d_kv, hf_checkpoint, tmp_path, fused, isa):
    # Heads of whole 16-float vectors attend several queries at once with AVX-512: one, four and five vectors of
    # output; a prompt long enough for whole tiles of 64 keys with a tail of keys and of queries, and a padded batch.
    import convert

    isa(name)
    checkpoint = hf_checkpoint("t5", d_kv=d_kv, num_heads=2)
    model, tokenizer, _ = load_model(convert.convert(str(checkpoint), mlx_path=str(tmp_path / "heads")))
    long = " ".join(PROMPTS)
    length = len(tokenizer(long).input_ids)
    assert length > 64 and length % 16 and length % 6
    compare(model, tokenizer, [long], fused)
    compare(model, tokenizer, [long, PROMPTS[0], PROMPTS[4]], fused)


def test_long_prompts_attended_in_blocks_use_mlx(converted, fused, monkeypatch):
    model, tokenizer, _ = load_model(converted("t5"))
    ids = mx.array([tokenizer(PROMPTS[4]).input_ids])
    fused(True)
    expected = model.encode(ids)
    # Blocks of query rows (a prompt whose scores would not fit at once) are MLX's operations.
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK_BYTES", 4 * model.args.num_heads * ids.shape[1] * 3)
    assert model.encoder.block_rows(1, ids.shape[1]) < ids.shape[1]
    kernels.used.discard(USED)
    blocked = model.encode(ids)
    mx.eval(blocked)
    assert USED not in kernels.used
    np.testing.assert_allclose(np.array(blocked), np.array(expected), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_compute_in_float32(dtype, converted, fused):
    # Natively a half-precision model's encoder computes in float32 on its own weights: MLX's operations on the
    # weights widened to float32 give the same output within float32's tolerance.
    path = converted("t5-v1_1", dtype=dtype)
    half, tokenizer, _ = load_model(path)
    reference, _, _ = load_model(path)
    widen = (mx.bfloat16, mx.float16)
    reference.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype in widen else a, reference.parameters()))
    prompts = [PROMPTS[0], PROMPTS[1][:12], PROMPTS[2]]
    expected, mask = encoded(reference, tokenizer, prompts, fused, False)
    got, _ = encoded(half, tokenizer, prompts, fused, True)
    assert got.dtype == np.float32
    scale = max(1.0, float(np.abs(expected[mask]).max()))
    np.testing.assert_allclose(got[mask], expected[mask], atol=2e-5 * scale, rtol=0)


def test_weights_changed_after_a_call_are_seen(converted, fused):
    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    before, _ = encoded(model, tokenizer, PROMPTS[:1], fused, True)
    layer = model.encoder.layers[1]
    layer.mlp.wo.weight = layer.mlp.wo.weight * 3
    changed, _ = encoded(model, tokenizer, PROMPTS[:1], fused, True)
    np.testing.assert_allclose(changed, encoded(model, tokenizer, PROMPTS[:1], fused, False)[0], atol=1e-4, rtol=0)
    assert np.abs(changed - before).max() > 1e-3
    layer.self_attn_norm.weight[:4] = 0  # in place: the same array object
    changed_again, _ = encoded(model, tokenizer, PROMPTS[:1], fused, True)
    np.testing.assert_allclose(
        changed_again, encoded(model, tokenizer, PROMPTS[:1], fused, False)[0], atol=1e-4, rtol=0
    )
    assert np.abs(changed_again - changed).max() > 1e-3


def test_bad_inputs_are_refused_when_the_graph_is_built(converted):
    model, _, _ = load_model(converted("t5"))
    heads, d_model = model.args.num_heads, model.args.d_model
    layers = [
        ([norm["weight"] for norm in norms], [linear.native_weight() for linear in linears])
        for norms, linears in native_layers.kept_parts(model.encoder)
    ]
    x, bias, final = mx.zeros((1, 3, d_model)), mx.zeros((1, heads, 3, 3)), model.encoder.final_norm.weight
    call = kernels.native.encoder_layers
    mx.eval(call(x, bias, layers, final, heads, 1e-6, 0, False, False))  # as given, it runs
    with pytest.raises(ValueError, match="x must be"):
        call(x.astype(mx.float16), bias, layers, final, heads, 1e-6, 0, False, False)
    with pytest.raises(ValueError, match="bias must be"):
        call(x, bias[:, :, :2], layers, final, heads, 1e-6, 0, False, False)
    with pytest.raises(ValueError, match="final norm"):
        call(x, bias, layers, final[:2], heads, 1e-6, 0, False, False)
    weights = list(layers[0][1])
    weights[1] = weights[0]  # qkv's weight where o's belongs
    with pytest.raises(ValueError, match="weight's shape"):
        call(x, bias, [(layers[0][0], weights)], final, heads, 1e-6, 0, False, False)
    with pytest.raises(ValueError, match="activation"):
        call(x, bias, layers, final, heads, 1e-6, 9, False, False)


CROSS = "native cross projections"


def cross_kv(model, encoder_output, fused, on):
    """Each decoder layer's cross keys and values (numpy), natively or with MLX's operations; checks which ran."""
    fused(on)
    kernels.used.discard(CROSS)
    projected = model.cross_kv(encoder_output)
    mx.eval(projected)
    assert (CROSS in kernels.used) == on
    return [np.array(a) for pair in projected for a in pair]


@pytest.mark.parametrize(
    "variant, options",
    [
        ("t5", {}),
        ("t5-v1_1", {}),
        ("t5", dict(quantize=True, q_bits=4, q_group_size=32)),
        ("t5-v1_1", dict(quantize=True, q_bits=8, q_group_size=64)),
        ("byt5", {}),
    ],
)
def test_cross_projections_equal_each_layers_own_products(variant, options, converted, fused):
    """The cross-attention keys and values of every decoder layer as one operation: bit for bit the products the
    layers' own projections compute (the same kernels, row by row), for a padded batch, float and quantized weights.
    Two decoder layers (four projections) on two threads or more take whole projections per task; byt5's one decoder
    layer takes each projection's columns across the threads."""
    model, tokenizer, _ = load_model(converted(variant, **options))
    batch = tokenizer([PROMPTS[0], PROMPTS[1][:12], PROMPTS[2]], padding=True)
    encoder_output = model.encode(mx.array(batch.input_ids), mx.array(batch.attention_mask))
    expected = cross_kv(model, encoder_output, fused, False)
    got = cross_kv(model, encoder_output, fused, True)
    args = model.args
    assert len(got) == 2 * args.num_decoder_layers
    shape = (3, args.num_heads, encoder_output.shape[1], args.d_kv)
    assert all(a.shape == shape for a in got) and all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert min(np.abs(a).max() for a in expected) > 1e-3  # not trivially small


def test_cross_projections_refuse_bad_inputs(converted):
    model, _, _ = load_model(converted("t5"))
    attentions = [layer.cross_attn for layer in model.decoder.layers]
    weights = [w for a in attentions for w in (a.k.native_weight(), a.v.native_weight())]
    x, heads = mx.zeros((1, 3, model.args.d_model)), model.args.num_heads
    mx.eval(kernels.native.cross_projections(x, weights, heads, False))  # as given, it runs
    with pytest.raises(ValueError, match="x must be"):
        kernels.native.cross_projections(x.astype(mx.float16), weights, heads, False)
    with pytest.raises(ValueError, match="keys and values"):
        kernels.native.cross_projections(x, weights[:1], heads, False)
    with pytest.raises(ValueError, match="float weights"):
        kernels.native.cross_projections(x[..., :-1], weights, heads, False)
