"""benchmark.py end to end on the bundled demo pair: every method runs, and all four produce the same tokens."""

import csv
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_runs_all_methods_and_checks_their_tokens(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "benchmark.py", "--pairs", "demo", "--max-tokens", "12", "--repeats", "1", "--out", out]
        + ["--kernel-shape", "none"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    methods = {run["method"] for run in report["runs"]}
    single = {"mlx regular", "mlx speculative", "transformers generate", "transformers assisted"}
    assert methods == single | {f"{method}, batch 8" for method in single}
    # transformers generate() is the reference the others are compared with, token for token (batched: its batched
    # generate(); its assisted generation cannot batch).
    for run in report["runs"]:
        expected = "cannot batch" if run["method"] == "transformers assisted, batch 8" else True
        assert run["same_tokens_as_transformers"] == expected, run
    (summary,) = report["summaries"]
    assert summary["all_tokens_identical"] and summary["pair"] == "demo pair"
    assert 0 < summary["share_of_matmul_ceiling"] and 0 < summary["share_of_roofline"]
    with open(out / "results.csv") as f:
        assert [row["method"] for row in csv.DictReader(f)] == [run["method"] for run in report["runs"]]
    assert "demo pair: regular" in result.stdout
