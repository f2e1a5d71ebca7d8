"""Regular and speculative decoding for MLX T5 models.

One step of speculative decoding: a drafter (drafters.py) proposes up to `num_draft` tokens, the main model scores the
last accepted token and all drafts in one forward pass, a prefix of the drafts is accepted (sampling.py), and the main
model adds one token of its own (the correction after a rejection, or a bonus token when every draft was accepted).
The number of drafts is fixed or chosen step by step (draft_length.py). Many prompts decoded together take the
same step with a batch dimension (batch_decoder.py).
"""

import backend  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

import batch_decoder
from draft_length import AutoDraftLength, FixedDraftLength
from drafters import HybridDrafter, LookupDrafter, ModelDrafter, no_draft
from generation import Generation, Stats, count_accepted, step_tokens
from sampling import Sampler

DRAFTERS = ("model", "lookup", "hybrid")


class IncompatibleDraftError(ValueError):
    """The draft and main models do not share a vocabulary."""


class SpeculativeDecoder:
    """Decode with `model`, optionally sped up by drafts; the output follows `model` alone.

    drafter: "model" (`draft_model` drafts), "lookup" (copies from the prompt and the output, no draft model) or
    "hybrid" (a lookup match where there is one, else `draft_model`); max_ngram: the longest suffix a lookup matches.
    num_draft: drafts per step, or "auto" to choose up to max_num_draft step by step for the most tokens per second.
    temperature 0 is greedy decoding, and then delta = 0 reproduces the main model's greedy output token for token;
    with temperature > 0 and delta = 0 the output is distributed exactly as sampling from the main model.
    """

    def __init__(
        self,
        model,
        draft_model,
        tokenizer,
        num_draft: Union[int, str] = 5,
        delta: float = 0.0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        draft_tokenizer=None,
        drafter: str = "model",
        max_num_draft: int = 8,
        max_ngram: int = 3,
    ):
        if num_draft != "auto" and not (isinstance(num_draft, int) and num_draft >= 1):
            raise ValueError(f"num_draft must be a positive integer or 'auto', got {num_draft!r}")
        if max_num_draft < 1:
            raise ValueError(f"max_num_draft must be at least 1, got {max_num_draft}")
        if drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, got {drafter!r}")
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be at least 1, got {max_ngram}")
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
        self.max_num_draft = max_num_draft
        self.drafter = drafter
        self.max_ngram = max_ngram
        self.draft_length = None
        self.delta = delta
        self.sampler = Sampler(temperature, top_k, top_p)
        self.seed = seed
        if draft_model is not None:
            check_vocabularies(model, draft_model, tokenizer, draft_tokenizer)

    def generate(
        self,
        prompt: str,
        max_tokens: int = 100,
        regular: bool = False,
        ignore_eos: bool = False,
        stream: Optional[Callable[[str], None]] = None,
    ) -> Generation:
        """Decode `prompt`; `stream` receives text as it is produced. regular=True uses the main model alone."""
        self.check_drafter(regular)
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

    def check_drafter(self, regular: bool):
        if not regular and self.draft_model is None and self.drafter != "lookup":
            raise ValueError(f"the {self.drafter} drafter needs a draft model; pass regular=True to decode without one")

    def prepare(self, prompt_ids):
        """The main model's cross-attention keys/values for the prompt, and an empty self-attention cache."""
        cross_kv = self.model.cross_kv(self.model.encode(prompt_ids))
        mx.eval(cross_kv)
        return cross_kv, self.model.make_cache()

    def make_drafter(self):
        """A drafter for one sequence."""
        lookup = LookupDrafter(self.max_ngram, self.model.args.eos_token_id)
        if self.drafter == "lookup":
            return lookup
        model_drafter = ModelDrafter(self.draft_model, self.sampler)
        return HybridDrafter(lookup, model_drafter) if self.drafter == "hybrid" else model_drafter

    def make_draft_length(self):
        """How many tokens to draft, step by step, for one sequence."""
        if self.num_draft == "auto":
            return AutoDraftLength(self.max_num_draft)
        return FixedDraftLength(self.num_draft)

    def generate_batch(
        self,
        prompts: Sequence[str],
        max_tokens: int = 100,
        regular: bool = False,
        ignore_eos: bool = False,
        batch_size: int = 8,
        stats: Optional[Stats] = None,
    ) -> List[Generation]:
        """Decode every prompt, `batch_size` at a time: one Generation per prompt, in order (`batch_generations`)."""
        generations = [None] * len(prompts)
        for index, generation in self.batch_generations(prompts, max_tokens, regular, ignore_eos, batch_size, stats):
            generations[index] = generation
        return generations

    def batch_generations(
        self,
        prompts: Sequence[str],
        max_tokens: int = 100,
        regular: bool = False,
        ignore_eos: bool = False,
        batch_size: int = 8,
        stats: Optional[Stats] = None,
    ) -> Iterator[Tuple[int, Generation]]:
        """(prompt index, Generation) for each prompt as it finishes: up to `batch_size` prompts decode together, each
        row exactly as `generate` decodes it alone (batch_decoder.py)."""
        return batch_decoder.batch_generations(self, prompts, max_tokens, regular, ignore_eos, batch_size, stats)

    def regular_tokens(self, prompt_ids, max_tokens, ignore_eos, stats) -> Iterator[List[int]]:
        """The main model alone, one token per forward pass."""
        key = mx.random.key(self.seed)
        tick = time.perf_counter()
        cross_kv, cache = self.prepare(prompt_ids)
        stats.encode_seconds += time.perf_counter() - tick

        def step(token, key):
            logits = self.model.decode(token.reshape(1, 1), cross_kv, cache)[0, -1]
            return self.sampler.sample(self.sampler.distribution(logits), key)

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
        model, drafter = self.model, self.make_drafter()
        # One draft-length policy per decoder: what it measured on one prompt serves the next.
        self.draft_length = self.draft_length or self.make_draft_length()
        draft_length = self.draft_length
        key = mx.random.key(self.seed)
        tick = time.perf_counter()
        cross_kv, cache = self.prepare(prompt_ids)
        drafter.prepare(prompt_ids)
        stats.encode_seconds += time.perf_counter() - tick

        # Every accepted token, after the decoder start id. The main cache holds all but the last of them (and the
        # last too while a plain step is built ahead).
        sequence = [model.args.decoder_start_token_id]
        generated = 0
        last_sync = time.perf_counter()
        ahead = None  # the next step, when it is plain and was built before this step's synchronisation
        planned = None  # the next step's draft length, when chosen before this step's synchronisation
        while generated < max_tokens:
            if ahead:
                step = ahead
            else:
                # Never draft past max_tokens: the main model adds one token after the drafts.
                limit = max_tokens - generated - 1
                num_draft = draft_length.choose(drafter.source(sequence), limit) if planned is None else planned
                key, step_key = mx.random.split(key)
                step = self.step(
                    sequence[-1], drafter.propose(sequence, num_draft, step_key), step_key, cross_kv, cache
                )
            draft, accepted, extra = step
            # A plain step followed by another (the drafter's choice not depending on the tokens) builds the next
            # one now, from this step's token still being computed, as regular decoding does: the host builds while
            # the device computes.
            ahead = planned = None
            if not draft.tokens.size and not drafter.reads_tokens and generated + 1 < max_tokens:
                planned = draft_length.choose(drafter.source(sequence), limit=max_tokens - generated - 2)
                if planned == 0:
                    key, step_key = mx.random.split(key)
                    ahead, planned = self.step(extra[0], no_draft(), step_key, cross_kv, cache), None
            # The one synchronisation per step.
            accepted, extra, drafts = accepted.tolist(), extra.tolist(), draft.tokens.tolist()
            # A step's time runs from the last synchronisation to this one, so it includes all the host's work.
            now = time.perf_counter()
            num_accepted = count_accepted(accepted)
            draft_length.record(draft.source, len(drafts), num_accepted, self.agreed(now - last_sync))
            last_sync = now
            stats.main_calls += 1
            stats.drafted += len(drafts)
            if draft.source == "lookup" and drafts:
                stats.lookup_drafted += len(drafts)
                stats.lookup_steps += 1

            stats.accepted += num_accepted
            new_tokens = step_tokens(
                drafts, num_accepted, extra, model.args.eos_token_id, ignore_eos, max_tokens - generated
            )
            generated += len(new_tokens)

            # Rewind the main cache and the drafter to the accepted tokens (the newest is fed next step, or was fed
            # already by the step built ahead).
            sequence.extend(new_tokens)
            for layer_cache in cache:
                layer_cache.trim(layer_cache.offset - (len(sequence) - (0 if ahead else 1)))
            drafter.rewind(len(sequence))
            yield new_tokens
            if not ignore_eos and new_tokens[-1] == model.args.eos_token_id:
                return

    def agreed(self, seconds: float) -> float:
        """A step's time as every rank of a sharded main model takes it (their mean), so that auto chooses alike."""
        group = self.model.group
        if group is None or self.num_draft != "auto":
            return seconds
        return mx.distributed.all_sum(mx.array(seconds), group=group).item() / group.size()

    def step(self, last_token, draft, key, cross_kv, cache):
        """Verify `draft` after `last_token` (an int, or a (1,) array still being computed) in one forward pass of the
        main model: (draft, accepted (k,), extra (k + 1,)), as arrays not yet waited for."""
        accept_key, extra_key = mx.random.split(key)
        last_token = mx.array([last_token]) if isinstance(last_token, int) else last_token.reshape(1)
        verify_input = mx.concatenate([last_token.astype(mx.int32), draft.tokens])[None]
        logits = self.model.decode(verify_input, cross_kv, cache)[0]
        accepted, extra = self.sampler.judge(logits, draft.tokens, draft.probs, self.delta, accept_key, extra_key)
        mx.async_eval(accepted, extra)
        return draft, accepted, extra


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
