"""benchmarks/decode_step.py's parts on tiny random models: CTranslate2's greedy tokens against transformers', the
decode calls a run makes, and the operations a decode step builds."""

import subprocess
import sys
import time

import pytest
import torch
from conftest import PROMPTS, ROOT

import kernels
from benchmarks import decode_step
from decoder import SpeculativeDecoder
from loader import load_model


@pytest.mark.parametrize("random_weights", [False, True])
def test_ctranslate2_greedy_gives_transformers_greedy_tokens(random_weights, hf_checkpoint, hf_model, tmp_path):
    # Ended by the decoder start token (a trained model's) or by EOS past the last token (a random model's): the same
    # greedy tokens from this random checkpoint, which chooses neither.
    pytest.importorskip("ctranslate2")
    import convert

    # CTranslate2 knows the tokenizer's ids only: the model has no others.
    path = hf_checkpoint("t5-v1_1", vocab_size=350)
    model, tokenizer, _ = load_model(convert.convert(str(path), mlx_path=str(tmp_path / "mlx")))
    assert len(tokenizer) == 350
    reference = hf_model(path)
    greedy = decode_step.CTranslate2Greedy(path, tmp_path, tokenizer, random_weights=random_weights)
    decoder = SpeculativeDecoder(model, None, tokenizer)
    for prompt in PROMPTS:
        input_ids = torch.tensor([tokenizer(prompt).input_ids])
        with torch.no_grad():
            expected = reference.generate(
                input_ids, max_new_tokens=40, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0
            )[0, 1:].tolist()
        assert greedy.generate(prompt, 40) == expected
        assert 0 not in expected and 1 not in expected
        assert decoder.generate(prompt, max_tokens=40, regular=True, ignore_eos=True).tokens == expected
    greedy.close()


def test_call_log_sees_every_decode_call(main, drafts):
    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft=3)
    with decode_step.CallLog(model) as main_log, decode_step.CallLog(drafts["noisy"]) as draft_log:
        stats = decoder.generate(PROMPTS[0], max_tokens=10, ignore_eos=True).stats
    main_calls = main_log.calls + main_log.choices
    assert sum(main_calls.values()) == stats.main_calls
    # Greedy verifications are one call of the main model's choices (native layers), else one decode call.
    assert sum(main_log.choices.values()) == (stats.main_calls if kernels.native is not None else 0)
    # Each verification is one row of its drafts and the token before them.
    assert sum(tokens * count for (_, tokens), count in main_calls.items()) == stats.main_calls + stats.drafted
    # Greedy drafts are one call per verification (native layers), else one decode call per draft.
    greedy = sum(count * n for (_, count), n in draft_log.drafts.items())
    assert sum(draft_log.calls.values()) + greedy == stats.drafted
    assert greedy == (stats.drafted if kernels.native is not None else 0)
    assert not {"decode", "greedy_choices", "greedy_draft"} & set(vars(model))  # the model's own methods again


@pytest.mark.parametrize("regular", [True, False])
def test_loop_share_is_measured_against_the_same_calls_made_again(regular, main, drafts, monkeypatch):
    # The steps a run is measured against are its own model calls made again in the same order, each with the same
    # input and a cache of the length the call met in the run; two prompts, two rounds.
    model, tokenizer, _ = main
    draft_model = drafts["noisy"]
    seen = {"run": [], "replay": []}
    phase = ["run"]
    for name in decode_step.CallLog.METHODS:
        for m in (model, draft_model):
            method = getattr(m, name)

            def seen_call(decoder_ids, cross_kv, cache, *args, method=method, m=m, **kwargs):
                result = method(decoder_ids, cross_kv, cache, *args, **kwargs)
                if result is not None:
                    seen[phase[0]].append((m is model, decoder_ids.tolist(), cache[0].offset, args))
                return result

            monkeypatch.setattr(m, name, seen_call)
    replay_seconds = decode_step.replay_seconds

    def replay(calls_made):
        phase[0] = "replay"
        seconds = replay_seconds(calls_made)
        phase[0] = "run"
        return seconds

    monkeypatch.setattr(decode_step, "replay_seconds", replay)
    monkeypatch.setattr(decode_step, "PAUSE", 0.01)
    decoder = SpeculativeDecoder(model, draft_model, tokenizer, num_draft=3)
    runs = []
    generate = decoder.generate
    monkeypatch.setattr(decoder, "generate", lambda *a, **k: runs.append(generate(*a, **k)) or runs[-1])
    share, replayed_share, stats = decode_step.loop_share(decoder, PROMPTS[1:3], 8, regular, repeats=2)
    assert len(runs) == 5 and (stats.main_calls == 8 or not regular)
    # The warm-up run is not replayed; every timed run's calls are, in order, the same inputs, the same cache lengths.
    warm_up = len(seen["run"]) - len(seen["replay"])
    assert warm_up > 0 and seen["replay"] == seen["run"][warm_up:]
    assert sum(1 for call in seen["replay"] if call[0]) == sum(run.stats.main_calls for run in runs[1:])
    assert any(not call[0] for call in seen["replay"]) == (not regular)
    # A run costs its steps and some Python: not less than half its steps, nor ten times them; within the run, no
    # less than the host's time on its steps.
    assert -0.5 < replayed_share < 10
    assert 0 <= share < 10


def test_step_clock_counts_the_models_steps_and_not_the_loops_own(main, drafts, monkeypatch):
    # A pause added to each step's bookkeeping (record_step) is the loop's own; one added inside each main-model call
    # is the steps'.
    import decoder as decoder_module

    model, tokenizer, _ = main
    decoder = SpeculativeDecoder(model, drafts["noisy"], tokenizer, num_draft=3)
    pause = 0.003

    def run():
        with decode_step.StepClock(decoder) as clock:
            stats = decoder.generate(PROMPTS[0], max_tokens=12, ignore_eos=True).stats
        return stats.seconds - stats.encode_seconds - clock.seconds, clock.seconds, stats.main_calls

    def slowed(function):
        def slow(*args, **kwargs):
            time.sleep(pause)
            return function(*args, **kwargs)

        return slow

    run()
    own, steps, calls = run()
    assert calls > 3 and own > 0 and steps > 0
    with monkeypatch.context() as patch:
        patch.setattr(decoder_module, "record_step", slowed(decoder_module.record_step))
        slow_own, slow_steps, _ = run()
    assert slow_own - own > 0.9 * pause * calls and slow_steps - steps < 0.5 * pause * calls
    with monkeypatch.context() as patch:
        for name in ("decode", "greedy_choices"):
            patch.setattr(model, name, slowed(getattr(model, name)))
        slow_own, slow_steps, _ = run()
    assert slow_steps - steps > 0.9 * pause * calls and slow_own - own < 0.5 * pause * calls
    assert not {"plain_step", "step"} & set(vars(decoder)) and decoder_module.waited.__name__ == "waited"


@pytest.mark.parametrize("native_layers", [False, True])
def test_operations_per_decoder_layer(native_layers, hf_checkpoint, tmp_path, monkeypatch):
    # MLX's operations: each layer adds the same number; the native decoder layers: one operation for all of them.
    import convert
    import kernels

    if native_layers and kernels.native is None:
        pytest.skip("native kernels not built")
    monkeypatch.setattr(kernels, "fused_layers", native_layers)
    counts = []
    for layers in (1, 2, 3):
        checkpoint = hf_checkpoint("t5", num_decoder_layers=layers)
        path = convert.convert(str(checkpoint), mlx_path=str(tmp_path / f"{layers}"))
        counts.append(decode_step.operation_count(load_model(path)[0]))
    totals = [sum(count.values()) for count in counts]
    if native_layers:
        assert totals[0] == totals[1] == totals[2] > 0
        assert all(count["DecoderLayers"] == 1 for count in counts)
    else:
        assert totals[2] - totals[1] == totals[1] - totals[0] > 0
        assert all("DecoderLayers" not in count for count in counts)


def test_bad_arguments_are_one_line_errors():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_step", "--repeats", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
