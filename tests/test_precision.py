"""Half precision and quantized conversions against the float32 model."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from test_model import greedy, padded_batch, to_mx

import convert
from loader import load_model

# Teacher-forced agreement of the argmax with float32 greedy decoding, over 3 prompts x 32 positions of a random
# model (group size 32). Random models have small logit margins, so this is a harsh setting; measured here:
# 8-bit 1.000 ("t5") and 0.979 ("t5-v1_1"), 4-bit 1.000 and 0.646. The bounds sit below those with room for platform
# rounding, and far above what a broken quantized path gives (chance: 1/384).
MIN_AGREEMENT = {8: 0.9, 4: 0.5}


def argmax_agreement(model, reference_model):
    input_ids, mask, _ = padded_batch(reference_model.args.vocab_size, seed=4)
    input_ids, mask = to_mx(input_ids), to_mx(mask)
    tokens = greedy(reference_model, input_ids, mask, steps=32)
    start = np.full((tokens.shape[0], 1), reference_model.args.decoder_start_token_id)
    decoder_ids = mx.array(np.concatenate([start, tokens[:, :-1]], axis=1))
    predicted = np.array(mx.argmax(model(input_ids, decoder_ids, mask), axis=-1))
    return float((predicted == tokens).mean())


@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_agrees_with_float32_greedy(variant, bits, converted):
    reference, _, _ = load_model(converted(variant))
    path = converted(variant, quantize=True, q_bits=bits, q_group_size=32)
    model, _, config = load_model(path)
    scales_dtype = "bfloat16" if bits == 4 else "float32"  # (convert.scales_dtype)
    assert config["mlx"]["quantization"] == {"group_size": 32, "bits": bits, "scales_dtype": scales_dtype}
    assert "scales" in model.decoder.layers[0].self_attn.qkv  # really quantized
    agreement = argmax_agreement(model, reference)
    print(f"{variant} {bits}-bit: argmax agreement with float32 greedy {agreement:.3f}")
    assert agreement >= MIN_AGREEMENT[bits]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])
def test_half_precision_gives_finite_logits_close_to_float32(variant, dtype, converted):
    reference, _, _ = load_model(converted(variant))
    model, _, _ = load_model(converted(variant, dtype=dtype))
    assert model.shared.weight.dtype == getattr(mx, dtype)
    input_ids, mask, decoder_ids = (to_mx(t) for t in padded_batch(model.args.vocab_size))
    logits = model(input_ids, decoder_ids, mask).astype(mx.float32)
    assert bool(mx.all(mx.isfinite(logits)))
    expected = reference(input_ids, decoder_ids, mask)
    assert float(mx.abs(logits - expected).max()) < 0.1 * float(mx.abs(expected).max())
    assert argmax_agreement(model, reference) >= 0.9


def test_float16_keeps_wo_in_float32_and_stays_finite_with_large_activations(hf_checkpoint, tmp_path):
    # Feed-forward outputs far beyond float16's range (65504): finite only if wo runs in float32, as in transformers.
    source = tmp_path / "hot"
    shutil.copytree(hf_checkpoint("t5-v1_1"), source)
    weights = load_file(source / "model.safetensors")
    for name in weights:
        if name.endswith("DenseReluDense.wo.weight"):
            weights[name] = weights[name] * 1e5
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    convert.convert(str(source), mlx_path=str(tmp_path / "fp16"), dtype="float16")
    model, _, _ = load_model(tmp_path / "fp16")
    assert model.encoder.layers[0].mlp.wo.weight.dtype == mx.float32
    assert model.encoder.layers[0].mlp.wi_01.weight.dtype == mx.float16
    input_ids, mask, decoder_ids = (to_mx(t) for t in padded_batch(model.args.vocab_size))
    encoder_output = model.encode(input_ids, mask)
    assert float(mx.abs(encoder_output).max()) > 0  # normalised, so finite and non-trivial
    logits = model(input_ids, decoder_ids, mask)
    assert bool(mx.all(mx.isfinite(logits)))
