"""Long prompts: the encoder's self-attention in blocks of query rows against transformers, and the memory estimate
that refuses a prompt too long for the machine before anything is allocated."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import model as model_module
from loader import load_model

TOLERANCE = 1e-4  # max abs difference, float32
LENGTH = 2048


def long_batch(vocab_size):
    """Two prompts of 2,048 and 1,500 tokens (the second right-padded), and eight decoder inputs each."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (2, LENGTH), generator=generator)
    mask = torch.ones_like(input_ids)
    input_ids[1, 1500:] = 0
    mask[1, 1500:] = 0
    decoder_ids = torch.randint(3, vocab_size, (2, 8), generator=generator)
    decoder_ids[:, 0] = 0
    return input_ids, mask, decoder_ids


# One block of all the rows (its bias shared by all layers), or seven blocks of 300 rows, the last one shorter.
@pytest.mark.parametrize("block_rows", [LENGTH, 300])
@pytest.mark.parametrize("variant", ["t5-v1_1", "t5-3b-shape"])
def test_long_prompt_matches_transformers(variant, block_rows, hf_checkpoint, converted, hf_model, monkeypatch):
    reference = hf_model(hf_checkpoint(variant))
    model, _, _ = load_model(converted(variant))
    heads = model.args.num_heads
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK_BYTES", block_rows * 2 * heads * LENGTH * 4)
    assert model.encoder.block_rows(2, LENGTH) == block_rows

    input_ids, mask, decoder_ids = long_batch(model.args.vocab_size)
    with torch.no_grad():
        expected_encoder = reference.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        expected_logits = reference(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits

    ids, attention_mask = mx.array(input_ids.numpy()), mx.array(mask.numpy())
    encoder_output = model.encode(ids, attention_mask)
    logits = model(ids, mx.array(decoder_ids.numpy()), attention_mask)
    valid = mask.bool().numpy()
    encoder_diff = np.abs(np.array(encoder_output) - expected_encoder.numpy())[valid].max()
    logits_diff = np.abs(np.array(logits) - expected_logits.numpy()).max()
    print(f"{variant}, {block_rows} rows a block: encoder max diff {encoder_diff:.2e}, logits {logits_diff:.2e}")
    assert encoder_diff < TOLERANCE
    assert logits_diff < TOLERANCE
    assert float(np.abs(np.array(logits)).max()) > 10 * TOLERANCE  # not trivially small
