"""Drafters: what proposes the tokens the main model verifies.

A drafter holds the drafting state of one sequence behind three calls: `prepare(prompt_ids)` once per prompt,
`propose(sequence, k, key)` for up to k tokens following the accepted `sequence`, and `rewind(length)` once the
decoder has settled the sequence's first `length` tokens (anything drafted past them is forgotten).
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx

from sampling import Sampler


@dataclass
class Draft:
    tokens: mx.array  # (k,) int32, k <= the number asked for
    probs: Optional[mx.array] = None  # (k, vocab) the distributions they were drawn from; None: deterministic (one-hot)
    source: str = "model"

    def __len__(self):
        return self.tokens.shape[0]


def no_draft() -> Draft:
    return Draft(mx.zeros((0,), dtype=mx.int32))


class ModelDrafter:
    """A small T5 with the main model's vocabulary, decoding autoregressively with its own cache."""

    def __init__(self, model, sampler: Sampler):
        self.model = model
        self.sampler = sampler

    def prepare(self, prompt_ids):
        """prompt_ids: (1, L). Encodes the prompt once; its cross-attention keys/values serve every step."""
        self.cross_kv = self.model.cross_kv(self.model.encode(prompt_ids))
        mx.eval(self.cross_kv)
        self.cache = self.model.make_cache()

    def propose(self, sequence: List[int], k: int, key) -> Draft:
        if k == 0:
            return no_draft()
        # The cache holds a prefix of the sequence; feed the rest. Each token starts computing as soon as its step is
        # built, so building the next step (and the verification) overlaps it; nothing waits for the drafts.
        draft_input = mx.array([sequence[self.cache[0].offset :]])
        tokens, probs = [], []
        for step_key in mx.random.split(key, k):
            logits = self.model.decode(draft_input, self.cross_kv, self.cache)[0, -1]
            if self.sampler.greedy:
                token = mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
            else:
                probs.append(self.sampler.distribution(logits))
                token = self.sampler.sample(probs[-1], step_key)[None].astype(mx.int32)
            mx.async_eval(token)
            tokens.append(token)
            draft_input = token.reshape(1, 1)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None, "model")

    def rewind(self, length: int):
        # Keep at most length - 1 tokens: the sequence's last token is fed at the next proposal.
        for layer_cache in self.cache:
            layer_cache.trim(max(0, layer_cache.offset - (length - 1)))
