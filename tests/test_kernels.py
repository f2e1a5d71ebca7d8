"""The native decode-shaped products against MLX's own matmul and quantized_matmul."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kernels

REPO = Path(__file__).resolve().parents[1]

if kernels.native is None and os.environ.get("T5_REQUIRE_KERNELS"):
    raise RuntimeError(f"native kernels required but not loaded: {kernels.active}")
native = pytest.mark.skipif(kernels.native is None, reason=f"native kernels not loaded: {kernels.active}")

ROWS = [1, 2, 3, 5, 8, 16, 17, 37]


def assert_close(ours, reference, K):
    # float32 accumulation in another order: errors grow like sqrt(K) times the terms' size (~1 here).
    np.testing.assert_allclose(
        np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32)), atol=2e-5 * K**0.5, rtol=1e-4
    )


@native
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows", ROWS)
def test_float_weights_match_matmul(dtype, rows):
    mx.random.seed(rows)
    for K, N in [(1, 3), (7, 9), (131, 61), (520, 203)]:
        x, w = mx.random.normal((rows, K)), mx.random.normal((N, K)).astype(dtype)
        reference = x @ w.astype(mx.float32).T
        ours = kernels.native.decode_matmul(x, w)
        assert ours.dtype == mx.float32 and ours.shape == (rows, N)
        assert_close(ours, reference, K)
        # x in the weights' dtype gives a result in that dtype, as MLX's matmul does (rounded once at the end).
        x_cast = x.astype(dtype)
        result = kernels.native.decode_matmul(x_cast, w)
        assert result.dtype == dtype
        reference = x_cast.astype(mx.float32) @ w.astype(mx.float32).T
        np.testing.assert_allclose(np.array(result.astype(mx.float32)), np.array(reference), rtol=1e-2, atol=1e-3)


@native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", ROWS)
def test_quantized_weights_match_quantized_matmul(bits, group_size, rows):
    mx.random.seed(bits * rows + group_size)
    # K from one group to one that one row takes in several passes over its chunks of x (8320 = 65 * 128).
    for K, N in [(group_size, 5), (3 * group_size, 67), (384, 129), (8320, 5)]:
        x = mx.random.normal((rows, K))
        for dtype in [mx.float32, mx.bfloat16]:
            w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size, bits)
            reference = mx.quantized_matmul(x, w, scales, biases, True, group_size, bits)
            ours = kernels.native.decode_matmul(x, w, scales, biases, group_size, bits)
            assert ours.dtype == reference.dtype and ours.shape == reference.shape
            assert_close(ours, reference, K)


@native
def test_batched_strided_inputs_and_graph_transforms():
    x = mx.random.normal((2, 3, 40))[:, :, ::2]  # (2, 3, 20), not contiguous
    w = mx.random.normal((11, 20))
    reference = x @ w.T
    assert_close(kernels.linear(x, w), reference, 20)
    # In the graph like any op: lazy, compiled, evaluated asynchronously.
    compiled = mx.compile(lambda a: kernels.native.decode_matmul(a, w) * 2)
    assert_close(compiled(x), reference * 2, 20)
    pending = kernels.native.decode_matmul(x, w)
    mx.async_eval(pending)
    assert_close(pending, reference, 20)


@native
@pytest.mark.parametrize("bits", [None, 4])
def test_any_leading_shape_in_one_operation(bits, tmp_path):
    w = mx.random.normal((12, 64))
    arrays = (w,) if bits is None else (*mx.quantize(w, 32, bits), 32, bits)
    reference = (lambda a: a @ w.T) if bits is None else (lambda a: mx.quantized_matmul(a, *arrays[:3], True, 32, bits))
    # Heads transposed back to (B, L, heads, d_kv) and flattened lazily, a single row, a 4-D batch.
    for x in [
        mx.random.normal((2, 4, 3, 16)).transpose(0, 2, 1, 3).reshape(2, 3, 64),
        mx.random.normal((3, 2, 64)).transpose(1, 0, 2),
        mx.random.normal((64,)),
        mx.random.normal((2, 2, 3, 64))[:, 1:],
    ]:
        ours = kernels.native.decode_matmul(x, *arrays)
        assert ours.shape == (*x.shape[:-1], 12)
        assert_close(ours, reference(x), 64)
    # The product is the graph's only operation: no reshapes of x or of the result around it.
    x = mx.random.normal((2, 3, 64))
    mx.eval(x)
    mx.export_to_dot(str(tmp_path / "graph.dot"), kernels.native.decode_matmul(x, *arrays))
    assert (tmp_path / "graph.dot").read_text().count("shape=rectangle") == 1


@native
def test_user_errors_raise():
    with pytest.raises(ValueError):
        kernels.native.decode_matmul(mx.zeros((1, 8)), mx.zeros((4, 9)))
    w, scales, biases = mx.quantize(mx.zeros((4, 64)), 64, 4)
    with pytest.raises(ValueError):
        kernels.native.decode_matmul(mx.zeros((1, 64)), w, scales, biases, 32, 4)


@native
def test_portable_path_and_switch_off():
    # The portable kernels (forced), and T5_KERNELS=0 (MLX's own), each in a fresh process.
    check = (
        "import mlx.core as mx, kernels; mx.random.seed(0); x = mx.random.normal((5, 96)); "
        "w = mx.random.normal((13, 96)); q = mx.quantize(w, 32, 4); "
        "d = mx.abs(kernels.linear(x, w) - x @ w.T).max() + "
        "mx.abs(kernels.linear(x, *q, 32, 4) - mx.quantized_matmul(x, *q, True, 32, 4)).max(); "
        "print(kernels.active, '|', kernels.native and kernels.native.isa(), '|', d.item())"
    )
    env = {**os.environ, "T5_KERNEL_PORTABLE": "1"}
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    active, isa, difference = out.stdout.strip().split(" | ")
    assert active.startswith("native") and isa == "portable" and float(difference) < 1e-3
    env = {**os.environ, "T5_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("mlx (T5_KERNELS=0)") and out.stderr == ""


def test_kernels_that_cannot_load_fall_back_with_one_warning():
    check = (
        "import sys; sys.modules['kernels._native'] = None; import mlx.core as mx, kernels; "
        "x, w = mx.ones((2, 8)), mx.ones((3, 8)); print(kernels.active, '|', kernels.linear(x, w).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    active, result = out.stdout.strip().split(" | ")
    assert active.startswith("mlx (native kernels") and result == str([[8.0] * 3] * 2)
    if sys.platform == "linux":
        assert out.stderr.count("warning:") == 1 and "python kernels/build.py" in out.stderr


def test_kernels_not_built_say_so(tmp_path):
    # The package without its compiled module, as in a fresh clone before `python kernels/build.py`.
    shutil.copytree(REPO / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("_native*", "build"))
    check = "import kernels; print(kernels.active)"
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, check=True)
    if sys.platform == "linux":
        assert out.stdout.strip() == "mlx (native kernels not built)"
        assert out.stderr.strip().startswith("warning: native kernels not built;") and "circular" not in out.stderr
