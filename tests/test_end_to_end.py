"""benchmarks/end_to_end.py on the bundled demo pair and a bfloat16 pair: every method runs, and the tokens agree."""

import csv
import json
import os
import subprocess
import sys

from conftest import ROOT


def run_benchmark(out, pair, max_tokens):
    """benchmarks/end_to_end.py on one pair, one round, no kernel sweep; returns (its output, results.json)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.end_to_end",
            "--pairs",
            pair,
            "--max-tokens",
            str(max_tokens),
            "--repeats",
            "1",
        ]
        + ["--out", out, "--kernel-shape", "none", "--num-draft", "2"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "results.json").read_text())


def test_benchmark_runs_all_methods_and_checks_their_tokens(tmp_path):
    out = tmp_path / "out"
    result, report = run_benchmark(out, "demo", 12)
    methods = {run["method"] for run in report["runs"]}
    batched = {"mlx regular", "mlx speculative", "transformers generate", "transformers assisted"}
    assert methods == batched | {"mlx k=2", "mlx auto"} | {f"{method}, batch 8" for method in batched}
    assert {run["num_draft"] for run in report["runs"] if run["method"].startswith("mlx")} == {0, 1, 2, "auto"}
    # transformers generate() is the reference the others are compared with, token for token (batched: its batched
    # generate(); its assisted generation cannot batch). The references themselves are left out: equal by definition.
    references = {"transformers generate", "transformers generate, batch 8"}
    compared = [run for run in report["runs"] if run["method"] not in references]
    assert len(compared) == len(report["runs"]) - 2
    for run in compared:
        expected = "cannot batch" if run["method"] == "transformers assisted, batch 8" else True
        assert run["same_tokens_as_transformers"] == expected, run
    (summary,) = report["summaries"]
    assert summary["all_tokens_identical"] and summary["pair"] == "demo pair"
    with open(out / "results.csv") as f:
        assert [row["method"] for row in csv.DictReader(f)] == [run["method"] for run in report["runs"]]
    assert "demo pair: regular" in result.stdout


def test_bfloat16_pair_runs_both_sides_in_bfloat16(tmp_path):
    _, report = run_benchmark(tmp_path / "out", "base-small-bf16", 6)
    # No batched rows: they compare with transformers in float32.
    assert {run["method"] for run in report["runs"]} == {
        "mlx regular",
        "mlx speculative",
        "mlx k=2",
        "mlx auto",
        "transformers generate",
        "transformers assisted",
    }
    assert {run["dtype"] for run in report["runs"]} == {"bfloat16"}
    # Each side agrees with itself: speculative decoding with regular decoding, assisted generation with generate()
    # (the two references left out).
    compared = [run for run in report["runs"] if run["method"] not in ("mlx regular", "transformers generate")]
    assert len(compared) == 4 and all(run["same_tokens_as_transformers"] is True for run in compared)
    (summary,) = report["summaries"]
    assert summary["dtype"] == "bfloat16" and summary["regular_vs_transformers"] > 0
    # A bfloat16 decode step reads half the bytes of float32 weights: t5-base's decoder is 248 MB in bfloat16.
    assert 200 < summary["decoder_weight_mb"] < 300
