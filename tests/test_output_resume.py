"""--prompt-file runs that are stopped and resumed (--output, --resume), and prompts refused because they would not fit
in memory: run as a user runs them, except where the memory a test needs to be short of is made smaller."""

import json
import random
import signal
import subprocess
import time

import mlx.core as mx
import pytest
from conftest import ROOT
from test_main import ENV, assert_fails, command, last_json, run

import main as main_module
import memory_fit
import model as model_module
from loader import load_model

PROMPTS = [f"def f{i}(x): return x * {i} + {'y' * (i % 5)}" for i in range(60)]
FIELDS = ("index", "prompt", "text", "tokens")


@pytest.fixture(scope="module")
def main_model(converted):
    return converted("t5")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def flags(main_model, prompt_file, *extra):
    common = ["--model-name", main_model, "--regular-decode", "--ignore-eos", "-m", 40, "--batch-size", 3]
    return common + ["--prompt-file", prompt_file, *extra]


def results(path):
    """Each result line's fields that must not depend on how the run went (not its timings), by index."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len({line["index"] for line in lines}), "a prompt written twice"
    return sorted(tuple(json.dumps(line[field]) for field in FIELDS) for line in lines)


@pytest.fixture(scope="module")
def uninterrupted(main_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    output = folder / "results.jsonl"
    result = run(*flags(main_model, folder / "prompts.txt"), "--output", output, "--json")
    everything = last_json(result)["results"]
    assert [line["prompt"] for line in everything] == PROMPTS
    lines = results(output)
    assert len(lines) == len(PROMPTS)
    # The lines are the results --json prints, in the prompt file's order.
    assert lines == sorted(tuple(json.dumps(line[field]) for field in FIELDS) for line in everything)
    indices = [json.loads(line)["index"] for line in output.read_text().splitlines()]
    assert indices == list(range(len(PROMPTS)))
    return lines


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
@pytest.mark.parametrize("cut", [False, True], ids=["whole-lines", "last-line-cut"])
def test_a_stopped_run_resumed_gives_the_uninterrupted_results(stop, cut, main_model, prompt_file, uninterrupted):
    output = prompt_file.parent / "results.jsonl"
    # Stopped once the output holds a random number of results: some done, most not.
    wanted = random.Random(f"{stop}{cut}").randrange(1, len(PROMPTS) // 2)
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(
        command(*flags(main_model, prompt_file), "--output", output), cwd=ROOT, env=ENV, **pipes
    ) as p:
        while p.poll() is None and (not output.exists() or output.read_text().count("\n") < wanted):
            time.sleep(0.002)
        p.send_signal(stop)
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == (130 if stop == signal.SIGINT else -signal.SIGKILL), stderr
    kept = output.read_text().count("\n")
    assert wanted <= kept < len(PROMPTS)
    # What a stopped run kept is the first prompts of the file, in order.
    kept_indices = [json.loads(line)["index"] for line in output.read_text().splitlines()[:kept]]
    assert kept_indices == list(range(kept))
    if stop == signal.SIGINT:
        assert "Traceback" not in stderr
        summary = stderr.strip().splitlines()[-1]
        assert summary.startswith("interrupted: ") and f"{kept} results written to {output}" in summary, summary
    if cut:  # as a kill in the middle of a write leaves the last line
        text = output.read_text()
        output.write_text(text[: len(text) - 20])
    resumed = run(*flags(main_model, prompt_file), "--output", output, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert results(output) == uninterrupted


def test_a_sampled_run_resumed_draws_what_the_uninterrupted_run_drew(main_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:12]) + "\n")
    sampled = ("--temperature", "1", "--seed", "3")
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert run(*flags(main_model, prompts, *sampled), "--output", whole).returncode == 0
    # A run that got as far as the first five prompts, then resumed: the rest draw as they did in one go.
    part.write_text("".join(whole.read_text().splitlines(keepends=True)[:5]))
    assert run(*flags(main_model, prompts, *sampled), "--output", part, "--resume").returncode == 0
    assert results(part) == results(whole)
    texts = {json.loads(line)["text"] for line in whole.read_text().splitlines()}
    assert len(texts) > 1  # sampled: the prompts differ, and so do their draws


def test_resume_of_a_finished_run_decodes_nothing(main_model, prompt_file, uninterrupted):
    output = prompt_file.parent / "results.jsonl"
    assert run(*flags(main_model, prompt_file), "--output", output).returncode == 0
    before = output.read_text()
    result = last_json(run(*flags(main_model, prompt_file), "--output", output, "--resume", "--json"))
    assert output.read_text() == before
    assert result["stats"]["generated"] == 0
    assert sorted(tuple(json.dumps(line[field]) for field in FIELDS) for line in result["results"]) == uninterrupted


def test_output_refuses_to_overwrite_or_resume_another_run(main_model, prompt_file, tmp_path):
    existing = tmp_path / "mine.jsonl"
    existing.write_text('{"a": 1}\n')
    assert_fails(run(*flags(main_model, prompt_file), "--output", existing), "exists", "--resume")
    assert_fails(run(*flags(main_model, prompt_file), "--output", existing, "--resume"), "line 1")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"index": 0, "prompt": "another prompt", "text": "", "tokens": []}) + "\n")
    assert_fails(run(*flags(main_model, prompt_file), "--output", other, "--resume"), "line 1")
    unfinished = tmp_path / "unfinished.txt"
    unfinished.write_text("my own notes, without a newline at the end")
    assert_fails(run(*flags(main_model, prompt_file), "--output", unfinished, "--resume"), "does not end in a result")
    assert existing.read_text() == '{"a": 1}\n'
    assert unfinished.read_text() == "my own notes, without a newline at the end"
    assert_fails(run("--model-name", main_model, "--output", tmp_path / "new.jsonl"), "--prompt-file")
    assert_fails(run(*flags(main_model, prompt_file), "--resume"), "--output")


def test_the_estimate_covers_a_long_prompt(converted):
    """The estimate is at least what MLX allocated while encoding a 4,096-token prompt and decoding from it."""
    model, _, _ = load_model(converted("t5-v1_1"))
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()
    cross_kv = model.cross_kv(model.encode(mx.full((1, 4096), 5)))
    cache = model.make_cache()
    mx.eval(model.decode(mx.zeros((1, 1), dtype=mx.int32), cross_kv, cache))
    used = mx.get_peak_memory() - baseline
    estimate = model.memory_needed(4096, 1, 1)
    print(f"peak {used / 2**20:.1f} MiB, estimate {estimate / 2**20:.1f} MiB")
    assert used <= estimate < 4 * used


def test_longest_fitting_is_the_longest_that_fits(converted):
    model, _, _ = load_model(converted("t5-v1_1"))
    for available in (10 << 20, 300 << 20, 5 << 30):
        longest = memory_fit.longest_fitting([model, model], 2, 50, available)
        assert memory_fit.memory_needed([model, model], longest, 2, 50) <= available
        assert memory_fit.memory_needed([model, model], longest + 1, 2, 50) > available


def refusing_run(monkeypatch, capsys, model_path, argv, fitting_tokens):
    """Run main.main(argv) in this process with only the memory a prompt of `fitting_tokens` tokens needs, counting
    the prompts encoded; -> (exit status, stdout, stderr, token lengths encoded)."""
    model, _, _ = load_model(model_path)
    available = model.memory_needed(fitting_tokens, 1, 24)
    monkeypatch.setattr(main_module, "available_memory", lambda: available)
    encoded = []
    encode = model_module.T5.encode

    def counting_encode(self, input_ids, attention_mask=None):
        rows = attention_mask.sum(axis=1).tolist() if attention_mask is not None else [input_ids.shape[1]]
        encoded.extend(rows)
        return encode(self, input_ids, attention_mask)

    monkeypatch.setattr(model_module.T5, "encode", counting_encode)
    status = 0
    try:
        main_module.main(argv)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err, encoded


def test_a_prompt_too_long_for_the_memory_is_refused_before_encoding(monkeypatch, capsys, main_model):
    long_prompt = " ".join(["def f(x): return x"] * 100)
    argv = ["--model-name", str(main_model), "--regular-decode", "--prompt", long_prompt, "-m", "24"]
    start = time.perf_counter()
    status, out, err, encoded = refusing_run(monkeypatch, capsys, main_model, argv, 100)
    print(f"refused in {time.perf_counter() - start:.2f} s (loading included)")
    lines = [line for line in err.splitlines() if not line.startswith(("loading ", "warning: "))]
    assert status == 2 and out == "" and encoded == []
    assert len(lines) == 1 and lines[0].startswith("error: the prompt has "), err
    assert "enough for prompts of up to 100 tokens" in lines[0]


def test_in_a_prompt_file_a_prompt_too_long_is_that_prompts_error(monkeypatch, capsys, main_model, tmp_path):
    prompts = [PROMPTS[0], " ".join(["def f(x): return x"] * 100), PROMPTS[1]]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    output = tmp_path / "results.jsonl"
    argv = ["--model-name", str(main_model), "--regular-decode", "-m", "24", "--json"]
    argv += ["--prompt-file", str(prompt_file), "--output", str(output)]
    status, out, err, encoded = refusing_run(monkeypatch, capsys, main_model, argv, 100)
    assert status is None or status == 0, err
    results = json.loads(out)["results"]
    assert [result["index"] for result in results] == [0, 1, 2]
    assert results[1]["error"].startswith("the prompt has ") and "text" not in results[1]
    assert all(result["text"] and "error" not in result for result in (results[0], results[2]))
    assert max(encoded) < 100 and len(encoded) == 2
    assert sorted(json.loads(line)["index"] for line in output.read_text().splitlines()) == [0, 1, 2]
