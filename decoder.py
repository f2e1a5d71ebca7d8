"""Regular and speculative decoding for MLX T5 models.

One step of speculative decoding: a drafter (drafters.py) proposes up to `num_draft` tokens, the main model scores the
last accepted token and all drafts in one forward pass, a prefix of the drafts is accepted (sampling.py), and the main
model adds one token of its own (the correction after a rejection, or a bonus token when every draft was accepted).
The number of drafts is fixed or chosen step by step (draft_length.py). Many prompts decoded together take the
same step with a batch dimension (batch_decoder.py).
"""

import blas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

import batch_decoder
import step_costs
from draft_length import Acceptance, AutoDraftLength, FixedDraftLength, past_eos
from drafters import HybridDrafter, LookupDrafter, ModelDrafter, no_draft
from generation import (
    Generation,
    Stats,
    count_accepted,
    detokenizer,
    record_step,
    run_seconds,
    step_tokens,
    tokenize,
    until_stop,
)
from sampling import Sampler

DRAFTERS = ("model", "lookup", "hybrid")
# The most drafts `auto` proposes by default. Drafts stop at an EOS that ends the output, so a long draft often costs
# what a short one does near the end of a short output: on the demo pair 15 drafts a step beat 12, and 12 beat 8. A
# verification of 15 drafts is 16 rows, which the packed kernels take in one pass over the weights.
MAX_NUM_DRAFT = 15


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
        max_num_draft: int = MAX_NUM_DRAFT,
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
        self.draft_lengths = {}  # batch size -> the draft-length policy of this decoder's runs at that size
        self.acceptance = None  # auto's acceptance estimates, shared by every batch size
        self.acceptance_file = None  # where they are kept between runs, once found
        self.delta = delta
        self.sampler = Sampler(temperature, top_k, top_p)
        self.seed = seed
        if draft_model is not None:
            check_vocabularies(model, draft_model, tokenizer, draft_tokenizer)
        # A draft model trained on the main model's frozen encoder drafts from the main model's encoding of the prompt:
        # one encoder run per prompt, not two, and the same numbers.
        self.shared_encoder = draft_model is not None and same_encoder(model, draft_model)

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
        draft_length = None if regular else self.draft_length(stats, batch_size=1)
        tokens: List[int] = []
        text = ""
        detokenize = detokenizer(self.tokenizer)
        start = time.perf_counter()
        prompt_ids = mx.array([tokenize(self.tokenizer, prompt)])  # (a list read back costs no evaluation)
        stats.encode_seconds = time.perf_counter() - start  # (the prompt's, as a batch's joins count it)
        if regular:
            steps = self.regular_tokens(prompt_ids, max_tokens, ignore_eos, stats)
        else:
            steps = self.speculative_tokens(prompt_ids, max_tokens, ignore_eos, stats, draft_length=draft_length)
        for new_tokens in steps:
            tokens.extend(new_tokens)
            if stream is None:  # the text once at the end
                continue
            # Decode the whole prefix so that SentencePiece spacing comes out right; emit what is new.
            decoded = detokenize(tokens)
            if decoded.startswith(text) and len(decoded) > len(text):
                stream(decoded[len(text) :])
            text = decoded
        if stream is None:
            text = detokenize(tokens)
        stats.generated = len(tokens)
        stats.seconds = time.perf_counter() - start
        self.remember_acceptance()
        return Generation(text=text, tokens=tokens, stats=stats)

    def check_drafter(self, regular: bool):
        if not regular and self.draft_model is None and self.drafter != "lookup":
            raise ValueError(f"the {self.drafter} drafter needs a draft model; pass regular=True to decode without one")

    def prepare(self, prompt_ids):
        """The main model's cross-attention keys/values for the prompt, an empty self-attention cache, and the encoder
        output where the draft model shares the main model's encoder (else None)."""
        encoder_output = self.model.encode(prompt_ids)
        cross_kv = self.model.cross_kv(encoder_output)
        mx.eval(cross_kv)
        return cross_kv, self.model.make_cache(), encoder_output if self.shared_encoder else None

    def make_drafter(self, stop: Optional[int] = None):
        """A drafter for one sequence; `stop`: a token after which nothing is worth drafting (EOS where it ends the
        output)."""
        lookup = LookupDrafter(self.max_ngram, self.model.args.eos_token_id)
        if self.drafter == "lookup":
            return lookup
        model_drafter = ModelDrafter(self.draft_model, self.sampler, stop)
        return HybridDrafter(lookup, model_drafter) if self.drafter == "hybrid" else model_drafter

    def draft_sources(self):
        """The sources of drafts this decoder's drafter uses."""
        return {"model": ["model"], "lookup": ["lookup"], "hybrid": ["model", "lookup"]}[self.drafter]

    def draft_length(self, stats: Stats, batch_size: int):
        """The policy choosing how many tokens to draft per step, made on first use at each batch size (auto measures
        step costs then, unless cached) and kept for later runs; `stats` records where its costs came from."""
        if batch_size not in self.draft_lengths:
            self.draft_lengths[batch_size] = self.make_draft_length(batch_size)
        policy = self.draft_lengths[batch_size]
        stats.costs_cached, stats.calibration_seconds = policy.costs_cached, policy.calibration_seconds
        policy.calibration_seconds = 0.0  # reported by the first run only
        return policy

    def make_draft_length(self, batch_size: int = 1):
        """How many tokens to draft, step by step, for one sequence or a batch of `batch_size`."""
        if self.num_draft != "auto":
            return FixedDraftLength(self.num_draft)
        if self.acceptance is None:
            self.acceptance = self.remembered_acceptance()
        tick = time.perf_counter()
        costs, setup, cached = step_costs.step_costs(self, self.draft_sources(), batch_size)
        policy = AutoDraftLength(self.max_num_draft, costs, self.acceptance, setup)
        policy.costs_cached, policy.calibration_seconds = cached, 0.0 if cached else time.perf_counter() - tick
        return policy

    def sharded(self) -> bool:
        return self.model.group is not None and self.model.group.size() > 1

    def remembered_acceptance(self) -> Acceptance:
        """The acceptance estimates this pair, drafter and sampling ended their last run with; none when sharded (the
        ranks' files might differ, and ranks that choose differently wait for each other forever)."""
        # Where this pair's acceptance is kept, found once: it hashes both models' weights.
        self.acceptance_file = step_costs.acceptance_path(self)
        remembered = None if self.sharded() else step_costs.read(self.acceptance_file)
        try:
            return Acceptance.from_record(remembered) if remembered else Acceptance()
        except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
            step_costs.warn(self.acceptance_file, "ignoring remembered acceptance in an unknown format")
            return Acceptance()

    def remember_acceptance(self):
        """Keep auto's acceptance estimates for this pair's next run."""
        if self.acceptance is not None and not self.sharded():
            path = self.acceptance_file or step_costs.acceptance_path(self)
            step_costs.write_soon(path, self.acceptance.to_record())

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
        streams: Optional[Tuple[Sequence[int], int]] = None,
    ) -> Iterator[Tuple[int, Generation]]:
        """(prompt index, Generation) for each prompt as it finishes: up to `batch_size` prompts decode together, each
        row exactly as `generate` decodes it alone (batch_decoder.py)."""
        return batch_decoder.batch_generations(
            self, prompts, max_tokens, regular, ignore_eos, batch_size, stats, streams=streams
        )

    def regular_tokens(self, prompt_ids, max_tokens, ignore_eos, stats) -> Iterator[List[int]]:
        """The main model alone, one token per forward pass."""
        key = mx.random.key(self.seed)
        tick = time.perf_counter()
        cross_kv, cache, _ = self.prepare(prompt_ids)
        stats.encode_seconds += time.perf_counter() - tick
        for token in self.plain_tokens(self.model.args.decoder_start_token_id, max_tokens, key, cross_kv, cache):
            stats.main_calls += 1
            yield [token]
            if token == self.model.args.eos_token_id and not ignore_eos:
                return

    def plain_tokens(self, token: int, count: int, key, cross_kv, cache, go_on=None) -> Iterator[int]:
        """`count` tokens of the main model alone after `token` (fed first; the cache holds what came before it).
        Step i + 1 is built and started before waiting for token i, so graph building overlaps computation; nothing is
        built past the last. `go_on()`, asked before building each step after the first, ends the tokens early (at
        the one being computed) when false."""
        keys = [None] * count if self.sampler.greedy else mx.random.split(key, count)
        next_token = self.plain_step(mx.array([[token]], dtype=mx.int32), keys[0], cross_kv, cache)
        for i in range(count):
            token = next_token
            last = i + 1 == count or (go_on is not None and not go_on())
            if not last:
                next_token = self.plain_step(token, keys[i + 1], cross_kv, cache)
            yield waited(token.item)
            if last:
                return

    def plain_step(self, token, key, cross_kv, cache):
        """The main model's next token after `token` (1, 1), built and started, not waited for: greedy, its (1, 1)
        choice, fed to the next step as it comes (with a reshape and an index around each step, 64 greedy tokens of the
        demo pair took 4-27% longer, three runs in turn); else drawn from its logits with `key`."""
        if self.sampler.greedy:
            token = self.model.choices(token, cross_kv, cache)
        else:
            token = self.sampler.next_token(self.model.decode(token.reshape(1, 1), cross_kv, cache)[0, -1], key)
        mx.async_eval(token)
        return token

    def speculative_tokens(
        self, prompt_ids, max_tokens, ignore_eos, stats, drafter=None, draft_length=None
    ) -> Iterator[List[int]]:
        """Accepted tokens, step by step: drafts accepted by the main model plus its own next token. The drafter and
        draft-length policy are the decoder's own unless given."""
        # Where EOS ends the output, nothing after a drafted EOS is drafted or verified.
        stop = None if ignore_eos else self.model.args.eos_token_id
        model, drafter = self.model, drafter or self.make_drafter(stop)
        draft_length = draft_length or self.draft_length(stats, batch_size=1)
        key = mx.random.key(self.seed)
        tick = time.perf_counter()
        cross_kv, cache, encoder_output = self.prepare(prompt_ids)
        drafter.prepare(prompt_ids, encoder_output)
        stats.encode_seconds += time.perf_counter() - tick

        # Every accepted token, after the decoder start id. The main cache holds all but the last of them (and the
        # last too while a plain step is built ahead).
        sequence = [model.args.decoder_start_token_id]
        generated = 0
        last_sync = time.perf_counter()
        ahead = None  # the next step, when it is plain and was built before this step's synchronisation
        planned = None  # the next step's draft length, when chosen before this step's synchronisation
        # Whether a drafting step's time is its own: not the prompt's first, where the draft model encodes the prompt
        # (the table leaves it out too; counted, one such step made drafting look ten times dearer than plain steps).
        drafted = False
        # Past an EOS that does not end the output, drafts are estimated apart (draft_length.past_eos).
        after_eos = False

        def estimated(source):
            return past_eos(source) if after_eos else source

        while generated < max_tokens:
            if ahead:
                step = ahead
            else:
                # Never draft past max_tokens: the main model adds one token after the drafts.
                limit = max_tokens - generated - 1
                if planned is None:
                    num_draft = draft_length.choose(
                        estimated(drafter.source(sequence)), limit, drafter.unready(sequence)
                    )
                else:
                    num_draft, planned = min(planned, limit), None
                run, go_on = 1, None
                if num_draft == 0:
                    run = draft_length.plain_run(limit + 1, drafter.reads_tokens)
                    if drafter.reads_tokens:
                        # Plain steps until the drafter's source (a lookup match) is worth drafting from: asked before
                        # each step is built, about the tokens known then (a match is found a token late); the
                        # length chosen then is the next step's.

                        def go_on():
                            nonlocal planned
                            source = estimated(drafter.source(sequence))
                            planned = draft_length.choose_in_run(source, limit, drafter.unready(sequence)) or None
                            return planned is None

                key, step_key = self.split_key(key)
                if run > 1:
                    # A run of plain steps, as regular decoding takes them; the policy asks again after it.
                    arrivals, ended = [], False
                    for token in self.plain_tokens(sequence[-1], run, step_key, cross_kv, cache, go_on):
                        arrivals.append(time.perf_counter())
                        record_step(stats, draft_length, None, 0, 0, [token])
                        generated += 1
                        sequence.append(token)
                        yield [token]
                        if token == model.args.eos_token_id:
                            ended, after_eos = not ignore_eos, True
                            if ended:
                                break
                    # The run's steps as taken (an EOS or the drafter may end it early), and its time per step.
                    seconds = run_seconds(arrivals)
                    draft_length.record_run(len(arrivals), None if seconds is None else self.agreed(seconds))
                    if ended:
                        return
                    drafter.rewind(len(sequence))
                    last_sync = time.perf_counter()
                    continue
                step = self.step(
                    sequence[-1], drafter.propose(sequence, num_draft, step_key), step_key, cross_kv, cache, stop
                )
            draft, accepted, extra = step
            # A plain step followed by another (the drafter's choice not depending on the tokens) builds the next
            # one now, from this step's token still being computed, as regular decoding does: the host builds while
            # the device computes.
            ahead = planned = None
            if not draft.tokens.size and not drafter.reads_tokens and generated + 1 < max_tokens:
                planned = draft_length.choose(
                    estimated(drafter.source(sequence)), max_tokens - generated - 2, drafter.unready(sequence)
                )
                if planned == 0:
                    key, step_key = self.split_key(key)
                    ahead, planned = self.step(extra[0], no_draft(), step_key, cross_kv, cache), None
            # The one synchronisation per step (a greedy verification computed at once has nothing left to wait for).
            accepted, extra, drafts = waited(lambda: (as_list(accepted), as_list(extra), draft.tokens.tolist()))
            # A step's time runs from the last synchronisation to this one, so it includes all the host's work.
            now = time.perf_counter()
            drafts = until_stop(drafts, stop)
            num_accepted = min(count_accepted(accepted), len(drafts))
            own = drafted or draft.source != "model"
            draft_length.record_time(draft.source, len(drafts), self.agreed(now - last_sync), own=own)
            last_sync, drafted = now, drafted or draft.source == "model"
            new_tokens = step_tokens(
                drafts, num_accepted, extra, model.args.eos_token_id, ignore_eos, max_tokens - generated
            )
            record_step(
                stats, draft_length, draft.source, len(drafts), num_accepted, new_tokens, estimated(draft.source)
            )
            after_eos = after_eos or model.args.eos_token_id in new_tokens
            generated += len(new_tokens)

            # Rewind the main cache and the drafter to the accepted tokens (the newest is fed next step, or was fed
            # already by the step built ahead).
            sequence.extend(new_tokens)
            rejected = cache[0].offset - (len(sequence) - (0 if ahead else 1))
            if rejected:  # every layer holds the same positions
                for layer_cache in cache:
                    layer_cache.trim(rejected)
            drafter.rewind(len(sequence))
            yield new_tokens
            if not ignore_eos and new_tokens[-1] == model.args.eos_token_id:
                return

    def split_key(self, key):
        """Two keys from `key`; for greedy decoding at delta 0, which draws nothing, `key` twice (no operations)."""
        if self.sampler.greedy and self.delta == 0:
            return key, key
        return mx.random.split(key)

    def agreed(self, seconds: float) -> float:
        """A step's time as every rank of a sharded main model takes it (their mean), so that auto chooses alike."""
        return self.agree([seconds])[0] if self.num_draft == "auto" else seconds

    def agree(self, values: List[float]) -> List[float]:
        """The ranks' mean of each value (the values themselves when the main model is not sharded)."""
        if not self.sharded():
            return list(values)
        group = self.model.group
        return (mx.distributed.all_sum(mx.array(values), group=group) / group.size()).tolist()

    def agree_all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        return self.agree([float(flag)])[0] == 1.0

    def step(self, last_token, draft, key, cross_kv, cache, stop=None):
        """Verify `draft` after `last_token` (an int, or a (1,) array still being computed) in one forward pass of the
        main model: (draft, accepted (k,), extra (k + 1,)), as arrays not yet waited for, or as lists where a greedy
        verification after an int was computed at once (natively, drafts judged at delta 0). `stop`: a token (EOS where
        it ends the output) after which a greedy verification computes nothing (nothing there is accepted)."""
        if self.sampler.greedy:
            choices = None
            if isinstance(last_token, int) and draft.tokens.size:
                # The drafts are computed (drafters compute greedy drafts at once), and the host would wait for the
                # verification next: computed now, with no operation around it, and at delta 0 judged on the host.
                drafts = draft.tokens.tolist()
                verify_input = mx.array([[last_token, *drafts]], dtype=mx.int32)
                choices = self.model.greedy_choices(verify_input, cross_kv, cache, stop=stop, now=True)
                if choices is not None and self.delta == 0:
                    extra = choices[0].tolist()
                    return draft, [token == choice for token, choice in zip(drafts, extra)], extra
            if choices is None:
                # Greedy decoding needs only the main model's choice after each token.
                choices = self.model.choices(self.verify_input(last_token, draft)[None], cross_kv, cache, stop=stop)
                if not draft.tokens.size:  # a plain step is regular decoding's step: nothing to judge, no keys to split
                    mx.async_eval(choices[0])
                    return draft, NO_ACCEPTANCE, choices[0]
            accepted, extra = self.sampler.judge_choices(choices[0], draft.tokens, self.delta, self.split_key(key)[0])
        else:
            accept_key, extra_key = self.split_key(key)
            logits = self.model.decode(self.verify_input(last_token, draft)[None], cross_kv, cache)[0]
            accepted, extra = self.sampler.judge(logits, draft.tokens, draft.probs, self.delta, accept_key, extra_key)
        mx.async_eval(accepted, extra)
        return draft, accepted, extra

    @staticmethod
    def verify_input(last_token, draft):
        """The tokens a verification feeds (k + 1,) int32: `last_token` (an int, or a (1,) array still being computed)
        and the drafts."""
        last_token = mx.array([last_token]) if isinstance(last_token, int) else last_token.reshape(1)
        verify_input = last_token.astype(mx.int32)
        return mx.concatenate([verify_input, draft.tokens]) if draft.tokens.size else verify_input


def waited(read: Callable):
    """`read()`: where the decoding loop waits for the model's values (an array's .item() or .tolist()), in one place
    so that the time spent waiting for the model can be told from the loop's own (benchmarks.decode_step)."""
    return read()


def as_list(values) -> list:
    """A step's verdicts or tokens as a list: read back from an array (waiting for it), or as they came."""
    return values if isinstance(values, list) else values.tolist()


# What a step without drafts accepted.
NO_ACCEPTANCE = mx.zeros((0,), dtype=mx.bool_)
mx.eval(NO_ACCEPTANCE)  # (see drafters.NO_TOKENS)


# The settings an encoder's output depends on, beside its weights.
ENCODER_ARGS = (
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "layer_norm_epsilon",
    "feed_forward_proj",
)


def same_encoder(model, other) -> bool:
    """Whether `other` encodes every prompt exactly as `model` does: the same encoder settings, and the same
    embeddings and encoder weights, array for array (neither sharded)."""
    if model is other:
        return True
    if model.group is not None or other.group is not None:
        return False
    if any(getattr(model.args, name) != getattr(other.args, name) for name in ENCODER_ARGS):
        return False
    ours, theirs = (dict(tree_flatten(m["encoder"].parameters())) for m in (model, other))
    ours["shared"], theirs["shared"] = model["shared"].weight, other["shared"].weight
    if ours.keys() != theirs.keys():
        return False
    pairs = [(ours[name], theirs[name]) for name in ours]
    if any(a.shape != b.shape or a.dtype != b.dtype for a, b in pairs):
        return False
    return all(mx.array_equal(a, b).item() for a, b in pairs)


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
