"""One rank of the distributed tests: load each model sharded over the launch's ranks, decode, and (rank 0) save.

python -m tests.distributed_worker OUT MAIN_DIR DRAFT_DIR [MAIN_DIR DRAFT_DIR ...], run on every rank; writes
OUT/<i>.npz for the i-th pair: the full-forward logits, the greedy tokens (regular and speculative), sampled tokens,
a batch's tokens, the number of ranks and the heads each rank holds.
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from decoder import SpeculativeDecoder
from loader import load_model

PROMPT = "def f(x): return x"
MAX_TOKENS = 12
BATCH = [PROMPT, "x = [i * i for i in range(10)]", "import os"]


def outputs(model, tokenizer, draft_model, draft_tokenizer):
    """Logits of one full forward pass, the greedy tokens (regular and speculative) and speculatively sampled tokens
    (temperature 1, a fixed seed) for PROMPT, and speculative greedy tokens for a batch of prompts."""
    input_ids = mx.array(tokenizer(PROMPT).input_ids)[None]
    decoder_ids = mx.array([[model.args.decoder_start_token_id, 5, 17, 9, 3]])
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, draft_tokenizer=draft_tokenizer, num_draft=3)
    sampler = SpeculativeDecoder(
        model, draft_model, tokenizer, draft_tokenizer=draft_tokenizer, temperature=1.0, seed=3
    )
    return dict(
        logits=np.array(model(input_ids, decoder_ids).astype(mx.float32)),
        regular=np.array(decoder.generate(PROMPT, MAX_TOKENS, regular=True, ignore_eos=True).tokens),
        speculative=np.array(decoder.generate(PROMPT, MAX_TOKENS, ignore_eos=True).tokens),
        sampled=np.array(sampler.generate(PROMPT, MAX_TOKENS, ignore_eos=True).tokens),
        batched=np.array([g.tokens for g in decoder.generate_batch(BATCH, MAX_TOKENS, ignore_eos=True)]),
    )


def main():
    group = mx.distributed.init()
    out, pairs = Path(sys.argv[1]), sys.argv[2:]
    for i in range(0, len(pairs), 2):
        model, tokenizer, _ = load_model(pairs[i], group=group)
        draft_model, draft_tokenizer, _ = load_model(pairs[i + 1])  # the draft stays whole on every rank
        result = outputs(model, tokenizer, draft_model, draft_tokenizer)
        if group.rank() == 0:
            heads = model.encoder.layers[0].self_attn.num_heads
            np.savez(out / f"{i // 2}.npz", ranks=group.size(), heads=heads, **result)


if __name__ == "__main__":
    main()
