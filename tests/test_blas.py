"""The BLAS loader falls back cleanly: MLX still computes correctly, with one warning naming the install step."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

# Load the backend, then check a matrix product in MLX against numpy; print what is active.
PROBE = """
import blas
import mlx.core as mx
import numpy as np
a = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32)
assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, atol=1e-4)
print(blas.active)
"""


def probe(**env):
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environment, capture_output=True, text=True)


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS loader only acts on Linux")
def test_missing_library_falls_back_with_one_warning():
    result = probe(T5_BLAS="/nonexistent/libopenblas.so.0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bundled reference BLAS"
    assert result.stderr.count("warning:") == 1
    assert "apt-get install libopenblas0-pthread" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS loader only acts on Linux")
def test_opting_out_keeps_the_bundled_blas_silently():
    result = probe(T5_BLAS="none")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bundled reference BLAS (T5_BLAS=none)"
    assert "warning" not in result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS loader only acts on Linux")
def test_no_candidate_found_is_not_an_error(capsys):
    import blas

    before = blas.active
    try:
        assert blas.load(choice="", paths=[]) == "bundled reference BLAS"
        assert "libopenblas0-pthread" in capsys.readouterr().err
    finally:
        blas.active = before  # the report of what this process really uses


def test_found_library_is_used_when_present():
    import blas

    present = [path for path in blas.candidates() if os.path.exists(path)]
    if sys.platform != "linux" or not present:
        pytest.skip("no OpenBLAS installed here")
    result = probe(T5_BLAS="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"openblas: {present[0]}"
