"""--num-draft auto's cache: step costs measured once per setting and reused, measured again when the setting changes
or the file is unreadable (one warning); acceptance remembered from one run to the next. Each test has a cache
directory of its own."""

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PROMPTS

import kernels
import step_costs
from decoder import SpeculativeDecoder
from draft_length import Acceptance, AutoDraftLength


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(step_costs.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(step_costs, "warned", set())
    monkeypatch.setattr(step_costs, "pending", {})
    monkeypatch.setattr(step_costs, "last_written", {})
    return tmp_path


@pytest.fixture
def measured(monkeypatch):
    """The settings step costs were measured for, in order."""
    calls = []
    measure = step_costs.measure

    def counting(decoder, source, batch_size):
        calls.append((source, batch_size))
        return measure(decoder, source, batch_size)

    monkeypatch.setattr(step_costs, "measure", counting)
    return calls


def auto_stats(main, draft_model, **options):
    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft="auto", max_num_draft=3, **options)
    return decoder.generate(PROMPTS[0], max_tokens=8, ignore_eos=True).stats


def test_costs_are_measured_once_kept_and_reused(cache, measured, main, drafts):
    first = auto_stats(main, drafts["noisy"])
    assert first.costs_cached is False and first.calibration_seconds > 0
    assert measured == [("model", 1)]
    (path,) = (cache / "step-costs").iterdir()
    record = json.loads(path.read_text())
    seconds = record["seconds"]["model"]
    assert len(seconds) == 4 and all(t > 0 for t in seconds)
    # Beside them, what a draft model's step computes beyond the table's, per token.
    assert set(record["setup"]) == {"encode", "catch_up"} and all(t >= 0 for t in record["setup"].values())
    # A new decoder (a new run) of the same setting reads them; so does a draft of the same shape.
    again = auto_stats(main, drafts["unrelated"])
    assert again.costs_cached is True and again.calibration_seconds == 0
    assert measured == [("model", 1)]
    # Regular decoding and fixed lengths neither measure nor say they did.
    model, tokenizer, _ = main
    assert SpeculativeDecoder(model, None, tokenizer).generate("a", 4, regular=True).stats.costs_cached is None


def test_a_changed_setting_measures_again(cache, measured, main, drafts, monkeypatch):
    auto_stats(main, drafts["noisy"])
    auto_stats(main, drafts["noisy"], drafter="lookup")
    monkeypatch.setenv("T5_KERNEL_THREADS", "1")
    assert auto_stats(main, drafts["noisy"]).costs_cached is False
    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft="auto", max_num_draft=3)
    decoder.generate_batch(PROMPTS[:2], max_tokens=4, ignore_eos=True, batch_size=2)
    assert measured == [("model", 1), ("lookup", 1), ("model", 1), ("model", 2)]
    assert len(list((cache / "step-costs").iterdir())) == 4
    # A rebuilt kernel library (another file) measures again too.
    if kernels.native is not None:
        build = Path(kernels.native.__file__)
        os.utime(build, ns=(build.stat().st_atime_ns, build.stat().st_mtime_ns + 1))
        assert auto_stats(main, drafts["noisy"]).costs_cached is False
        assert len(list((cache / "step-costs").iterdir())) == 5


NO_SETUP = '{"seconds": {"model": [0.1, 0.1, 0.1, 0.1]}}'


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"seconds": {"model": [0.1]}}', NO_SETUP])
def test_an_unreadable_cache_file_is_replaced_after_one_warning(content, cache, measured, main, drafts, capsys):
    auto_stats(main, drafts["noisy"])
    (path,) = (cache / "step-costs").iterdir()
    path.write_text(content)
    capsys.readouterr()
    stats = auto_stats(main, drafts["noisy"])
    assert stats.costs_cached is False and len(measured) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(path) in warnings[0], warnings
    assert len(json.loads(path.read_text())["seconds"]["model"]) == 4
    assert auto_stats(main, drafts["noisy"]).costs_cached is True
    assert not capsys.readouterr().err


def test_acceptance_is_remembered_per_pair_and_drafter(cache, main, drafts):
    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, drafts["self"], tokenizer, num_draft="auto", max_num_draft=3)
    # Costs under which drafting pays, so that it drafts.
    decoder.acceptance = Acceptance()
    decoder.draft_lengths[1] = AutoDraftLength(3, {"model": [1.0, 1.1, 1.2, 1.3]}, decoder.acceptance)
    decoder.generate(PROMPTS[4], max_tokens=40, ignore_eos=True)
    counts = decoder.acceptance.to_dict()["model"]
    assert counts and all(accepted == tried for accepted, tried in counts)  # the model drafting for itself
    later = SpeculativeDecoder(model, drafts["self"], tokenizer, num_draft="auto", max_num_draft=3)
    assert later.remembered_acceptance().to_dict()["model"] == counts
    # And the steps since the last try of another length, which pay for the next try whatever run it falls in.
    assert decoder.acceptance.since_try > 0
    assert later.remembered_acceptance().since_try == decoder.acceptance.since_try
    # Another draft, or another drafter, starts afresh.
    other = SpeculativeDecoder(model, drafts["unrelated"], tokenizer, num_draft="auto", max_num_draft=3)
    lookup = SpeculativeDecoder(model, drafts["self"], tokenizer, num_draft="auto", drafter="hybrid")
    assert other.remembered_acceptance().to_dict() == lookup.remembered_acceptance().to_dict() == {}


def test_acceptance_written_again_soon_waits_for_the_next_write_or_exit(cache, monkeypatch):
    """A loop of short generations does not write the file after each: a record within WRITE_INTERVAL of the last
    write waits (reads see it), and is written by the next write after the interval, or at exit."""
    clock = [100.0]
    monkeypatch.setattr(step_costs.time, "monotonic", lambda: clock[0])
    path = cache / "acceptance" / "pair.json"
    step_costs.write_soon(path, {"counts": 1})
    assert json.loads(path.read_text()) == {"counts": 1}
    clock[0] += 1.0
    step_costs.write_soon(path, {"counts": 2})
    assert json.loads(path.read_text()) == {"counts": 1} and step_costs.read(path) == {"counts": 2}
    clock[0] += 1.5
    step_costs.write_soon(path, {"counts": 3})
    assert json.loads(path.read_text()) == {"counts": 3} and not step_costs.pending
    clock[0] += 0.5
    step_costs.write_soon(path, {"counts": 4})
    step_costs.flush()  # as at exit
    assert json.loads(path.read_text()) == {"counts": 4} and not step_costs.pending


def test_auto_learns_only_from_the_drafts_an_output_keeps(cache, main, drafts, monkeypatch):
    """The model drafting for itself agrees with every draft. A draft ends at an EOS that ends the output: nothing past
    it is drafted or verified, and neither the stats nor the policy's estimates count anything past it."""
    model, tokenizer, _ = main
    plain = SpeculativeDecoder(model, None, tokenizer).generate(
        PROMPTS[0], max_tokens=16, regular=True, ignore_eos=True
    )
    # An EOS the output reaches as a draft with drafts after it, in steps of 3 drafts and the main model's token (the
    # self-draft agrees on everything): the first new token at index 4s or 4s + 1 for some step s >= 1.
    eos = next(i for i in range(4, 16) if i % 4 < 2 and plain.tokens[i] not in plain.tokens[:i])
    monkeypatch.setattr(model.args, "eos_token_id", plain.tokens[eos])
    observed = []
    record = AutoDraftLength.record_acceptance
    monkeypatch.setattr(
        AutoDraftLength,
        "record_acceptance",
        lambda self, source, drafted, accepted: observed.append((drafted, accepted))
        or record(self, source, drafted, accepted),
    )
    decoder = SpeculativeDecoder(model, drafts["self"], tokenizer, num_draft="auto", max_num_draft=3)
    decoder.acceptance = Acceptance()
    decoder.draft_lengths[1] = AutoDraftLength(3, {"model": [1.0, 1.01, 1.02, 1.03]}, decoder.acceptance)
    generation = decoder.generate(PROMPTS[0], max_tokens=16)
    assert generation.tokens == plain.tokens[: eos + 1]
    stats = generation.stats
    assert stats.accepted == stats.drafted == sum(drafted for drafted, _ in observed) > 0
    # Whole steps, then the one whose draft ends at the EOS.
    assert observed == [(3, 3)] * (eos // 4) + [(eos % 4 + 1, eos % 4 + 1)]


def test_measured_costs_are_smoothed_along_the_draft_length():
    # An exact quadratic from one draft on comes back as it is; plain steps (k = 0) are never changed.
    quadratic = [0.5] + [1.0 + 0.2 * k + 0.01 * k * k for k in range(1, 13)]
    assert step_costs.smoothed(quadratic) == pytest.approx(quadratic, rel=1e-9)
    # A dip and a spike of a busy machine are evened out: the table rises with k and stays nearer the trend than half
    # of the largest disturbance (20%).
    noisy = list(quadratic)
    noisy[8] *= 0.85
    noisy[11] *= 1.2
    smooth = step_costs.smoothed(noisy)
    assert smooth[0] == noisy[0]
    assert all(a <= b for a, b in zip(smooth[1:], smooth[2:]))
    assert max(abs(s - q) / q for s, q in zip(smooth[1:], quadratic[1:])) < 0.1
    # Too few lengths to fit: as measured.
    assert step_costs.smoothed([0.5, 1.0, 0.9]) == [0.5, 1.0, 0.9]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_plain_steps_are_timed_as_auto_takes_them_a_run_at_a_time(main, drafts, monkeypatch, batch_size):
    # Plain steps are timed through the run auto takes (plain_tokens for one row, batch_decoder.plain_steps for
    # a batch), from one token (or batched step) to the next: on a clock that gains a quarter of a second with each, the
    # table's plain step is that.
    import batch_decoder
    import decoder as decoder_module

    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft="auto", max_num_draft=3)
    offset, runs = [0.0], []
    clock = SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0], monotonic=time.monotonic)
    if batch_size == 1:
        plain_tokens = SpeculativeDecoder.plain_tokens

        def ticking(self, token, count, *rest):
            runs.append(count)
            for generated in plain_tokens(self, token, count, *rest):
                offset[0] += 0.25
                yield generated

        monkeypatch.setattr(SpeculativeDecoder, "plain_tokens", ticking)
        monkeypatch.setattr(decoder_module, "time", clock)
    else:
        read_step = batch_decoder.read_step

        def ticking(*args):
            offset[0] += 0.25  # (as each batched step's tokens are read)
            return read_step(*args)

        plain_steps = batch_decoder.plain_steps

        def counted(*args, **options):
            runs.append(options["run"])
            return (yield from plain_steps(*args, **options))

        monkeypatch.setattr(batch_decoder, "plain_steps", counted)
        monkeypatch.setattr(batch_decoder, "read_step", ticking)
        monkeypatch.setattr(batch_decoder, "time", clock)
    table = step_costs.measure(decoder, "model", batch_size)
    assert runs and set(runs) == {step_costs.BLOCK + 1}
    assert table[0] == pytest.approx(0.25, abs=0.02)
    assert all(t < 0.25 for t in table[1:])  # drafting steps, on the real clock


def test_plain_steps_are_timed_in_runs_as_long_as_those_auto_takes(main, drafts, monkeypatch):
    # The first steps of a run cost more (here three at 3 ms, then 1 ms each, on a clock that is nothing else): the
    # warm-up's run of BLOCK + 1 steps (1.5 ms a step from its second on) sets the timed runs' length to PLAIN_RUN
    # (50 ms of such steps would be more), whose mean from its second step is the table's plain step. A run of BLOCK + 1
    # would have put it at 1.5 ms.
    import decoder as decoder_module

    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft="auto", max_num_draft=3)
    now, runs = [0.0], []
    monkeypatch.setattr(decoder_module, "time", SimpleNamespace(perf_counter=lambda: now[0], monotonic=time.monotonic))
    plain_tokens = SpeculativeDecoder.plain_tokens

    def ticking(self, token, count, *rest):
        runs.append(count)
        for index, generated in enumerate(plain_tokens(self, token, count, *rest)):
            now[0] += 0.003 if index < 3 else 0.001
            yield generated

    monkeypatch.setattr(SpeculativeDecoder, "plain_tokens", ticking)
    table = step_costs.measure(decoder, "model", 1)
    assert runs[0] == step_costs.BLOCK + 1 and len(runs) > 1
    assert set(runs[1:]) == {step_costs.PLAIN_RUN}
    assert table[0] == pytest.approx((0.003 + (step_costs.PLAIN_RUN - 3) * 0.001) / (step_costs.PLAIN_RUN - 2))


def test_long_drafts_are_read_off_the_curve_through_those_measured():
    # Fifteen drafts: eight lengths timed (plain steps, 1-3 and four spread up to 15); an exact quadratic through
    # them gives every length's entry.
    lengths = step_costs.measured_lengths(15)
    assert lengths == [0, 1, 2, 3, 6, 9, 12, 15]
    assert step_costs.measured_lengths(8) == list(range(9))
    quadratic = [0.5] + [1.0 + 0.2 * k + 0.01 * k * k for k in range(1, 16)]
    assert step_costs.smoothed([quadratic[k] for k in lengths], lengths) == pytest.approx(quadratic, rel=1e-9)


@pytest.mark.parametrize("seconds_a_call", [0.0, 10.0])
def test_rounds_of_measuring_stop_where_a_round_takes_seconds(main, drafts, monkeypatch, seconds_a_call):
    # The warm-up round takes plain steps and the longest drafts first. A round that takes seconds (a large model: here
    # a clock that gains ten seconds at each reading) times the lengths measured_lengths picks, once; a fast one
    # (the demo pair) warms up and times every length, at least three times.
    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft="auto", max_num_draft=12)
    blocks = []
    block = step_costs.Schedule.block

    def recorded(self, k):
        blocks.append((self.warm_up, k))
        return block(self, k)

    offset = [0.0]

    def perf_counter():
        offset[0] += seconds_a_call
        return time.perf_counter() + offset[0]

    monkeypatch.setattr(step_costs.Schedule, "block", recorded)
    monkeypatch.setattr(step_costs, "time", SimpleNamespace(perf_counter=perf_counter))
    table = step_costs.measure(decoder, "model", 1)
    assert len(table) == 13 and all(t > 0 for t in table)
    lengths = step_costs.measured_lengths(12) if seconds_a_call else list(range(13))
    warmed = [k for warm_up, k in blocks if warm_up]
    assert warmed == [0, 12] if seconds_a_call else warmed == [0, 12] + list(range(1, 12))
    timed = [k for warm_up, k in blocks if not warm_up]
    assert len(timed) % len(lengths) == 0 and timed[: len(lengths)] == lengths
    rounds = len(timed) // len(lengths)
    assert rounds == 1 if seconds_a_call else rounds >= step_costs.MIN_ROUNDS
