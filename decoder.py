"""Regular and speculative decoding for MLX T5 models.

One step of speculative decoding: a drafter (drafters.py) proposes up to `num_draft` tokens, the main model scores the
last accepted token and all drafts in one forward pass, a prefix of the drafts is accepted (sampling.py), and the main
model adds one token of its own (the correction after a rejection, or a bonus token when every draft was accepted).
The number of drafts is fixed or chosen step by step (draft_length.py).
"""

import backend  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from batching import BatchModelDrafter, RowDrafters, Rows, row_keys
from draft_length import AutoDraftLength, FixedDraftLength
from drafters import HybridDrafter, LookupDrafter, ModelDrafter, no_draft
from sampling import Sampler

DRAFTERS = ("model", "lookup", "hybrid")


class IncompatibleDraftError(ValueError):
    """The draft and main models do not share a vocabulary."""


@dataclass
class Stats:
    generated: int = 0
    main_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    lookup_drafted: int = 0  # drafted tokens that came from a lookup rather than the draft model
    lookup_steps: int = 0  # main-model calls that verified a lookup's drafts
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
    def mean_num_draft(self) -> float:
        """Tokens drafted per main-model call."""
        return self.drafted / self.main_calls if self.main_calls else 0.0

    @property
    def lookup_share(self) -> float:
        """The share of drafted tokens that came from a lookup."""
        return self.lookup_drafted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted": self.mean_accepted,
            "mean_num_draft": self.mean_num_draft,
            "lookup_share": self.lookup_share,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class Generation:
    text: str
    tokens: List[int]
    stats: Stats = field(default_factory=Stats)


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

    def make_batch_drafter(self):
        """A drafter for every row of a batch: the draft model batched; any other drafter one per row."""
        if self.drafter == "model":
            return BatchModelDrafter(self.draft_model, self.sampler)
        vocab_size = max(self.model.args.vocab_size, self.draft_model.args.vocab_size if self.draft_model else 0)
        return RowDrafters(self.make_drafter, vocab_size)

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
        """(prompt index, Generation) for each prompt as it finishes.

        Up to `batch_size` prompts decode together, each row exactly as `generate` decodes it alone (its own draft
        acceptance, cache length, EOS and max_tokens); a finished row's place goes to the next prompt in the queue.
        Row i samples with its own random stream, split from `seed`. `stats` receives the run's totals: main_calls
        counts batched forward passes, seconds the whole run.
        """
        self.check_drafter(regular)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        stats = Stats() if stats is None else stats
        start = time.perf_counter()
        model, eos = self.model, self.model.args.eos_token_id
        rows = Rows(model)
        drafter = None if regular else self.make_batch_drafter()
        queue = deque(enumerate(prompts))
        seeds = mx.random.split(mx.random.key(self.seed), max(len(prompts), 1))
        active: List[Row] = []
        draws = not self.sampler.greedy or self.delta > 0
        self.draft_length = self.draft_length or self.make_draft_length()
        # auto sees a batch as one sequence whose steps yield each row's tokens: the same k maximises both.
        source = "lookup" if self.drafter == "lookup" else "model"
        last_sync = time.perf_counter()
        while queue or active:
            if queue and len(active) < batch_size:
                tick = time.perf_counter()
                joining = [queue.popleft() for _ in range(min(batch_size - len(active), len(queue)))]
                ids = [self.tokenizer(prompt).input_ids for _, prompt in joining]
                rows.add(ids)
                if drafter is not None:
                    drafter.add(ids)
                seconds = time.perf_counter() - tick
                stats.encode_seconds += seconds
                for index, _ in joining:
                    row = Row(index, [model.args.decoder_start_token_id], seeds[index], time.perf_counter())
                    row.stats.encode_seconds = seconds
                    active.append(row)

            # One draft length for the whole batch: every row shares the verification pass. Never draft past the
            # longest remaining budget; rows with less left cut their tokens at max_tokens.
            limit = max(max_tokens - row.generated for row in active) - 1
            num_draft = 0 if regular else self.draft_length.choose(source, limit)
            # (B, 4, 2): each row's next key and its draft, accept and extra keys (greedy at delta 0 draws nothing).
            keys = (
                row_keys(mx.stack([row.key for row in active]), 4)
                if draws
                else mx.zeros((len(active), 4, 2), mx.uint32)
            )
            sequences = [row.sequence for row in active]
            lengths = [0] * len(active)
            draft_tokens, draft_probs = mx.zeros((len(active), 0), dtype=mx.int32), None
            if num_draft:
                draft, lengths = drafter.propose(sequences, num_draft, keys[:, 1])
                draft_tokens, draft_probs = draft.tokens, draft.probs

            # Verify: each row's last accepted token and its drafts, all rows in one forward pass.
            verify_input = mx.concatenate([mx.array([sequence[-1:] for sequence in sequences]), draft_tokens], axis=1)
            logits = rows.decode(verify_input)
            accepted, extra = self.judge_rows(logits, draft_tokens, draft_probs, keys[:, 2], keys[:, 3])
            # The one synchronisation per step.
            accepted, extra, drafts = accepted.tolist(), extra.tolist(), draft_tokens.tolist()
            now = time.perf_counter()
            self.draft_length.record_time(source, num_draft and max(lengths), self.agreed(now - last_sync))
            last_sync = now
            stats.main_calls += 1

            kept = []
            for b, row in enumerate(active):
                row.key = keys[b, 0]
                row.stats.main_calls += 1
                row.stats.drafted += lengths[b]
                num_accepted = count_accepted(accepted[b][: lengths[b]])
                row.stats.accepted += num_accepted
                self.draft_length.record_acceptance(source, lengths[b], num_accepted)
                stats.drafted += lengths[b]
                stats.accepted += num_accepted
                new_tokens = step_tokens(drafts[b], num_accepted, extra[b], eos, ignore_eos, max_tokens - row.generated)
                row.sequence.extend(new_tokens)
                if row.generated == max_tokens or (not ignore_eos and new_tokens[-1] == eos):
                    stats.generated += row.generated
                    yield row.index, self.finish(row)
                else:
                    kept.append(b)
            # Rewind every row to its accepted tokens (the newest is fed next step); finished rows leave.
            rows.rewind([len(sequence) - 1 for sequence in sequences])
            if drafter is not None:
                drafter.rewind([len(sequence) for sequence in sequences])
            if len(kept) < len(active):
                active = [active[b] for b in kept]
                rows.keep(kept)
                if drafter is not None:
                    drafter.keep(kept)
        stats.seconds = time.perf_counter() - start

    def judge_rows(self, logits, drafts, draft_probs, accept_keys, extra_keys):
        """The sampler's judgement of each row on its own, with its own keys: (B, k) verdicts, (B, k + 1) tokens."""
        judge, delta = self.sampler.judge, self.delta
        if drafts.shape[1] == 0:
            # The main model's own next token (and MLX cannot vmap a categorical draw over (1, vocab) rows).
            extra = mx.vmap(self.sampler.sample)(self.sampler.distribution(logits[:, -1]), extra_keys)
            return mx.zeros(drafts.shape, dtype=mx.bool_), extra[:, None]
        if draft_probs is None:
            return mx.vmap(lambda lg, dr, ak, ek: judge(lg, dr, None, delta, ak, ek))(
                logits, drafts, accept_keys, extra_keys
            )
        return mx.vmap(lambda lg, dr, dp, ak, ek: judge(lg, dr, dp, delta, ak, ek))(
            logits, drafts, draft_probs, accept_keys, extra_keys
        )

    def finish(self, row) -> Generation:
        tokens = row.sequence[1:]
        row.stats.generated = len(tokens)
        row.stats.seconds = time.perf_counter() - row.start
        return Generation(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens, row.stats)

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


@dataclass
class Row:
    """A prompt being decoded in a batch."""

    index: int  # its place in the prompt list
    sequence: List[int]  # the decoder start id and every token accepted
    key: mx.array  # its own random stream
    start: float
    stats: Stats = field(default_factory=Stats)

    @property
    def generated(self) -> int:
        return len(self.sequence) - 1


def count_accepted(verdicts: List[bool]) -> int:
    """How many drafts are kept: those before the first rejection."""
    return verdicts.index(False) if False in verdicts else len(verdicts)


def step_tokens(drafts, num_accepted, extra, eos, ignore_eos, remaining) -> List[int]:
    """A step's new tokens: the accepted drafts and the main model's own token after them, cut after an EOS (unless
    ignored) and at the `remaining` token budget."""
    tokens = drafts[:num_accepted] + [extra[num_accepted]]
    if not ignore_eos and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens[:remaining]


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
