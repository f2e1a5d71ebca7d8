"""The MLX T5 against transformers' T5ForConditionalGeneration on the same random weights."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import VARIANTS
from transformers import AutoModelForSeq2SeqLM
from transformers.models.t5.modeling_t5 import T5Attention

import convert
import kernels
from cache import KVCache
from loader import load_model
from model import relative_position_bucket
from native_layers import FusedLinear

TOLERANCE = 1e-4  # max abs difference, float32


def padded_batch(vocab_size, seed=0):
    """Three prompts of lengths 13, 9 and 4, right-padded, plus decoder inputs starting at the start id."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (3, 13), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, length in enumerate([13, 9, 4]):
        input_ids[row, length:] = 0
        mask[row, length:] = 0
        input_ids[row, length - 1] = 1  # EOS closes each prompt
    decoder_ids = torch.randint(3, vocab_size, (3, 10), generator=generator)
    decoder_ids[:, 0] = 0
    return input_ids, mask, decoder_ids


def to_mx(tensor):
    return mx.array(tensor.numpy())


def max_abs_diff(ours, reference):
    return float(np.abs(np.array(ours, dtype=np.float32) - reference.float().numpy()).max())


def greedy(model, input_ids, mask, steps):
    """Greedy decoding with the cache: `steps` tokens per row, after the decoder start id."""
    cross_kv = model.cross_kv(model.encode(input_ids, mask))
    cache = model.make_cache()
    tokens = mx.full((input_ids.shape[0], 1), model.args.decoder_start_token_id, dtype=mx.int32)
    generated = []
    for _ in range(steps):
        logits = model.decode(tokens, cross_kv, cache, mask)
        tokens = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        generated.append(tokens)
    return np.array(mx.concatenate(generated, axis=1))


def until_eos(row, eos_id):
    row = list(row)
    return row[: row.index(eos_id) + 1] if eos_id in row else row


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 20), (64, 256), (8, 16)])
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    # Exhaustive over every distance that can reach a bucket below the cap, on both sides.
    positions = torch.arange(-3 * max_distance, 3 * max_distance)
    reference = T5Attention._relative_position_bucket(positions, bidirectional, num_buckets, max_distance)
    ours = relative_position_bucket(positions.numpy(), bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, reference.numpy())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_and_logits_match_transformers(variant, hf_checkpoint, converted, hf_model):
    reference = hf_model(hf_checkpoint(variant))
    model, _, _ = load_model(converted(variant))
    if not VARIANTS[variant]["tie_word_embeddings"]:
        # The reference really is untied (transformers 5 ties T5 heads unless the checkpoint says otherwise).
        assert not torch.equal(reference.lm_head.weight, reference.shared.weight)

    input_ids, mask, decoder_ids = padded_batch(model.args.vocab_size)
    with torch.no_grad():
        expected_encoder = reference.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        expected_logits = reference(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits

    encoder_output = model.encode(to_mx(input_ids), to_mx(mask))
    logits = model(to_mx(input_ids), to_mx(decoder_ids), to_mx(mask))
    # Padding positions of the encoder output are never attended to; compare the real tokens.
    valid = mask.bool().numpy()
    encoder_diff = np.abs(np.array(encoder_output) - expected_encoder.numpy())[valid].max()
    logits_diff = max_abs_diff(logits, expected_logits)
    print(f"{variant}: encoder max diff {encoder_diff:.2e}, logits max diff {logits_diff:.2e}")
    assert encoder_diff < TOLERANCE
    assert logits_diff < TOLERANCE
    assert float(np.abs(np.array(logits)).max()) > 10 * TOLERANCE  # not trivially small


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(variant, hf_checkpoint, converted, hf_model):
    reference = hf_model(hf_checkpoint(variant))
    model, _, _ = load_model(converted(variant))
    input_ids, mask, _ = padded_batch(model.args.vocab_size, seed=1)
    with torch.no_grad():
        expected = reference.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=32,
            do_sample=False,
            num_beams=1,
            # transformers 5 sizes its cache by the encoder depth and fails for a deeper decoder; without it the
            # reference recomputes every step, which is also independent of any cache logic.
            use_cache=False,
        )
    ours = greedy(model, to_mx(input_ids), to_mx(mask), steps=32)
    eos = model.args.eos_token_id
    lengths = []
    for row in range(input_ids.shape[0]):
        # transformers pads a row after its EOS; compare up to and including the EOS.
        expected_row = until_eos(expected[row, 1:].tolist(), eos)
        assert until_eos(ours[row], eos) == expected_row
        lengths.append(len(expected_row))
    assert max(lengths) == 32  # at least one row ran the full length


@pytest.mark.parametrize("variant", ["t5", "t5-v1_1", "t5-3b-shape"])
def test_cached_decoding_equals_full_forward(variant, converted, monkeypatch):
    monkeypatch.setattr(KVCache, "step", 4)  # force several cache reallocations
    model, _, _ = load_model(converted(variant))
    input_ids, mask, _ = padded_batch(model.args.vocab_size, seed=2)
    input_ids, mask = to_mx(input_ids), to_mx(mask)
    decoder_ids = mx.array(np.random.default_rng(0).integers(3, model.args.vocab_size, (3, 23)))
    full = model(input_ids, decoder_ids, mask)
    cross_kv = model.cross_kv(model.encode(input_ids, mask))

    # One token at a time, then in uneven chunks (as speculative verification feeds them).
    for chunks in ([1] * 23, [3, 1, 5, 2, 6, 6]):
        cache = model.make_cache()
        start, pieces = 0, []
        for size in chunks:
            pieces.append(model.decode(decoder_ids[:, start : start + size], cross_kv, cache, mask))
            start += size
        assert cache[0].offset == 23
        np.testing.assert_allclose(np.array(mx.concatenate(pieces, axis=1)), np.array(full), atol=1e-5)


@pytest.mark.parametrize("rewind", [1, 3, 5])
def test_rewind_and_refeed_gives_identical_logits(rewind, converted, monkeypatch):
    monkeypatch.setattr(KVCache, "step", 8)
    model, _, _ = load_model(converted("t5-v1_1"))
    input_ids, mask, _ = padded_batch(model.args.vocab_size, seed=3)
    input_ids, mask = to_mx(input_ids), to_mx(mask)
    cross_kv = model.cross_kv(model.encode(input_ids, mask))
    rng = np.random.default_rng(rewind)
    prefix = mx.array(rng.integers(3, model.args.vocab_size, (3, 10)))
    tail = mx.array(rng.integers(3, model.args.vocab_size, (3, 6)))

    cache = model.make_cache()
    model.decode(prefix, cross_kv, cache, mask)
    model.decode(tail[:, :-rewind], cross_kv, cache, mask)
    first = model.decode(tail[:, -rewind:], cross_kv, cache, mask)
    # Overwrite the last `rewind` positions with other tokens, rewind again, then re-feed the originals.
    for layer_cache in cache:
        assert layer_cache.trim(rewind) == rewind
    model.decode(mx.array(rng.integers(3, model.args.vocab_size, (3, rewind))), cross_kv, cache, mask)
    for layer_cache in cache:
        layer_cache.trim(rewind)
    again = model.decode(tail[:, -rewind:], cross_kv, cache, mask)
    assert cache[0].offset == 16
    # The same computation on the same cache contents: bit-identical.
    np.testing.assert_array_equal(np.array(again), np.array(first))


def test_cache_grows_to_twice_its_capacity_and_keeps_what_it_holds():
    cache = KVCache()
    pieces = [mx.random.normal((1, 2, n, 4)) for n in (20, 15, 40)]
    capacities = []
    for piece in pieces:
        keys, values = cache.update_and_fetch(piece, -piece)
        capacities.append(cache.keys.shape[2])
    # 20 positions: one step (32); 35: the next multiple of 32 is 64 = twice 32; 75: twice 64 beats 96.
    assert capacities == [KVCache.step, 2 * KVCache.step, 4 * KVCache.step] == [32, 64, 128]
    whole = mx.concatenate(pieces, axis=2)
    assert mx.array_equal(keys, whole).item() and mx.array_equal(values, -whole).item()


def test_a_cache_of_wide_layers_takes_fewer_positions_at_first():
    # 64 heads of 64 float32: 32 KB of keys and values a position, so that 1 MB holds 32 positions, 0.5 MB 16, and
    # less than a position's bytes one position (3 positions then for 3 new ones).
    piece = mx.zeros((1, 64, 3, 64))
    for step_bytes, capacity in [(1 << 20, 32), (1 << 19, 16), (1000, 3)]:
        cache = KVCache()
        cache.step_bytes = step_bytes
        cache.update_and_fetch(piece, piece)
        assert cache.keys.shape[2] == capacity


def test_rows_that_leave_and_join_a_cache_are_its_rows_in_their_new_order():
    cache = KVCache(3)
    keys = mx.random.normal((3, 2, 4, 4))
    cache.update_and_fetch(keys, -keys)
    cache.keep_rows([2, 0])
    cache.add_rows(1)
    cache.keep_rows([2, 0])  # the new row first, then the old row 2
    assert cache.offsets == [0, 4] and cache.rows == [-1, 2]
    fetched, values = cache.update_and_fetch(mx.ones((2, 2, 1, 4)), mx.ones((2, 2, 1, 4)))
    assert cache.rows is None and cache.offsets == [1, 5]
    expected = np.zeros((2, 2, 5, 4), np.float32)
    expected[1, :, :4] = np.array(keys[2])
    expected[0, :, 0] = expected[1, :, 4] = 1.0
    np.testing.assert_array_equal(np.array(fetched), expected)
    assert np.array(values)[1, :, :4].tolist() == (-np.array(keys[2])).tolist()


def test_trim_is_bounded_by_offset():
    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 2, 5, 4)), mx.zeros((1, 2, 5, 4)))
    assert cache.trim(9) == 5
    assert cache.offset == 0


@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])
def test_decoding_layout_gives_the_same_logits(variant, converted):
    plain, _, _ = load_model(converted(variant), decoding_layout=False)
    fused, _, _ = load_model(converted(variant), decoding_layout=True)
    layer = fused.decoder.layers[0]
    assert isinstance(layer.self_attn.qkv, FusedLinear) and "q" not in layer.self_attn
    assert isinstance(layer.mlp.wi_01 if plain.args.is_gated else layer.mlp.wi, FusedLinear)
    assert isinstance(fused.lm_head, FusedLinear)
    input_ids, mask, decoder_ids = (to_mx(t) for t in padded_batch(plain.args.vocab_size))
    np.testing.assert_allclose(
        np.array(fused(input_ids, decoder_ids, mask)), np.array(plain(input_ids, decoder_ids, mask)), atol=1e-5
    )


@pytest.mark.parametrize("table_bytes", [0, None])  # the bias computed per step, or gathered from the table
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rows_at_their_own_lengths_match_transformers(
    variant, table_bytes, hf_checkpoint, converted, hf_model, monkeypatch
):
    # Each step feeds every row the same number of tokens, right-padded with junk, and each row keeps its own number
    # of them (as speculative verification does), so rows drift apart, rewind over real tokens and finish early.
    import model as model_module

    monkeypatch.setattr(KVCache, "step", 8)  # reallocations while rows are at different lengths
    if table_bytes is not None:
        monkeypatch.setattr(model_module, "BIAS_TABLE_BYTES", table_bytes)
    reference = hf_model(hf_checkpoint(variant))
    model, _, _ = load_model(converted(variant))
    input_ids, mask, _ = padded_batch(model.args.vocab_size, seed=4)
    rng = np.random.default_rng(0)
    sequences = [[0, *rng.integers(3, model.args.vocab_size, length - 1).tolist()] for length in (21, 6, 14)]
    cross_kv = model.cross_kv(model.encode(to_mx(input_ids), to_mx(mask)))
    cache = model.make_cache(3)
    positions, logits = [0, 0, 0], [[], [], []]
    while any(position < len(row) for position, row in zip(positions, sequences)):
        length = int(rng.integers(1, 5))
        feed = [row[position : position + length] for position, row in zip(positions, sequences)]
        feed = [chunk + rng.integers(3, model.args.vocab_size, length - len(chunk)).tolist() for chunk in feed]
        kept = [int(rng.integers(0, length + 1)) for _ in sequences]
        kept = [min(k, len(row) - position) for k, row, position in zip(kept, sequences, positions)]
        step_logits = model.decode(mx.array(feed), cross_kv, cache, to_mx(mask))
        for layer_cache in cache:
            layer_cache.trim_rows([length - k for k in kept])
        for row, k in enumerate(kept):
            logits[row].extend(np.array(step_logits[row, :k]))
            positions[row] += k
        assert cache[0].offsets == positions
    table, _ = model.decoder._bias_table
    assert (table is None) == (table_bytes == 0)

    for row, sequence in enumerate(sequences):
        prompt = input_ids[row : row + 1, : int(mask[row].sum())]
        with torch.no_grad():
            expected = reference(input_ids=prompt, decoder_input_ids=torch.tensor([sequence])).logits[0]
        assert max_abs_diff(np.stack(logits[row]), expected) < TOLERANCE


def test_dropped_rows_leave_the_others_unchanged(converted):
    model, _, _ = load_model(converted("t5"))
    input_ids, mask, decoder_ids = (to_mx(t) for t in padded_batch(model.args.vocab_size, seed=5))
    full = model(input_ids, decoder_ids, mask)
    cross_kv = model.cross_kv(model.encode(input_ids, mask))
    cache = model.make_cache(3)
    first = model.decode(decoder_ids[:, :4], cross_kv, cache, mask)
    for layer_cache in cache:
        layer_cache.trim_rows([0, 2, 0])
        layer_cache.keep_rows([2, 1])
    kept = mx.array([2, 1])
    cross_kv = [(keys[kept], values[kept]) for keys, values in cross_kv]
    rest = model.decode(decoder_ids[kept, 4:], cross_kv, cache, mask[kept])
    assert cache[0].offsets == [10, 8]
    np.testing.assert_allclose(np.array(first), np.array(full[:, :4]), atol=1e-5)
    np.testing.assert_allclose(np.array(rest[0]), np.array(full[2, 4:]), atol=1e-5)


@pytest.mark.parametrize("table_bytes", [0, None])  # the bias computed per step, or sliced from the growing table
def test_step_by_step_logits_match_transformers_as_the_bias_table_grows(
    table_bytes, hf_checkpoint, converted, monkeypatch
):
    import model as model_module

    monkeypatch.setattr(model_module, "BIAS_TABLE_STEP", 4)  # the table grows every 4 positions
    if table_bytes is not None:
        monkeypatch.setattr(model_module, "BIAS_TABLE_BYTES", table_bytes)
    reference = AutoModelForSeq2SeqLM.from_pretrained(hf_checkpoint("t5-3b-shape")).eval()
    model, _, _ = load_model(converted("t5-3b-shape"))
    input_ids = torch.randint(3, model.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    decoder_ids = torch.randint(3, model.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))
    cross_kv = model.cross_kv(model.encode(to_mx(input_ids)))
    for replaced in (False, True):
        if replaced:  # new position-bias weights, here and in the reference: the table follows them
            weight = torch.randn(reference.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape)
            reference.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.data = weight
            model.decoder.relative_attention_bias.weight = mx.array(weight.numpy())
        with torch.no_grad():
            expected = reference(input_ids=input_ids, decoder_input_ids=decoder_ids).logits
        cache, start, pieces = model.make_cache(), 0, []
        for size in [1, 1, 5, 2, 1, 6, 1, 1, 3, 9]:  # as regular steps and verifications feed them
            pieces.append(model.decode(to_mx(decoder_ids[:, start : start + size]), cross_kv, cache))
            start += size
        assert max_abs_diff(mx.concatenate(pieces, axis=1), expected) < TOLERANCE
    table, _ = model.decoder._bias_table
    assert (table is None) == (table_bytes == 0) and (table is None or table.shape[-1] == 32)


@pytest.mark.parametrize("variant", ["t5-v1_1", "t5"])
def test_a_bfloat16_checkpoint_keeps_its_linear_weights_in_bfloat16(bf16_checkpoint, tmp_path, variant):
    """A bfloat16 checkpoint converted to float32: its linear layers and token embeddings stay bfloat16 (bit for bit),
    everything else is float32, and the model computes what transformers computes from the same checkpoint in float32,
    greedy drafting included (a tied head reads the bfloat16 table); with keep_bfloat16=False every weight is float32
    and the logits are the same."""
    source = bf16_checkpoint(variant)
    kept = convert.convert(str(source), mlx_path=str(tmp_path / "kept"))
    widened = convert.convert(str(source), mlx_path=str(tmp_path / "widened"), keep_bfloat16=False)
    settings = json.loads((kept / "config.json").read_text())["mlx"]
    assert settings["linear_dtype"] == settings["embedding_dtype"] == "bfloat16"
    assert not {"linear_dtype", "embedding_dtype"} & set(json.loads((widened / "config.json").read_text())["mlx"])
    stored = mx.load(str(kept / "model.safetensors"))
    linear = [name for name, w in stored.items() if w.ndim == 2 and (".layers." in name or name == "lm_head.weight")]
    assert ("lm_head.weight" in linear) == (variant == "t5-v1_1") and len(linear) > 10
    kept_names = {*linear, "shared.weight"}
    assert all(w.dtype == (mx.bfloat16 if name in kept_names else mx.float32) for name, w in stored.items())
    assert all(w.dtype == mx.float32 for w in mx.load(str(widened / "model.safetensors")).values())

    reference = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=torch.float32).eval()
    input_ids, mask, decoder_ids = padded_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    logits, models = {}, {}
    for path in (kept, widened):
        models[path], _, _ = load_model(path)
        logits[path] = models[path](to_mx(input_ids), to_mx(decoder_ids), to_mx(mask))
        assert max_abs_diff(logits[path], expected) < TOLERANCE
    assert float(mx.abs(logits[kept] - logits[widened]).max()) < 1e-5

    # Greedy drafting from the bfloat16 table: the tokens of the float32 table, natively where the layers are native.
    drafts = {}
    for path, model in models.items():
        cross_kv = model.cross_kv(model.encode(to_mx(input_ids[:1])))
        drafts[path] = model.greedy_draft(mx.array([[0]]), cross_kv, model.make_cache(), 5)
    assert (drafts[kept] is None) == (drafts[widened] is None) == (kernels.native is None)
    if kernels.native is not None:
        assert drafts[kept].tolist() == drafts[widened].tolist()


@pytest.mark.parametrize("variant", ["t5-v1_1", "t5"])
def test_4_bit_weights_get_bfloat16_scales_and_biases(hf_checkpoint, tmp_path, variant):
    """Quantized to 4 bits, a float32 model's linear layers get bfloat16 scales and biases (the token embeddings'
    stay float32: a row looked up is dequantized in its scales' dtype); q_scales_dtype="float32", or 8 bits, gives
    float32 ones. The codes are the same, the scales and biases float32's rounded to bfloat16, and the logits as close
    to transformers' as with float32 scales and biases."""
    source = hf_checkpoint(variant)
    options = dict(quantize=True, q_bits=4, q_group_size=32)
    small = convert.convert(str(source), mlx_path=str(tmp_path / "small"), **options)
    wide = convert.convert(str(source), mlx_path=str(tmp_path / "wide"), q_scales_dtype="float32", **options)
    eight = convert.convert(str(source), mlx_path=str(tmp_path / "8-bit"), **{**options, "q_bits": 8})
    for path, expected in ((small, "bfloat16"), (wide, "float32"), (eight, "float32")):
        assert json.loads((path / "config.json").read_text())["mlx"]["quantization"]["scales_dtype"] == expected
    assert all(w.dtype in (mx.float32, mx.uint32) for w in mx.load(str(eight / "model.safetensors")).values())
    held, widened = mx.load(str(small / "model.safetensors")), mx.load(str(wide / "model.safetensors"))
    assert held.keys() == widened.keys()
    parameters = [name for name in held if name.endswith((".scales", ".biases"))]
    assert ("lm_head.scales" in parameters) == (variant == "t5-v1_1") and len(parameters) > 20
    for name in parameters:
        expected = mx.float32 if name.startswith("shared.") else mx.bfloat16
        assert held[name].dtype == expected and widened[name].dtype == mx.float32, name
        assert mx.array_equal(held[name], widened[name].astype(expected)), name
    for name in held:
        if held[name].dtype == mx.uint32:
            assert mx.array_equal(held[name], widened[name]), name

    reference = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=torch.float32).eval()
    input_ids, mask, decoder_ids = padded_batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    errors = {}
    for path in (small, wide):
        model, _, _ = load_model(path)
        errors[path] = max_abs_diff(model(to_mx(input_ids), to_mx(decoder_ids), to_mx(mask)), expected)
    assert 0 < errors[small] < 1.5 * errors[wide]
