"""The command line, run as a user runs it: a subprocess on tiny converted checkpoints."""

import blas

import json
import os
import select
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, save_checkpoint

import convert
import kernels
from decoder import MAX_NUM_DRAFT

# A prompt on which the tiny random "t5" model greedily writes text the tokenizer can decode.
PROMPT = "def f(x): return x"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def command(*args):
    return [sys.executable, "main.py", *map(str, args)]


def run(*args, env=ENV):
    return subprocess.run(command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def last_json(result):
    assert result.returncode == 0, result.stderr
    # --json prints nothing but the object on stdout; progress goes to stderr.
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[-1])


def assert_fails(result, *expected):
    """Exit status 2 and one `error:` line (after any loading messages), naming each of `expected`."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # Besides loading messages, a machine without OpenBLAS or the native kernels prints one `warning:` line.
    lines = result.stderr.splitlines()
    lines = [line for line in lines if line.strip() and not line.startswith(("loading ", "warning: "))]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def main_model(converted):
    return converted("t5")


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory, tokenizer_dir):
    """Same shape as the main model, other random weights: its drafts get rejected."""
    source = save_checkpoint(tmp_path_factory.mktemp("hf-draft"), "t5", tokenizer_dir, seed=1)
    path = tmp_path_factory.mktemp("mlx") / "draft"
    convert.convert(str(source), mlx_path=str(path))
    return path


def test_json_speculative_and_regular_greedy_agree(main_model, draft_model):
    from transformers import AutoTokenizer

    common = ["--model-name", main_model, "--prompt", PROMPT, "-m", 12, "--json"]
    # The draft is not loaded for --regular-decode, so a missing one is no error.
    regular = last_json(run(*common, "--draft-model-name", "no-such-draft", "--regular-decode"))
    # A draft whose tokens are rejected, and the main model as its own draft, whose tokens are all accepted.
    rejected = last_json(run(*common, "--draft-model-name", draft_model, "--num-draft", 3))
    accepted = last_json(run(*common, "--draft-model-name", main_model, "--num-draft", 3))

    for result in (regular, rejected, accepted):
        assert {"text", "tokens", "stats", "model", "draft_model", "settings"} <= set(result)
        assert 1 <= len(result["tokens"]) <= 12
        assert result["model"] == str(main_model)
        stats = result["stats"]
        assert {"accepted", "drafted", "acceptance_rate", "main_calls", "seconds", "generated"} <= set(stats)
        assert stats["generated"] == len(result["tokens"])
        assert 0 <= stats["accepted"] <= stats["drafted"]
    tokenizer = AutoTokenizer.from_pretrained(str(main_model))
    assert regular["text"] == tokenizer.decode(regular["tokens"], skip_special_tokens=True)
    assert regular["text"].strip()
    assert regular["draft_model"] is None and regular["settings"]["regular"] is True
    assert regular["stats"]["drafted"] == 0
    assert regular["stats"]["main_calls"] == len(regular["tokens"])

    for speculative, draft in ((rejected, draft_model), (accepted, main_model)):
        assert speculative["tokens"] == regular["tokens"]
        assert speculative["text"] == regular["text"]
        assert speculative["draft_model"] == str(draft)
        assert speculative["settings"]["num_draft"] == 3 and speculative["settings"]["regular"] is False
        assert speculative["stats"]["drafted"] > 0
    assert rejected["stats"]["acceptance_rate"] < 1
    assert rejected["stats"]["mean_num_draft"] == rejected["stats"]["drafted"] / rejected["stats"]["main_calls"]
    assert rejected["stats"]["lookup_share"] == 0
    # Lookup drafts need no draft model: a missing one is no error, and the tokens are the same.
    lookup = run(*common, "--draft-model-name", "no-such-draft", "--drafter", "lookup", "--num-draft", 2)
    assert last_json(lookup)["tokens"] == regular["tokens"] and "loading draft model" not in lookup.stderr
    assert last_json(lookup)["settings"]["drafter"] == "lookup"
    assert accepted["stats"]["acceptance_rate"] == 1
    assert accepted["stats"]["main_calls"] < regular["stats"]["main_calls"]


def test_json_stats_name_the_active_blas(main_model):
    common = ["--model-name", main_model, "--regular-decode", "--prompt", PROMPT, "-m", 4, "--json"]
    # This process chose its BLAS by the same rules (tests import blas first).
    assert last_json(run(*common))["stats"]["blas"] == blas.active
    opted_out = last_json(run(*common, env={**ENV, blas.ENV_VAR: "none"}))["stats"]
    assert opted_out["blas"] == "bundled reference BLAS (T5_BLAS=none)"
    assert opted_out["backend"].startswith("cpu, BLAS " + opted_out["blas"]) or opted_out["backend"] == "gpu"


@pytest.mark.parametrize("source", ["prompt", "prompt file"])
def test_json_stats_name_the_kernels_that_ran(main_model, tmp_path, source):
    common = ["--model-name", main_model, "--regular-decode", "-m", 4, "--json"]
    if source == "prompt file":
        (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
        common += ["--prompt-file", tmp_path / "prompts.txt"]
    stats = last_json(run(*common, "--prompt", PROMPT))["stats"]
    assert stats["kernels"] == kernels.active and f"kernels {stats['kernels']}" in stats["backend"]
    assert stats["blas"] == blas.active
    if kernels.native is not None:
        # The layers and the cross-attention's projections run natively, as one operation each.
        assert {"native decoder layers", "native encoder layers", "native cross projections"} <= set(
            stats["kernels_ran"]
        )
    switched_off = last_json(run(*common, env={**ENV, kernels.ENV_VAR: "0"}))["stats"]
    assert switched_off["kernels"] == "mlx (T5_KERNELS=0)"
    assert switched_off["kernels_ran"] and all(name.startswith("mlx") for name in switched_off["kernels_ran"])


def test_human_output_streams_text_then_stats(main_model):
    # Sampling with a fixed seed and draft length: the same text twice, and varied enough to be worth comparing.
    # (With --num-draft auto the step lengths follow measured times, and the text drawn with them.)
    sampling = ["--temperature", 1.0, "--top-k", 100, "--top-p", 0.95, "--seed", 3, "-m", 16]
    common = ["--model-name", main_model, "--draft-model-name", main_model, "--num-draft", 5, *sampling]
    expected = last_json(run(*common, "--json"))
    assert expected["settings"] == dict(
        drafter="model",
        num_draft=5,
        max_num_draft=MAX_NUM_DRAFT,
        max_ngram=3,
        delta=0.0,
        temperature=1.0,
        top_k=100,
        top_p=0.95,
        seed=3,
        max_tokens=16,
        regular=False,
        ignore_eos=False,
    )

    result = run(*common)
    assert result.returncode == 0, result.stderr
    assert expected["text"].strip()
    assert result.stdout.startswith(expected["text"] + "\n")
    # The main model as its own draft: every draft is accepted.
    drafted = expected["stats"]["drafted"]
    assert f"Acceptance: {drafted}/{drafted} drafted tokens (100.0%)" in result.stdout
    assert f"Main-model calls: {expected['stats']['main_calls']}" in result.stdout
    assert f"{len(expected['tokens'])} tokens" in result.stdout and "tokens-per-sec" in result.stdout
    assert "Time:" in result.stdout
    assert f"Backend: {expected['stats']['backend']}" in result.stdout
    assert f"loading main model from {main_model}" in result.stderr
    assert "loading" not in result.stdout

    regular = run("--model-name", main_model, "--regular-decode", *sampling)
    assert regular.returncode == 0, regular.stderr
    assert "Acceptance" not in regular.stdout and "Main-model calls: " in regular.stdout
    assert "loading draft model" not in regular.stderr


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num-draft", 0], "--num-draft"),
        (["--num-draft", "-2"], "--num-draft"),
        (["--num-draft", "many"], "--num-draft"),
        (["--num-draft", "1.5"], "--num-draft"),
        (["--max-num-draft", 0], "--max-num-draft"),
        (["--drafter", "lookup", "--max-ngram", 0], "--max-ngram"),
        (["--delta", 1.5], "--delta"),
        (["--delta", -0.1], "--delta"),
        (["--delta", "nan"], "--delta"),
        (["--temperature", -1], "--temperature"),
        (["--top-p", 0], "--top-p"),
        (["--top-p", 1.1], "--top-p"),
        (["--top-k", -1], "--top-k"),
        (["--max-tokens", 0], "--max-tokens"),
        (["--prompt", ""], "--prompt"),
        (["--prompt", " \n\t "], "--prompt"),
    ],
)
def test_bad_flags_fail_before_loading(flags, expected):
    # The models do not exist: a flag error shows that the flags are checked first.
    result = run("--model-name", "no-such-t5", *flags)
    assert_fails(result, expected)
    assert "loading" not in result.stderr


def test_missing_models_print_the_convert_command(main_model, tmp_path):
    assert_fails(run("--model-name", "no-such-t5"), "mlx_models/no-such-t5", "python convert.py --model no-such-t5")
    # Found missing before the main model loads.
    result = run("--model-name", main_model, "--draft-model-name", "no-such-draft")
    line = assert_fails(result, "draft", "python convert.py --model no-such-draft")
    assert "--mlx-path" not in line and "loading" not in result.stderr
    missing = tmp_path / "t5-missing"
    assert_fails(run("--model-name", missing), f"python convert.py --model t5-missing --mlx-path {missing}")


def test_broken_model_directories(main_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_fails(run("--model-name", empty, "--regular-decode"), "config.json", "python convert.py")
    truncated = tmp_path / "truncated"
    shutil.copytree(main_model, truncated)
    for weights in truncated.glob("*.safetensors"):
        os.truncate(weights, weights.stat().st_size // 2)
    assert_fails(run("--model-name", truncated, "--regular-decode"), "truncated", "--force")


def test_draft_with_another_vocabulary(main_model, converted):
    assert_fails(run("--model-name", main_model, "--draft-model-name", converted("byt5")), "draft", "--regular-decode")


def test_interrupt_exits_quietly(main_model):
    # Long enough that the signal arrives mid-generation.
    args = ["--model-name", main_model, "--regular-decode", "--ignore-eos", "--temperature", 1]
    args += ["-m", 1_000_000]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(command(*args), cwd=ROOT, env=ENV, **pipes) as process:
        # Text is streaming: wait for its first character, but not forever (a hang fails instead of stopping the run).
        ready, _, _ = select.select([process.stdout], [], [], 120)
        if not ready:
            process.kill()
            pytest.fail("no text streamed within 120 s")
        process.stdout.read(1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr


PROMPTS = ["def f(x): return x", "a", "class attributes are looked up in the dictionary of the class"]


def test_prompt_file_decodes_every_prompt_in_order(main_model, draft_model, tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n{PROMPTS[2]}\n")
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("".join(json.dumps({"prompt": prompt, "id": i}) + "\n" for i, prompt in enumerate(PROMPTS)))
    common = ["--model-name", main_model, "--draft-model-name", draft_model, "-m", 10]
    alone = [last_json(run(*common, "--prompt", prompt, "--json")) for prompt in PROMPTS]
    for path, batch_size in ((plain, 2), (lines, 8)):
        result = last_json(run(*common, "--prompt-file", path, "--batch-size", batch_size, "--json"))
        assert [r["prompt"] for r in result["results"]] == PROMPTS
        assert [r["tokens"] for r in result["results"]] == [single["tokens"] for single in alone]
        assert [r["text"] for r in result["results"]] == [single["text"] for single in alone]
        stats = result["stats"]
        assert stats["generated"] == sum(len(single["tokens"]) for single in alone)
        assert {"seconds", "tokens_per_second", "acceptance_rate", "accepted", "drafted"} <= set(stats)
        assert result["settings"]["batch_size"] == batch_size

    text = run(*common, "--prompt-file", plain, "--batch-size", 2)
    assert text.returncode == 0, text.stderr
    outputs, summary = text.stdout.split("Prompts: 3, 2 at a time\n")
    assert "Generation: " in summary
    blocks = outputs.split("=== prompt ")[1:]
    assert [block.split("\n", 1)[1].strip() for block in blocks] == [single["text"] for single in alone]
    assert "3/3" in text.stderr  # the progress bar


@pytest.mark.parametrize(
    "contents, flags, expected",
    [
        (None, [], "no prompt file"),
        ("\n  \n", [], "has no prompts"),
        ('{"prompt": "a"}\n{"text": "b"}\n', [], 'line 2 has no "prompt"'),
        ("a\n", ["--batch-size", 0], "--batch-size must be at least 1"),
    ],
    ids=["missing", "empty", "jsonl-without-prompt", "batch-size"],
)
def test_prompt_file_errors(contents, flags, expected, main_model, tmp_path):
    path = tmp_path / "prompts.txt"
    if contents is not None:
        path.write_text(contents)
    assert_fails(run("--model-name", main_model, "--regular-decode", "--prompt-file", path, *flags), expected)
