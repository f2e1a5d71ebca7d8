"""The sampling math of speculative decoding: the distribution, the draw, the acceptance rule and the residual."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

KEYS_PER_LINK = 8  # position_keys: keys split at once from each link of a chain of splits


def probabilities(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The distribution the decoder samples from: (..., vocab) logits -> probabilities.

    Temperature 0 is greedy: one-hot at the argmax. Otherwise temperature, then top-k, then top-p (nucleus: the
    smallest set of most likely tokens whose probability reaches top_p), as transformers applies them.
    """
    logits = logits.astype(mx.float32)
    if temperature == 0:
        return (mx.arange(logits.shape[-1]) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = mx.sort(logits, axis=-1)[..., -top_k, None]
        logits = mx.where(logits < kth_largest, -mx.inf, logits)
    probs = mx.softmax(logits, axis=-1)
    if top_p < 1.0:
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        # Keep a token when the tokens more likely than it have not yet reached top_p.
        keep_sorted = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        probs = mx.where(keep, probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs, key, greedy=False):
    """One token per row of (..., vocab) probabilities; `greedy` when they are one-hot (argmax is the same draw)."""
    if greedy:
        return mx.argmax(probs, axis=-1)
    return mx.random.categorical(mx.log(probs), axis=-1, key=key)


def accept_drafts(p, q, uniform, delta: float):
    """The acceptance rule: a draft token x is accepted when u - delta <= p(x) / q(x).

    p, q: (k,) probabilities of the k draft tokens under the main and the draft distributions the decoder samples
    from; uniform: (k,) draws u from (0, 1]. Returns a (k,) boolean array. With delta = 0 this is speculative
    sampling (Leviathan et al. 2023); with one-hot (greedy) distributions it accepts exactly the drafts the main model
    would have chosen, and delta is the chance of keeping any other.
    """
    # u in (0, 1] so that p = 0 is never accepted at delta = 0; q > 0 for a token the draft sampled.
    return uniform - delta <= p / q


def residual(main_probs, draft_probs):
    """Where to sample after a rejection: norm(max(0, p - q)), or p itself where that is empty or q is 0 (a padded
    position, where a row drafted nothing: p exactly, as after the row's own last draft)."""
    leftover = mx.maximum(main_probs - draft_probs, 0.0)
    total = leftover.sum(axis=-1, keepdims=True)
    drafted = draft_probs.max(axis=-1, keepdims=True) > 0
    return mx.where((total > 0) & drafted, leftover / mx.maximum(total, 1e-30), main_probs)


def position_keys(key, count):
    """(count, 2) random keys, one per token position: the i-th depends on `key` and i alone (the i-th of
    mx.random.split(key, count) depends on count too), so a row draws the same however far its drafts are padded."""
    blocks = []
    for _ in range(-(-count // KEYS_PER_LINK)):
        key, block = mx.random.split(key)
        blocks.append(mx.random.split(block, KEYS_PER_LINK))
    return mx.concatenate(blocks)[:count] if blocks else mx.zeros((0, 2), dtype=mx.uint32)


def uniforms(key, count):
    """(count,) draws from (0, 1], one per position, each with its position's key."""
    if count == 0:
        return mx.zeros((0,))  # (vmap over no keys at all fails)
    return 1.0 - mx.vmap(lambda position_key: mx.random.uniform(key=position_key))(position_keys(key, count))


def pad_vocab(probs, size):
    """(..., vocab) probabilities widened with zeros to (..., size)."""
    if probs.shape[-1] == size:
        return probs
    return mx.concatenate([probs, mx.zeros((*probs.shape[:-1], size - probs.shape[-1]))], axis=-1)


def one_hot(tokens, size):
    """(k,) tokens -> (k, size) distributions certain of each: the q of a deterministic draft."""
    return (mx.arange(size) == tokens[:, None]).astype(mx.float32)


@dataclass(frozen=True)
class Sampler:
    """How tokens are drawn from logits (temperature 0 is greedy), and the verification of drafts under that rule."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def distribution(self, logits):
        return probabilities(logits, self.temperature, self.top_k, self.top_p)

    def sample(self, probs, key):
        return sample(probs, key, greedy=self.greedy)

    def next_token(self, logits, key):
        """A token drawn from (..., vocab) logits; greedy: their argmax, the one-hot distribution's token, directly."""
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        return self.sample(self.distribution(logits), key)

    def judge(self, logits, drafts, draft_probs: Optional[mx.array], delta: float, accept_key, extra_key):
        """Which drafts the main model accepts, and the token it adds after each number accepted.

        logits: (k + 1, vocab) main-model logits at the k draft positions and after the last; drafts: (k,) tokens;
        draft_probs: (k, vocab') the distributions they were drawn from, or None for a deterministic draft (q one-hot
        at each token: acceptance min(1, p(x)), residual norm(max(0, p - q))). Returns (accepted (k,) booleans,
        extra (k + 1,) tokens): extra[i] follows i accepted drafts, a correction for i < k and a bonus for i = k.
        """
        # Each draw takes its position's key: a row's tokens do not depend on how far a batch pads its drafts.
        if self.greedy:
            return self.judge_choices(mx.argmax(logits, axis=-1), drafts, delta, accept_key)
        uniform = uniforms(accept_key, drafts.shape[0])
        main_probs = self.distribution(logits)
        if drafts.size == 0:
            return mx.zeros((0,), dtype=mx.bool_), self.sample_each(main_probs, extra_key)
        # A draft model's vocabulary may be wider than the main model's; deterministic drafts are tokenizer ids.
        width = max(main_probs.shape[-1], 0 if draft_probs is None else draft_probs.shape[-1])
        main_probs = pad_vocab(main_probs, width)
        draft_probs = one_hot(drafts, width) if draft_probs is None else pad_vocab(draft_probs, width)
        p = mx.take_along_axis(main_probs[:-1], drafts[:, None], axis=-1)[:, 0]
        q = mx.take_along_axis(draft_probs, drafts[:, None], axis=-1)[:, 0]
        fallback = mx.concatenate([residual(main_probs[:-1], draft_probs), main_probs[-1:]])
        return accept_drafts(p, q, uniform, delta), self.sample_each(fallback, extra_key)

    def judge_choices(self, choices, drafts, delta: float, accept_key):
        """judge for greedy decoding, from the main model's choices (k + 1,) (the argmax of its logits at each
        position): (accepted (k,), extra (k + 1,) = choices)."""
        # One-hot distributions: p(x) / q(x) is 1 where the main model's argmax is the draft, else 0 (at delta 0,
        # whatever u is drawn); the residual after a rejection is one-hot at the main model's argmax.
        matches = choices[:-1] == drafts
        if delta == 0:
            return matches, choices
        uniform = uniforms(accept_key, drafts.shape[0])
        return accept_drafts(matches.astype(mx.float32), 1.0, uniform, delta), choices

    def sample_each(self, probs, key):
        """A token from each row of (n, vocab) probabilities, row i drawn with position i's key."""
        return mx.vmap(self.sample)(probs, position_keys(key, probs.shape[0]))
