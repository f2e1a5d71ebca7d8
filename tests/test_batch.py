"""Batched decoding: every row exactly as its prompt decoded alone, rows joining and leaving, sampling per row."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import PROMPTS, VARIANTS, perturbed
from test_decoder import CountingTokenizer, chi_square, chi_square_critical, exact_marginals

import batch_decoder
import kernels
from batch_rows import BatchModelDrafter, RowDrafters, Rows, rows_of
from decoder import SpeculativeDecoder, Stats
from draft_length import Acceptance, AutoDraftLength, FixedDraftLength
from drafters import ModelDrafter
from loader import load_model
from sampling import Sampler, residual


@pytest.mark.parametrize("native", [False, True])
def test_rows_that_stay_and_join_are_those_rows_padded(monkeypatch, native):
    # Rows.keep and Rows.add: each layer's cross keys and values at the rows that stay, in their new order, then the
    # joining prompts' rows, zeros past each prompt's length; natively (one operation) and by MLX's operations alike,
    # against numpy. The arrays come with other strides too (a transposed view).
    if native and kernels.native is None:
        pytest.skip("native kernels not built")
    monkeypatch.setattr(kernels, "fused_layers", native)
    kernels.used.discard("native batch rows")
    rng = np.random.default_rng(0)
    old = [rng.standard_normal((5, 3, 7, 4)).astype(np.float32) for _ in range(4)]
    new = [rng.standard_normal((2, 3, 9, 4)).astype(np.float32) for _ in range(4)]
    strided = mx.array(old[1].transpose(0, 1, 3, 2).copy()).transpose(0, 1, 3, 2)
    cross_kv = [(mx.array(old[0]), strided), (mx.array(old[2]), mx.array(old[3]))]
    joining = [(mx.array(new[0]), mx.array(new[1])), (mx.array(new[2]), mx.array(new[3]))]
    for rows, appended, width in (([3, 0, 4], [], 7), (list(range(5)), joining, 11), ([1, 2], joining, 9)):
        out = rows_of(cross_kv, rows, appended, width)
        for j, array in enumerate(a for pair in out for a in pair):
            expected = np.zeros((len(rows) + (2 if appended else 0), 3, width, 4), np.float32)
            expected[: len(rows), :, :7] = old[j][rows]
            if appended:
                expected[len(rows) :, :, :9] = new[j]
            np.testing.assert_array_equal(np.array(array), expected)
    assert ("native batch rows" in kernels.used) == native


def test_a_batch_drafts_greedily_in_one_operation_as_step_by_step(converted, monkeypatch):
    # BatchModelDrafter, greedy: after each row's first choice, the rest of every row's drafts come from one native
    # operation (Rows.greedy_draft), each row at its own length and feed; they are the tokens that MLX's operations
    # draft step by step, and the draft model's caches end alike.
    if kernels.native is None:
        pytest.skip("native kernels not built")
    model, tokenizer, _ = load_model(converted("t5"))
    prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS[:3]]
    sequences = [[0, 5, 6], [0, 7, 8, 9, 10, 11], [0, 12]]
    calls = []
    greedy_draft = Rows.greedy_draft
    monkeypatch.setattr(Rows, "greedy_draft", lambda *a: calls.append(greedy_draft(*a)) or calls[-1])
    drafts, caches = {}, {}
    for native in (False, True):
        monkeypatch.setattr(kernels, "fused_layers", native)
        drafter = BatchModelDrafter(model, Sampler(0.0))
        drafter.add(prompts)
        drafter.propose([sequence[:2] for sequence in sequences], [1, 1, 1], None)  # rows one token behind
        drafter.rewind([2, 2, 2])
        draft, lengths, sources = drafter.propose(sequences, [5, 3, 5], None)
        assert draft.tokens.shape == (3, 5) and lengths == [5, 3, 5] and sources == ["model"] * 3
        drafts[native] = np.array(draft.tokens)
        caches[native] = [layer_cache.offsets for layer_cache in drafter.rows.cache]
    assert [call is None for call in calls] == [True, False]
    np.testing.assert_array_equal(drafts[True], drafts[False])
    assert caches[True] == caches[False]


def alone(decoder, prompts, **options):
    return [decoder.generate(prompt, **options).tokens for prompt in prompts]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rows_equal_each_prompt_decoded_alone(variant, converted):
    # Prompts of 1 to ~25 words, six of them three at a time, so finished rows are replaced from the queue.
    model, tokenizer, _ = load_model(converted(variant))
    draft_model = perturbed(converted(variant), 0.04, seed=0)
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=3)
    # An end token that rows reach at different steps (random models seldom produce the real one).
    reference = alone(decoder, PROMPTS, max_tokens=24, regular=True, ignore_eos=True)
    model.args.eos_token_id = reference[0][4]
    for regular in (True, False):
        expected = alone(decoder, PROMPTS, max_tokens=24, regular=regular)
        assert len({len(tokens) for tokens in expected}) > 1  # rows finish at different steps
        for batch_size in (3, 8):
            generations = decoder.generate_batch(PROMPTS, max_tokens=24, regular=regular, batch_size=batch_size)
            assert [generation.tokens for generation in generations] == expected, (regular, batch_size)
            assert [g.text for g in generations] == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]


def test_rows_whose_drafts_reach_their_end_count_them_as_alone(converted):
    # A row whose draft runs into the EOS that ends its output drafted up to it, as alone (where the draft model stops
    # there): the batch's drafts past it are neither drafted nor rejected, in the row's stats and for the policy.
    class Heard(FixedDraftLength):
        def __init__(self, num_draft):
            super().__init__(num_draft)
            self.heard = []

        def record_acceptance(self, source, drafted, accepted):
            self.heard.append((drafted, accepted))

    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    decoder = SpeculativeDecoder(model, perturbed(converted("t5-v1_1"), 0.04, seed=0), tokenizer, num_draft=6)
    reference = alone(decoder, PROMPTS, max_tokens=24, regular=True, ignore_eos=True)
    model.args.eos_token_id = reference[0][4]
    decoder.draft_lengths[1] = single = Heard(6)
    singles = [decoder.generate(prompt, max_tokens=24) for prompt in PROMPTS]
    decoder.draft_lengths[3] = batched = Heard(6)
    generations = decoder.generate_batch(PROMPTS, max_tokens=24, batch_size=3)
    assert [g.tokens for g in generations] == [g.tokens for g in singles]
    # Some output ended inside a draft of fewer drafts than asked (the test's point), by an EOS the draft proposed.
    ended = [g for g in singles if g.tokens[-1] == model.args.eos_token_id]
    assert ended and any(drafted < 6 and drafted == accepted for drafted, accepted in single.heard)
    for g, s in zip(generations, singles):
        assert (g.stats.main_calls, g.stats.drafted, g.stats.accepted) == (
            s.stats.main_calls,
            s.stats.drafted,
            s.stats.accepted,
        )
    assert sorted(batched.heard) == sorted(single.heard)


@pytest.mark.parametrize("num_draft", [1, 4])
def test_per_row_drafters_equal_the_batched_draft_model(num_draft, converted, monkeypatch):
    # Any drafter other than the draft model runs one per row (RowDrafters); the draft model run that way must agree.
    made = []

    class WrappedDrafter(ModelDrafter):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    draft_model = perturbed(converted("t5-v1_1"), 0.04, seed=0)
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=num_draft)
    expected = alone(decoder, PROMPTS, max_tokens=20, ignore_eos=True)
    batched = Stats()
    decoder.generate_batch(PROMPTS, max_tokens=20, ignore_eos=True, batch_size=4, stats=batched)
    vocab_size = model.args.vocab_size
    monkeypatch.setattr(
        batch_decoder,
        "make_batch_drafter",
        lambda decoder: RowDrafters(lambda: WrappedDrafter(draft_model, decoder.sampler), vocab_size),
    )
    stats = Stats()
    generations = decoder.generate_batch(PROMPTS, max_tokens=20, ignore_eos=True, batch_size=4, stats=stats)
    assert len(made) >= 4  # the rows did draft through per-row drafters
    assert [generation.tokens for generation in generations] == expected
    # The same drafts as the batched draft model's (greedy tokens would agree even with a row's drafter misplaced).
    assert (stats.accepted, stats.drafted) == (batched.accepted, batched.drafted)
    assert 0 < stats.accepted < stats.drafted
    assert stats.generated == sum(len(tokens) for tokens in expected) == sum(g.stats.generated for g in generations)


def test_run_stats_add_up_and_rows_keep_their_own(converted):
    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    decoder = SpeculativeDecoder(model, perturbed(converted("t5-v1_1"), 0.04, seed=0), tokenizer, num_draft=2)
    stats = Stats()
    generations = decoder.generate_batch(PROMPTS, max_tokens=15, ignore_eos=True, batch_size=6, stats=stats)
    assert stats.accepted == sum(g.stats.accepted for g in generations)
    assert stats.drafted == sum(g.stats.drafted for g in generations)
    # All six rows decode together: one batched pass per step, as many steps as the slowest row's.
    assert stats.main_calls == max(g.stats.main_calls for g in generations)
    assert len({g.stats.accepted for g in generations}) > 1


def test_batch_size_below_one_is_refused(converted):
    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    with pytest.raises(ValueError, match="batch_size"):
        SpeculativeDecoder(model, None, tokenizer).generate_batch(PROMPTS, regular=True, batch_size=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SpeculativeDecoder(model, None, tokenizer).generate_batch(PROMPTS, max_tokens=0, regular=True)


def test_prompts_join_once_a_quarter_of_the_batch_is_free():
    joins = batch_decoder.joins
    assert not joins(7, 8, 10) and joins(6, 8, 10)  # one free row of 8 waits for a second
    assert joins(7, 8, 1)  # the queue's last prompt joins as soon as it fits
    assert joins(0, 8, 5) and joins(3, 4, 9) and joins(0, 1, 1)  # an empty batch; batches under 8 join at every end
    assert not joins(8, 8, 5) and not joins(5, 8, 0)  # full, or nothing queued


@pytest.mark.parametrize("setting", ["greedy", "t1", "top-p-delta"])
def test_regular_rows_do_not_depend_on_the_batch_size(setting):
    # Regular batches build each step before reading the last one's tokens: a row that ends at EOS has one step more
    # computed, dropped, and rows from the queue take its place; each row still draws from its own keys.
    main_model, _ = tiny_pair()
    decoder = SpeculativeDecoder(main_model, None, CountingTokenizer(12), seed=3, **BATCH_SIZE_SETTINGS[setting])
    prompts = ["31415926", "1212121212", "2718281828", "9", "1414", "777777", "22360", "1732050807", "123123123"]
    for ignore_eos in (True, False):
        by_size = {
            size: [g.tokens for g in decoder.generate_batch(prompts, 12, True, ignore_eos, batch_size=size)]
            for size in (1, 2, 3, 8)
        }
        for size in (2, 3, 8):
            assert by_size[size] == by_size[1], (ignore_eos, size)
        if setting == "greedy":
            assert by_size[1] == alone(decoder, prompts, max_tokens=12, ignore_eos=ignore_eos, regular=True)
        elif ignore_eos:
            assert len({tuple(tokens) for tokens in by_size[1]}) > 6  # drawn, not all alike
        lengths = {len(tokens) for tokens in by_size[1]}
        assert lengths == {12} if ignore_eos else len(lengths) > 1  # with EOS, rows finish at different steps


def tiny_pair():
    from test_decoder import tiny_model

    return tiny_model(seed=10, vocab_size=12, sharpness=4.0), tiny_model(seed=11, vocab_size=12, sharpness=4.0)


def test_sampling_is_reproducible_and_independent_per_row():
    main_model, draft_model = tiny_pair()
    decoder = SpeculativeDecoder(main_model, draft_model, CountingTokenizer(12), num_draft=2, temperature=1.0)
    first = [g.tokens for g in decoder.generate_batch(["31415"] * 8, max_tokens=6, ignore_eos=True, batch_size=4)]
    again = [g.tokens for g in decoder.generate_batch(["31415"] * 8, max_tokens=6, ignore_eos=True, batch_size=4)]
    assert first == again
    assert len({tuple(tokens) for tokens in first}) > 4  # the same prompt, drawn independently in each row


ROWS = 2000
POSITIONS = 3


SAMPLING = {
    "t1": dict(temperature=1.0),
    "top-k": dict(temperature=0.7, top_k=4),
    "top-p": dict(temperature=1.3, top_p=0.8),
}


@pytest.mark.parametrize(
    "setting, drafter",
    [("t1", "model"), ("top-k", "model"), ("top-p", "model"), ("t1", "lookup"), ("top-p", "hybrid")],
)
def test_each_row_samples_the_main_models_distribution(setting, drafter):
    # Two prompts of different lengths, 2000 rows each, 500 at a time: every row's draws must follow the main model
    # (a chi-square test per prompt and position at a false-failure rate of 1e-3; the seed is fixed). Lookup and
    # hybrid drafts come one drafter per row, padded to one width with q = 0, lookup and model drafts side by side.
    main_model, draft_model = tiny_pair()
    prompts = ["31415", "2718281828"]
    decoder = SpeculativeDecoder(
        main_model, draft_model, CountingTokenizer(12), num_draft=2, drafter=drafter, **SAMPLING[setting]
    )
    stats = Stats()
    generations = decoder.generate_batch(
        prompts * ROWS, max_tokens=POSITIONS, ignore_eos=True, batch_size=500, stats=stats
    )
    assert stats.drafted > 0
    for prompt_index, prompt in enumerate(prompts):
        prompt_ids = mx.array([[int(c) for c in prompt]])
        marginals = exact_marginals(main_model, prompt_ids, POSITIONS, decoder.sampler.distribution)
        counts = np.zeros((POSITIONS, 12))
        for generation in generations[prompt_index :: len(prompts)]:
            counts[np.arange(POSITIONS), generation.tokens] += 1
        for position in range(POSITIONS):
            forbidden = marginals[position] == 0
            assert counts[position][forbidden].sum() == 0, (prompt, position, "forbidden tokens drawn")
            statistic, df = chi_square(counts[position], marginals[position])
            assert statistic < chi_square_critical(df), (prompt, position, statistic)


BATCH_SIZE_SETTINGS = {
    "greedy": dict(),
    "greedy-delta": dict(delta=0.5),
    "t1": dict(temperature=1.0),
    "top-k-delta": dict(temperature=0.7, top_k=4, delta=0.3),
    "top-p-delta": dict(temperature=1.3, top_p=0.8, delta=0.5),
}


@pytest.mark.parametrize("drafter", ["model", "lookup", "hybrid"])
@pytest.mark.parametrize("setting", list(BATCH_SIZE_SETTINGS))
def test_a_rows_tokens_do_not_depend_on_the_batch_size(setting, drafter):
    # Each row draws from its own keys (split from the seed by prompt index), one per token position, whichever rows
    # share its batch: every token, to the last, is the same at any batch size, also where a row drafts less than
    # the others (near its max_tokens, or a shorter lookup) and its drafts are padded to theirs.
    main_model, draft_model = tiny_pair()
    decoder = SpeculativeDecoder(
        main_model, draft_model, CountingTokenizer(12), 3, drafter=drafter, seed=5, **BATCH_SIZE_SETTINGS[setting]
    )
    prompts = ["31415926", "1212121212", "2718281828", "9", "1414", "777777", "22360", "1732050807", "123123123"]
    for ignore_eos in (True, False):
        stats = Stats()
        by_size = {
            size: [
                g.tokens
                for g in decoder.generate_batch(prompts, 12, ignore_eos=ignore_eos, batch_size=size, stats=stats)
            ]
            for size in (1, 2, 3, 8)
        }
        for size in (2, 3, 8):
            assert by_size[size] == by_size[1], (ignore_eos, size)
        assert stats.drafted > 0
        # Lookups in the long runs (with EOS, the tiny models' outputs are mostly too short to repeat themselves).
        assert (stats.lookup_drafted > 0) == (drafter != "model") or not ignore_eos
        if decoder.sampler.greedy and decoder.delta == 0:
            assert by_size[1] == alone(decoder, prompts, max_tokens=12, ignore_eos=ignore_eos, regular=True)
        elif decoder.sampler.greedy and ignore_eos:
            # delta > 0 keeps drafts the main model would not have chosen.
            assert by_size[1] != alone(decoder, prompts, max_tokens=12, ignore_eos=True, regular=True)
        elif ignore_eos:
            assert len({tuple(tokens) for tokens in by_size[1]}) > 6  # drawn, not all alike
    assert len({len(tokens) for tokens in by_size[1]}) > 1  # with EOS, rows finish at different steps


def test_a_padded_position_draws_from_p_itself():
    # Where a row drafted nothing (q = 0: padding to the batch's width), its token is drawn from p exactly, as after
    # its own last draft alone; p renormalised would differ in its last bits and change a draw near a tie.
    p = mx.array([[0.1, 0.2, 0.3, 0.2], [0.1, 0.2, 0.3, 0.3]])  # (not normalised: p itself, not p / sum(p))
    q = mx.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.3]])
    assert residual(p, q).tolist()[0] == p.tolist()[0]
    assert np.allclose(residual(p, q).tolist()[1], [1 / 3, 2 / 3, 0.0, 0.0])


def test_delta_above_zero_in_a_batch_accepts_more_and_delta_one_keeps_every_draft():
    # Lenient acceptance (delta) row by row, as generate() applies it to one sequence.
    main_model, draft_model = tiny_pair()
    accepted = {}
    for delta in (0.0, 0.5, 1.0):
        decoder = SpeculativeDecoder(
            main_model, draft_model, CountingTokenizer(12), num_draft=3, delta=delta, temperature=1.0
        )
        stats = Stats()
        decoder.generate_batch(["31415"] * 200, max_tokens=9, ignore_eos=True, batch_size=50, stats=stats)
        accepted[delta] = stats.accepted / stats.drafted
    assert accepted[0.0] < accepted[0.5] < accepted[1.0] == 1.0


def test_the_per_row_check_detects_a_biased_sampler():
    # delta = 1 keeps every draft: the rows' first tokens follow the draft model, and the same check rejects them.
    main_model, draft_model = tiny_pair()
    decoder = SpeculativeDecoder(
        main_model, draft_model, CountingTokenizer(12), num_draft=2, delta=1.0, temperature=1.0
    )
    generations = decoder.generate_batch(["31415"] * ROWS, max_tokens=1 + 2, ignore_eos=True, batch_size=500)
    marginals = exact_marginals(main_model, mx.array([[3, 1, 4, 1, 5]]), 1, decoder.sampler.distribution)
    counts = np.bincount([generation.tokens[0] for generation in generations], minlength=12)
    statistic, df = chi_square(counts, marginals[0])
    assert statistic > chi_square_critical(df)


@pytest.mark.parametrize("drafter, num_draft", [("lookup", 4), ("hybrid", 4), ("model", "auto")])
def test_every_drafter_and_auto_batched_equal_each_prompt_decoded_alone(drafter, num_draft, converted):
    # Drafts from the text itself come one drafter per row, of uneven lengths (padded, never accepted past a row's
    # own); auto picks one draft length per step for the whole batch.
    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    draft_model = perturbed(converted("t5-v1_1"), 0.04, seed=0)
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=num_draft, drafter=drafter)
    if num_draft == "auto":
        # Step costs given, so that drafting pays whatever the machine's load does to measured ones.
        costs = {source: [1.0 + 0.1 * k for k in range(decoder.max_num_draft + 1)] for source in ("model", "lookup")}
        for batch_size in (1, 3):
            decoder.draft_lengths[batch_size] = AutoDraftLength(decoder.max_num_draft, dict(costs), Acceptance())
    prompts = PROMPTS + ["a b a b a b a b a b a b", "x = x + 1; x = x + 1; x = x + 1; x = x + 1"]
    expected = alone(decoder, prompts, max_tokens=24, ignore_eos=True)
    stats = Stats()
    generations = decoder.generate_batch(prompts, max_tokens=24, ignore_eos=True, batch_size=3, stats=stats)
    assert [generation.tokens for generation in generations] == expected
    assert stats.drafted > 0


@pytest.mark.parametrize("drafter", ["lookup", "hybrid"])
def test_batched_rows_count_their_drafts_by_source_as_alone(drafter, converted):
    # The run's drafts and lookups are its rows', each row's lookups among its drafts; the draft-length policy hears
    # each row's acceptance under that row's own source.
    class Heard(FixedDraftLength):
        def __init__(self, num_draft):
            super().__init__(num_draft)
            self.heard = []

        def record_acceptance(self, source, drafted, accepted):
            self.heard.append(source if drafted else None)

    model, tokenizer, _ = load_model(converted("t5-v1_1"))
    decoder = SpeculativeDecoder(model, perturbed(converted("t5-v1_1"), 0.04, seed=0), tokenizer, drafter=drafter)
    prompts = PROMPTS + ["a b a b a b a b a b a b", "x = x + 1; x = x + 1; x = x + 1; x = x + 1"]
    decoder.draft_lengths[3] = policy = Heard(decoder.num_draft)
    stats = Stats()
    generations = decoder.generate_batch(prompts, max_tokens=24, ignore_eos=True, batch_size=3, stats=stats)
    for name in "drafted", "accepted", "lookup_drafted":
        assert getattr(stats, name) == sum(getattr(g.stats, name) for g in generations), name
    assert all(0 < g.stats.lookup_steps <= g.stats.main_calls for g in generations[-2:])
    assert all(g.stats.lookup_drafted <= g.stats.drafted for g in generations)
    assert stats.lookup_drafted == sum(g.stats.lookup_drafted for g in generations) > 0
    assert 0 < stats.lookup_steps <= stats.main_calls
    assert policy.heard.count("lookup") == sum(g.stats.lookup_steps for g in generations)
    # Hybrid drafts with the model wherever no lookup matches, but for a row's last token (nothing left to draft).
    no_draft = policy.heard.count(None)
    assert policy.heard.count("model") == (
        sum(g.stats.main_calls - g.stats.lookup_steps for g in generations) - no_draft
    ) * (drafter == "hybrid")
    assert no_draft <= len(prompts) if drafter == "hybrid" else no_draft > 0
    # Each row's counts are its prompt's decoded alone, where one sequence looks up as a batch does: hybrid drafts
    # at every step. (Alone, a lookup's plain steps are a run that finds a match a token late: the same tokens.)
    for prompt, generation in zip(prompts, generations):
        alone = decoder.generate(prompt, max_tokens=24, ignore_eos=True)
        assert generation.tokens == alone.tokens
        for name in "main_calls", "drafted", "accepted", "lookup_drafted", "lookup_steps":
            if drafter == "hybrid":
                assert getattr(generation.stats, name) == getattr(alone.stats, name), (prompt, name)


class ScriptedRuns(FixedDraftLength):
    """Draft lengths for a batch's steps from a repeating script. With `run` above 1, a stretch of zeros in it is taken
    as one run of plain steps (at most `run`); with 1, step by step, as a fixed length takes plain steps. Records each
    run's steps."""

    def __init__(self, script, run):
        super().__init__(0)
        self.script, self.run, self.position, self.runs = script, run, 0, []

    def entry(self, position):
        return self.script[position % len(self.script)]

    def choose_batch(self, sources, limit, unready=None):
        self.position += 1
        return min(self.entry(self.position - 1), limit)

    def plain_run(self, limit, watched=False):
        zeros = 1
        while zeros < self.run and self.entry(self.position - 1 + zeros) == 0:
            zeros += 1
        return min(zeros, limit)

    def record_run(self, steps, seconds):
        self.position += steps - 1  # (the steps the run took; the first was chosen)
        self.runs.append(steps)


@pytest.mark.parametrize("setting", ["greedy", "greedy-delta", "t1", "top-p-delta"])
def test_a_batch_run_of_plain_steps_gives_the_tokens_of_steps_taken_one_by_one(setting):
    # When no row drafts, the batch takes plain steps as regular decoding does, each built before the last is read,
    # and rows that end inside a run (at EOS, at max_tokens) leave it. Every row's tokens are those of the same draft
    # lengths taken step by step, sampling included (each step splits the row's key alike). With prompts joining
    # (a batch of 3), greedy rows are still each prompt's regular decoding.
    main_model, draft_model = tiny_pair()
    decoder = SpeculativeDecoder(
        main_model, draft_model, CountingTokenizer(12), 3, seed=5, **BATCH_SIZE_SETTINGS[setting]
    )
    prompts = ["31415926", "1212121212", "2718281828", "9", "1414", "777777", "22360", "1732050807", "123123123"]
    script = [2, 0, 0, 0, 0, 0, 3, 0, 1, 0, 0, 0]
    for ignore_eos in (True, False):
        for batch_size in (9, 3) if setting == "greedy" else (9,):
            results = {}
            for run in (1, 3, 8):
                policy = ScriptedRuns(script, run)
                generations = batch_decoder.batch_generations(
                    decoder, prompts, 14, False, ignore_eos, batch_size, draft_length=policy
                )
                results[run] = [g.tokens for _, g in sorted(generations, key=lambda pair: pair[0])]
                assert bool(policy.runs) == (run > 1), policy.runs
                assert max(policy.runs, default=0) > 2 or run == 1 or not ignore_eos, policy.runs
            assert results[3] == results[1] and results[8] == results[1], (ignore_eos, batch_size)
            if setting == "greedy":
                assert results[1] == alone(decoder, prompts, max_tokens=14, ignore_eos=ignore_eos, regular=True)
            lengths = {len(tokens) for tokens in results[1]}
            assert lengths == {14} if ignore_eos else len(lengths) > 1  # with EOS, rows end at different steps


def test_a_batch_that_never_drafts_takes_the_steps_of_regular_batched_decoding():
    # Plain steps all along, in runs of up to 64: a run ends once prompts would join (a quarter of the batch free), so
    # the batch stays about as full as regular decoding keeps it, and takes about as many batched steps.
    main_model, draft_model = tiny_pair()
    decoder = SpeculativeDecoder(main_model, draft_model, CountingTokenizer(12), 3, seed=5)
    prompts = ["31415926", "1212121212", "2718281828", "9", "1414", "777777", "22360", "1732050807", "123123123"] * 2
    for batch_size in (2, 4, 8):
        regular, plain = Stats(), Stats()
        expected = [g.tokens for g in decoder.generate_batch(prompts, 20, True, False, batch_size, regular)]
        generations = batch_decoder.batch_generations(
            decoder, prompts, 20, False, False, batch_size, plain, draft_length=ScriptedRuns([0], 64)
        )
        assert [g.tokens for _, g in sorted(generations, key=lambda pair: pair[0])] == expected
        assert abs(plain.main_calls - regular.main_calls) <= 1, (batch_size, plain.main_calls, regular.main_calls)
