"""benchmarks/batch_sizes.py: several draft lengths side by side, auto among them, each prompt decoded to its EOS."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def run(*args, out):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.batch_sizes", "--pairs", "demo", "--out", str(out), *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_draft_lengths_side_by_side_to_the_eos(tmp_path):
    args = ["--batch-sizes", "2", "--prompts", "3", "--max-tokens", "40", "--repeats", "1", "--eos"]
    result = run(*args, "--num-draft", "2", "auto", out=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "batch_size.json").read_text())
    methods = {(row["method"], row["batch_size"]) for row in rows}
    names = ["regular", "speculative k=2", "speculative auto"]
    assert methods == {(name, size) for name in names for size in (0, 2)}
    assert all(row["same_tokens"] for row in rows)
    assert {row["num_draft"] for row in rows} == {0, 2, "auto"}
    # The demo pair's translations end at their EOS, well before 40 tokens.
    assert all(0 < row["tokens_per_prompt"] < 40 for row in rows)
    assert "speculative auto" in result.stdout


def test_a_draft_length_that_is_neither_a_number_nor_auto_is_refused(tmp_path):
    result = run("--num-draft", "2", "often", out=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --num-draft")
    assert not (tmp_path / "batch_size.json").exists()
