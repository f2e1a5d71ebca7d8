"""Batched decoding: many prompts decoded together, each row exactly as `SpeculativeDecoder.generate` decodes it alone.

The speculative step of decoder.py with a batch dimension: one draft length for the whole batch (each row capped at its
own budget, padded to the longest), every row's drafts verified in one forward pass, and each row with its own
acceptance, cache length, EOS, max_tokens and random stream, so that its tokens do not depend on the batch size. A
finished row's place goes to the next prompt in the queue (once a quarter of the batch is free). Regular decoding
builds each step before reading the last (`plain_steps`), and so does a speculative batch when no row drafts. The
rows' state and drafting for every row: batch_rows.py.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

import generation
from batch_rows import BatchModelDrafter, RowDrafters, Rows, row_keys
from draft_length import past_eos
from generation import Generation, Stats, count_accepted, detokenizer, record_step, run_seconds, step_tokens, until_stop


@dataclass
class Row:
    """A prompt being decoded in a batch."""

    index: int  # its place in the prompt list
    sequence: List[int]  # the decoder start id and every token accepted
    key: mx.array  # its own random stream
    start: float
    stats: Stats = field(default_factory=Stats)
    done: bool = False  # finished (and yielded)
    after_eos: bool = False  # past an EOS that did not end it (ignore_eos): its drafts estimated apart, as alone

    @property
    def generated(self) -> int:
        return len(self.sequence) - 1


def batch_generations(
    decoder,
    prompts: Sequence[str],
    max_tokens: int = 100,
    regular: bool = False,
    ignore_eos: bool = False,
    batch_size: int = 8,
    stats: Optional[Stats] = None,
    drafter=None,
    draft_length=None,
    streams: Optional[Tuple[Sequence[int], int]] = None,
) -> Iterator[Tuple[int, Generation]]:
    """(prompt index, Generation) for each prompt as it finishes, decoded with `decoder`'s models and settings.

    Up to `batch_size` prompts decode together, each row exactly as `decoder.generate` decodes it alone (its own draft
    acceptance, cache length, EOS and max_tokens); finished rows' places go to the next prompts in the queue (`joins`).
    Row i samples with its own random stream, split from `seed`: stream i of len(prompts), or, given `streams`
    (indices, count), stream indices[i] of count, so that a prompt draws the same wherever it stands in a run.
    `stats` receives the run's totals: main_calls counts batched forward passes (lookup_steps those that verified a
    lookup's drafts), seconds the whole run. The batch drafter and draft-length policy are the decoder's own unless
    given.
    """
    decoder.check_drafter(regular)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    stats = Stats() if stats is None else stats
    if not regular:
        draft_length = draft_length or decoder.draft_length(stats, min(batch_size, max(len(prompts), 1)))
        drafter = drafter or make_batch_drafter(decoder)
    start = time.perf_counter()
    model, eos = decoder.model, decoder.model.args.eos_token_id
    stop = None if ignore_eos else eos  # (a token after which nothing is used)
    rows = Rows(model)
    queue = deque(enumerate(prompts))
    indices, count = streams or (range(len(prompts)), len(prompts))
    keys = mx.random.split(mx.random.key(decoder.seed), max(count, 1))
    seeds = [keys[index] for index in indices]
    if regular:
        yield from plain_steps(decoder, rows, queue, seeds, max_tokens, ignore_eos, batch_size, stats)
        stats.seconds = time.perf_counter() - start
        return
    active: List[Row] = []
    draws = not decoder.sampler.greedy or decoder.delta > 0
    last_sync = time.perf_counter()
    # A step's time is not its own, for auto, when rows joined before it (their prompts' encoding).
    while queue or active:
        joined = joins(len(active), batch_size, len(queue))
        if joined:
            active += join(decoder, rows, queue, seeds, batch_size - len(active), stats, drafter)

        # One draft length for the whole batch: every row shares the verification pass. A row never drafts past its
        # own max_tokens (the main model adds one token after the drafts), as alone; shorter drafts are padded.
        limits = [max_tokens - row.generated - 1 for row in active]
        sequences = [row.sequence for row in active]
        estimated = [
            past_eos(source) if row.after_eos else source for source, row in zip(drafter.sources(sequences), active)
        ]
        num_draft = draft_length.choose_batch(estimated, max(limits))
        if num_draft == 0 and not drafter.reads_tokens:
            # No draft for any row: plain steps as regular decoding takes them, each built before the last is read,
            # until the policy asks again (the drafter's rows wait, and catch up at their next draft).
            run = draft_length.plain_run(max(limits) + 1)
            if run > 1:
                active = yield from plain_steps(
                    decoder,
                    rows,
                    queue,
                    seeds,
                    max_tokens,
                    ignore_eos,
                    batch_size,
                    stats,
                    active=active,
                    run=run,
                    drafter=drafter,
                    draft_length=draft_length,
                )
                last_sync = time.perf_counter()
                continue
        # (B, 4, 2): each row's next key and its draft, accept and extra keys (greedy at delta 0 draws nothing).
        keys = row_keys(mx.stack([row.key for row in active]), 4) if draws else mx.zeros((len(active), 4, 2), mx.uint32)
        lengths, sources = [0] * len(active), [None] * len(active)
        draft_tokens, draft_probs = mx.zeros((len(active), 0), dtype=mx.int32), None
        if num_draft:
            counts = [min(num_draft, limit) for limit in limits]
            draft, lengths, sources = drafter.propose(sequences, counts, keys[:, 1])
            draft_tokens, draft_probs = draft.tokens, draft.probs

        # Verify: each row's last accepted token and its drafts, all rows in one forward pass.
        verify_input = mx.concatenate([mx.array([sequence[-1:] for sequence in sequences]), draft_tokens], axis=1)
        if decoder.sampler.greedy:
            # Greedy decoding needs only the main model's choice after each token.
            judge = decoder.sampler.judge_choices
            accepted, extra = mx.vmap(lambda choices, drafts, key: judge(choices, drafts, decoder.delta, key))(
                rows.choices(verify_input), draft_tokens, keys[:, 2]
            )
        else:
            logits = rows.decode(verify_input)
            accepted, extra = judge_rows(
                decoder.sampler, decoder.delta, logits, draft_tokens, draft_probs, keys[:, 2], keys[:, 3]
            )
        # The one synchronisation per step.
        accepted, extra, drafts = accepted.tolist(), extra.tolist(), draft_tokens.tolist()
        now = time.perf_counter()
        # The step's time is the costlier source's: the draft model's if any row drafted with it.
        cost_source = "model" if "model" in sources else "lookup" if "lookup" in sources else None
        draft_length.record_time(cost_source, max(lengths), decoder.agreed(now - last_sync), own=not joined)
        last_sync = now
        # The run's stats count batched passes; each row's, its own steps.
        stats.main_calls += 1
        stats.lookup_steps += "lookup" in sources

        kept = []
        for b, row in enumerate(active):
            row.key = keys[b, 0]
            # A row's drafts end at a drafted EOS that ends its output, as alone: what the batch drafted past it
            # counts as neither drafted nor rejected (counted, each output's end looked like a rejected draft to auto,
            # whose estimates of later drafts then stopped a batch of translations from drafting as far as paid).
            row_drafts = until_stop(drafts[b][: lengths[b]], stop)
            drafted = len(row_drafts)
            num_accepted = count_accepted(accepted[b][:drafted])
            new_tokens = step_tokens(row_drafts, num_accepted, extra[b], eos, ignore_eos, max_tokens - row.generated)
            record_step(
                row.stats,
                draft_length,
                sources[b],
                drafted,
                num_accepted,
                new_tokens,
                past_eos(sources[b]) if row.after_eos else None,
            )
            stats.drafted += drafted
            stats.accepted += num_accepted
            stats.lookup_drafted += drafted if sources[b] == "lookup" else 0
            row.sequence.extend(new_tokens)
            row.after_eos = row.after_eos or eos in new_tokens
            if row.generated == max_tokens or (not ignore_eos and new_tokens[-1] == eos):
                stats.generated += row.generated
                yield row.index, finish(row, decoder.tokenizer)
            else:
                kept.append(b)
        # Rewind every row to its accepted tokens (the newest is fed next step); finished rows leave.
        rows.rewind([len(sequence) - 1 for sequence in sequences])
        drafter.rewind([len(sequence) for sequence in sequences])
        active, _ = keep_rows(active, kept, rows, drafter)
    stats.seconds = time.perf_counter() - start
    decoder.remember_acceptance()


def joins(active: int, batch_size: int, queued: int) -> bool:
    """Whether prompts from the queue join a batch of `active` rows now: once a quarter of the batch is free (or all
    that the queue holds fits), not at every row that ends. A join encodes the prompts and widens every layer's
    cross-attention keys and values, a few milliseconds however few prompts join."""
    room = batch_size - active
    return queued > 0 and room > 0 and (active == 0 or room >= min(max(1, batch_size // 4), queued))


def join(decoder, rows, queue, seeds, room, stats, drafter=None) -> List[Row]:
    """Up to `room` prompts from the queue join `rows` (and the `drafter`'s), encoded together: their new Rows. Their
    encoding is started, not waited for: the encode_seconds counted are the host's (tokenizing, building the encoder's
    operations), the encoding itself running behind the step in flight."""
    tick = time.perf_counter()
    joining = [queue.popleft() for _ in range(min(room, len(queue)))]
    ids = [generation.tokenize(decoder.tokenizer, prompt) for _, prompt in joining]
    encoder_output = rows.add(ids)
    if drafter is not None:
        drafter.add(ids, encoder_output if decoder.shared_encoder else None)
    seconds = time.perf_counter() - tick
    stats.encode_seconds += seconds
    new_rows = []
    for index, _ in joining:
        row = Row(index, [decoder.model.args.decoder_start_token_id], seeds[index], time.perf_counter())
        row.stats.encode_seconds = seconds
        row.stats.costs_cached = stats.costs_cached
        new_rows.append(row)
    return new_rows


@dataclass
class Pending:
    """A regular step built and not yet read: the rows it decodes and their next tokens (B,), still computing."""

    rows: List[Row]
    tokens: mx.array


def read_step(decoder, pending: Pending, max_tokens, ignore_eos, stats, arrivals=None):
    """The one synchronisation of a plain step of a batch (while the next one computes): each row's token appended to
    it, and (prompt index, Generation) yielded for each row that ends; `arrivals` gets the time the tokens came."""
    eos = decoder.model.args.eos_token_id
    tokens = pending.tokens.tolist()
    if arrivals is not None:
        arrivals.append(time.perf_counter())
    stats.main_calls += 1
    for row, token in zip(pending.rows, tokens):
        if row.done:  # ended at the step before (its token here is not used)
            continue
        row.stats.add_step(None, 0, 0)
        row.sequence.append(token)
        row.after_eos = row.after_eos or token == eos
        if row.generated == max_tokens or (not ignore_eos and token == eos):
            stats.generated += row.generated
            yield row.index, finish(row, decoder.tokenizer)


def plain_step(decoder, rows, feed, keys):
    """A step of every row without drafts, started: (each row's token (B,), still computing; the rows' next keys).
    `feed`: (B, 1) each row's last token; `keys`: (B, 2) each row's key where the step draws (else None). Its keys are
    split as a step with drafts splits them (next key, draft, accept and extra keys)."""
    split = None if keys is None else row_keys(keys, 4)
    if decoder.sampler.greedy:
        tokens = rows.choices(feed)[:, 0]
    else:
        empty = mx.zeros((feed.shape[0], 0), dtype=mx.int32)
        tokens = judge_rows(decoder.sampler, decoder.delta, rows.decode(feed), empty, None, split[:, 2], split[:, 3])[1]
        tokens = tokens[:, 0]
    mx.async_eval(tokens)
    return tokens, None if split is None else split[:, 0]


def plain_steps(
    decoder,
    rows,
    queue,
    seeds,
    max_tokens,
    ignore_eos,
    batch_size,
    stats,
    active: Sequence[Row] = (),
    run: Optional[int] = None,
    drafter=None,
    draft_length=None,
):
    """Plain steps of a batch, step n + 1 built from step n's tokens before they are read, as `plain_tokens` does for
    one row: the host builds while the device computes. Rows that need no step beyond the pending one (their last
    token is in it, or they ended) leave before the next is built (a row that ends at EOS has had one step more
    computed, which is dropped), and prompts from the queue join as in batch_generations. Yields (prompt index,
    Generation) for each row that ends.

    Regular decoding: every prompt of the queue, to the end. A speculative batch whose rows take no draft (`drafter`,
    `draft_length` given): at most `run` steps of its `active` rows (and those that join), a row's tokens those of as
    many plain steps taken one at a time (each step splits a row's key alike); returns the rows that go on, and tells
    `draft_length` the steps taken and their time, joins left out. A row's tokens do not depend on the batch size."""
    speculative = drafter is not None
    draws = not decoder.sampler.greedy or (speculative and decoder.delta > 0)
    active = list(active)  # the rows of the pending step, in its order, then those that joined since
    keys = mx.stack([row.key for row in active]) if draws and active else None  # (B, 2) each row's next key
    pending: Optional[Pending] = None
    built, arrivals, joining = 0, [], 0.0
    while True:
        feed = [mx.array([row.sequence[-1:] for row in active])] if active and pending is None else []
        if pending is not None:
            kept = [b for b, row in enumerate(active) if not row.done and row.generated + 1 < max_tokens]
            if kept:
                feed = [(pending.tokens if len(kept) == len(active) else pending.tokens[mx.array(kept)])[:, None]]
            active, keys = keep_rows(active, kept, rows, drafter, keys)
        going_on = run is None or built < run
        if going_on and joins(len(active), batch_size, len(queue)):
            tick = time.perf_counter()
            new_rows = join(decoder, rows, queue, seeds, batch_size - len(active), stats, drafter)
            if draws:
                joined_keys = mx.stack([row.key for row in new_rows])
                keys = joined_keys if keys is None else mx.concatenate([keys, joined_keys])
            active += new_rows
            feed.append(mx.array([[row.sequence[-1]] for row in new_rows]))
            joining += time.perf_counter() - tick if len(arrivals) > 1 else 0.0  # (within the run's timed steps)
        step = None
        if active and going_on:
            feed = (feed[0] if len(feed) == 1 else mx.concatenate(feed)).astype(mx.int32)
            tokens, keys = plain_step(decoder, rows, feed, keys)
            step, built = Pending(list(active), tokens), built + 1
        if pending is not None:
            yield from read_step(decoder, pending, max_tokens, ignore_eos, stats, arrivals)
        if step is None:
            break
        pending = step
    if not speculative:
        return active
    # The rows that ended at the last step leave; the others keep their keys as they stand after the run.
    active, keys = keep_rows(active, [b for b, row in enumerate(active) if not row.done], rows, drafter, keys)
    if keys is not None:
        for b, row in enumerate(active):
            row.key = keys[b]
    # Timed as a single row's run, joins left out.
    seconds = run_seconds(arrivals, joining)
    draft_length.record_run(len(arrivals), None if seconds is None else decoder.agreed(seconds))
    return active


def keep_rows(active: List[Row], kept: List[int], rows, drafter=None, keys=None):
    """Only the rows at `kept` (indices into `active`, in order) go on: in `rows`, in the `drafter`'s (where given)
    and in `keys` ((B, 2), where given). Returns (the rows that go on, their keys)."""
    if len(kept) == len(active):
        return active, keys
    rows.keep(kept)
    if drafter is not None:
        drafter.keep(kept)
    return [active[b] for b in kept], None if keys is None or not kept else keys[mx.array(kept)]


def make_batch_drafter(decoder):
    """A drafter for every row of a batch: the draft model batched; any other drafter one per row."""
    if decoder.drafter == "model":
        return BatchModelDrafter(decoder.draft_model, decoder.sampler)
    draft_model = decoder.draft_model
    vocab_size = max(decoder.model.args.vocab_size, draft_model.args.vocab_size if draft_model else 0)
    return RowDrafters(decoder.make_drafter, vocab_size)


def judge_rows(sampler, delta, logits, drafts, draft_probs, accept_keys, extra_keys):
    """The sampler's judgement of each row on its own, with its own keys: (B, k) verdicts, (B, k + 1) tokens."""
    judge = sampler.judge
    if draft_probs is None:
        return mx.vmap(lambda lg, dr, ak, ek: judge(lg, dr, None, delta, ak, ek))(
            logits, drafts, accept_keys, extra_keys
        )
    return mx.vmap(lambda lg, dr, dp, ak, ek: judge(lg, dr, dp, delta, ak, ek))(
        logits, drafts, draft_probs, accept_keys, extra_keys
    )


def finish(row: Row, tokenizer) -> Generation:
    row.done = True
    tokens = row.sequence[1:]
    row.stats.generated = len(tokens)
    row.stats.seconds = time.perf_counter() - row.start
    return Generation(detokenizer(tokenizer)(tokens), tokens, row.stats)
