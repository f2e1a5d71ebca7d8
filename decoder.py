"""Regular and speculative decoding for MLX T5 models.

One step of speculative decoding: the draft model proposes `num_draft` tokens autoregressively, the main model scores
the last accepted token and all drafts in one forward pass, a prefix of the drafts is accepted, and the main model adds
one token of its own (the correction after a rejection, or a bonus token when every draft was accepted).
"""

import backend  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional

import mlx.core as mx


class IncompatibleDraftError(ValueError):
    """The draft and main models do not share a vocabulary."""


@dataclass
class Stats:
    generated: int = 0
    main_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    encode_seconds: float = 0.0  # the prompt through both encoders, and the cross-attention keys/values
    seconds: float = 0.0  # prompt in to last token out

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per main-model call."""
        return self.accepted / self.main_calls if self.main_calls else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted": self.mean_accepted,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class Generation:
    text: str
    tokens: List[int]
    stats: Stats = field(default_factory=Stats)


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
    """Where to sample after a rejection: norm(max(0, p - q)), or p itself where that is empty."""
    leftover = mx.maximum(main_probs - draft_probs, 0.0)
    total = leftover.sum(axis=-1, keepdims=True)
    return mx.where(total > 0, leftover / mx.maximum(total, 1e-30), main_probs)


def pad_vocab(probs, size):
    if probs.shape[-1] == size:
        return probs
    return mx.concatenate([probs, mx.zeros((*probs.shape[:-1], size - probs.shape[-1]))], axis=-1)


class SpeculativeDecoder:
    """Decode with `model`, optionally sped up by `draft_model`; the output follows `model` alone.

    temperature 0 is greedy decoding, and then delta = 0 reproduces the main model's greedy output token for token;
    with temperature > 0 and delta = 0 the output is distributed exactly as sampling from the main model.
    """

    def __init__(
        self,
        model,
        draft_model,
        tokenizer,
        num_draft: int = 5,
        delta: float = 0.0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        draft_tokenizer=None,
    ):
        if num_draft < 1:
            raise ValueError(f"num_draft must be at least 1, got {num_draft}")
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1], got {delta}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.model = model
        self.draft_model = draft_model
        self.tokenizer = tokenizer
        self.num_draft = num_draft
        self.delta = delta
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        if draft_model is not None:
            check_vocabularies(model, draft_model, tokenizer, draft_tokenizer)

    def distribution(self, logits):
        return probabilities(logits, self.temperature, self.top_k, self.top_p)

    def sample(self, probs, key):
        return sample(probs, key, greedy=self.temperature == 0)

    def generate(
        self,
        prompt: str,
        max_tokens: int = 100,
        regular: bool = False,
        ignore_eos: bool = False,
        stream: Optional[Callable[[str], None]] = None,
    ) -> Generation:
        """Decode `prompt`; `stream` receives text as it is produced. regular=True uses the main model alone."""
        if regular is False and self.draft_model is None:
            raise ValueError("speculative decoding needs a draft model; pass regular=True to decode without one")
        stats = Stats()
        tokens: List[int] = []
        text = ""
        start = time.perf_counter()
        prompt_ids = mx.array(self.tokenizer(prompt).input_ids)[None]
        steps = self.regular_tokens if regular else self.speculative_tokens
        for new_tokens in steps(prompt_ids, max_tokens, ignore_eos, stats):
            tokens.extend(new_tokens)
            # Decode the whole prefix so that SentencePiece spacing comes out right; emit what is new.
            decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if stream is not None and decoded.startswith(text) and len(decoded) > len(text):
                stream(decoded[len(text) :])
            text = decoded
        stats.generated = len(tokens)
        stats.seconds = time.perf_counter() - start
        return Generation(text=text, tokens=tokens, stats=stats)

    def prepare(self, model, prompt_ids):
        """Cross-attention keys/values for the prompt, and an empty self-attention cache."""
        cross_kv = model.cross_kv(model.encode(prompt_ids))
        mx.eval(cross_kv)
        return cross_kv, model.make_cache()

    def regular_tokens(self, prompt_ids, max_tokens, ignore_eos, stats) -> Iterator[List[int]]:
        """The main model alone, one token per forward pass."""
        key = mx.random.key(self.seed)
        tick = time.perf_counter()
        cross_kv, cache = self.prepare(self.model, prompt_ids)
        stats.encode_seconds += time.perf_counter() - tick

        def step(token, key):
            logits = self.model.decode(token.reshape(1, 1), cross_kv, cache)[0, -1]
            return self.sample(self.distribution(logits), key)

        # Build and start step i + 1 before waiting for token i, so graph building overlaps computation.
        keys = mx.random.split(key, max_tokens)
        next_token = step(mx.array(self.model.args.decoder_start_token_id), keys[0])
        mx.async_eval(next_token)
        for i in range(max_tokens):
            token = next_token
            if i + 1 < max_tokens:
                next_token = step(token, keys[i + 1])
                mx.async_eval(next_token)
            token = token.item()
            stats.main_calls += 1
            yield [token]
            if token == self.model.args.eos_token_id and not ignore_eos:
                return

    def speculative_tokens(self, prompt_ids, max_tokens, ignore_eos, stats) -> Iterator[List[int]]:
        """Accepted tokens, step by step: drafts accepted by the main model plus its own next token."""
        model, draft_model = self.model, self.draft_model
        key = mx.random.key(self.seed)
        tick = time.perf_counter()
        cross_kv, cache = self.prepare(model, prompt_ids)
        draft_cross_kv, draft_cache = self.prepare(draft_model, prompt_ids)
        stats.encode_seconds += time.perf_counter() - tick
        vocab_size = max(model.args.vocab_size, draft_model.args.vocab_size)

        # Every accepted token, after the decoder start id. The main cache holds all but the last of them; the draft
        # cache holds a prefix of them (one shorter than the main's after every draft was accepted).
        sequence = [model.args.decoder_start_token_id]
        generated = 0
        while generated < max_tokens:
            # Never draft past max_tokens: the main model adds one token after the drafts.
            num_draft = min(self.num_draft, max_tokens - generated - 1)
            key, draft_key, accept_key, extra_key = mx.random.split(key, 4)

            # Draft. Each token starts computing as soon as its step is built, so building the next step (and the
            # verification) overlaps it; nothing waits for the drafts.
            draft_input = mx.array([sequence[draft_cache[0].offset :]])
            draft_tokens, draft_probs = [], []
            for step_key in mx.random.split(draft_key, num_draft) if num_draft else []:
                logits = draft_model.decode(draft_input, draft_cross_kv, draft_cache)[0, -1]
                token, probs = self.draft_token(logits, step_key, vocab_size)
                mx.async_eval(token)
                draft_tokens.append(token)
                draft_probs.append(probs)
                draft_input = token.reshape(1, 1)

            # Verify: the last accepted token and every draft, in one forward pass of the main model.
            verify_input = mx.concatenate([mx.array(sequence[-1:]), *draft_tokens])[None]
            logits = model.decode(verify_input, cross_kv, cache)[0]
            accepted, extra = self.judge(logits, verify_input[0, 1:], draft_probs, accept_key, extra_key, vocab_size)
            # The one synchronisation per step.
            accepted, extra, drafts = accepted.tolist(), extra.tolist(), verify_input[0, 1:].tolist()
            stats.main_calls += 1
            stats.drafted += num_draft

            num_accepted = accepted.index(False) if False in accepted else num_draft
            new_tokens = drafts[:num_accepted] + [extra[num_accepted]]
            stats.accepted += num_accepted
            if not ignore_eos and model.args.eos_token_id in new_tokens:
                new_tokens = new_tokens[: new_tokens.index(model.args.eos_token_id) + 1]
            new_tokens = new_tokens[: max_tokens - generated]
            generated += len(new_tokens)

            # Rewind both caches to the accepted tokens (all but the newest, which is fed next step).
            sequence.extend(new_tokens)
            for layer_cache in cache:
                layer_cache.trim(layer_cache.offset - (len(sequence) - 1))
            for layer_cache in draft_cache:
                layer_cache.trim(max(0, layer_cache.offset - (len(sequence) - 1)))
            yield new_tokens
            if not ignore_eos and new_tokens[-1] == model.args.eos_token_id:
                return

    def draft_token(self, logits, key, vocab_size):
        """The draft's next token (1,) and, when sampling, the distribution it was drawn from (vocab_size,)."""
        if self.temperature == 0:
            return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32), None
        probs = pad_vocab(self.distribution(logits), vocab_size)
        return self.sample(probs, key)[None].astype(mx.int32), probs

    def judge(self, logits, drafts, draft_probs, accept_key, extra_key, vocab_size):
        """Which drafts the main model accepts, and the token it adds after each number accepted.

        logits: (k + 1, vocab) main-model logits at the k draft positions and after the last; drafts: (k,).
        Returns (accepted (k,) booleans, extra (k + 1,) tokens): extra[i] follows i accepted drafts, a correction
        for i < k and a bonus token for i = k.
        """
        uniform = 1.0 - mx.random.uniform(shape=drafts.shape, key=accept_key)
        if self.temperature == 0:
            # One-hot distributions: p(x) / q(x) is 1 where the main model's argmax is the draft, else 0; the
            # residual after a rejection is one-hot at the main model's argmax.
            choices = mx.argmax(logits, axis=-1)
            return accept_drafts((choices[:-1] == drafts).astype(mx.float32), 1.0, uniform, self.delta), choices
        main_probs = pad_vocab(self.distribution(logits), vocab_size)
        if not draft_probs:
            return mx.zeros((0,), dtype=mx.bool_), self.sample(main_probs, extra_key)
        draft_probs = mx.stack(draft_probs)
        p = mx.take_along_axis(main_probs[:-1], drafts[:, None], axis=-1)[:, 0]
        q = mx.take_along_axis(draft_probs, drafts[:, None], axis=-1)[:, 0]
        fallback = mx.concatenate([residual(main_probs[:-1], draft_probs), main_probs[-1:]])
        return accept_drafts(p, q, uniform, self.delta), self.sample(fallback, extra_key)


def check_vocabularies(model, draft_model, tokenizer, draft_tokenizer=None):
    """Raise IncompatibleDraftError unless the two models (and their tokenizers) share one vocabulary."""
    pieces = len(tokenizer)
    for name, candidate in (("main", model), ("draft", draft_model)):
        if candidate.args.vocab_size < pieces:
            raise IncompatibleDraftError(
                f"the {name} model has {candidate.args.vocab_size} output ids but the tokenizer has {pieces} tokens"
            )
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise IncompatibleDraftError(
            f"the draft tokenizer ({len(draft_tokenizer)} tokens) differs from the main model's ({pieces} tokens)"
        )
