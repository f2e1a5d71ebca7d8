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
        for dtype in [mx.float32, mx.bfloat16, mx.float16]:  # the scales' and biases' dtype
            w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size, bits)
            assert scales.dtype == biases.dtype == dtype
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


PORTABLE_SHAPES = """
import mlx.core as mx, numpy as np, kernels
assert kernels.native.isa() == "portable", kernels.native.isa()
mx.random.seed(0)
worst = 0.0
for rows in (1, 3, 16, 17, 37):
    for K, N in ((7, 9), (131, 61), (520, 203)):
        x = mx.random.normal((rows, K))
        for dtype in (mx.float32, mx.bfloat16, mx.float16):
            w = mx.random.normal((N, K)).astype(dtype)
            reference = np.array(x @ w.astype(mx.float32).T)
            ours = np.array(kernels.native.decode_matmul(x, w))
            worst = max(worst, float(np.abs(ours - reference).max()) / K**0.5)
    for bits in (4, 8):
        for group_size in (32, 64, 128):
            for K, N in ((group_size, 5), (3 * group_size, 67), (8320, 5)):
                x = mx.random.normal((rows, K))
                for dtype in (mx.float32, mx.bfloat16, mx.float16):
                    q = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size, bits)
                    reference = np.array(mx.quantized_matmul(x, *q, True, group_size, bits).astype(mx.float32))
                    ours = np.array(kernels.native.decode_matmul(x, *q, group_size, bits).astype(mx.float32))
                    scale = np.abs(reference).max() + 1
                    worst = max(worst, float(np.abs(ours - reference).max() / scale))
print(worst)
"""


@native
def test_portable_path_on_every_shape_dtype_and_quantization():
    # The only path on a CPU without AVX2, forced here: the shapes of the tests above, every weight and scale dtype.
    out = run_python(PORTABLE_SHAPES, env={"T5_KERNEL_ISA": "portable", "T5_KERNELS": "exact"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-3


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
    env = {**os.environ, "T5_KERNEL_ISA": "portable", "T5_KERNELS": "exact"}
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
    # The package without its compiled module, as in a fresh clone before `pip install .`.
    shutil.copytree(REPO / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("_native*", "build"))
    check = "import kernels; print(kernels.active)"
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, check=True)
    if sys.platform == "linux":
        assert out.stdout.strip() == "mlx (native kernels not built)"
        assert out.stderr.strip().startswith("warning: native kernels not built;") and "circular" not in out.stderr


def run_python(code, env=None, cwd=REPO, timeout=120):
    """Run `code` in a fresh interpreter; a hang fails the test instead of stopping the suite."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer in {timeout} s (a hang)")


@native
def test_thread_pool_runs_past_2_to_the_32_jobs():
    # The pool tags each job's tickets with its number; the tag must wrap with the number, not hang at 2^32.
    check = (
        "import mlx.core as mx, numpy as np, kernels; n = kernels.native; mx.random.seed(0); "
        "x = mx.random.normal((3, 256)); w = mx.random.normal((512, 256)); q = mx.quantize(w, 64, 4); "
        "n.set_pool_jobs(2**32 - 4); "
        "ok = all(np.allclose(n.decode_matmul(x, w), x @ w.T, atol=1e-3) and "
        "np.allclose(n.decode_matmul(x, *q, 64, 4), mx.quantized_matmul(x, *q, True, 64, 4), atol=1e-3) "
        "for _ in range(6)); print(ok, n.pool_jobs() - 2**32)"
    )
    out = run_python(check, env={"T5_KERNEL_THREADS": "4"}, timeout=60)
    assert out.returncode == 0, out.stderr
    ok, past = out.stdout.split()
    assert ok == "True" and int(past) > 0


@native
def test_small_products_run_on_the_calling_thread():
    # Sharing a product whose weights are a few hundred KB (a small model's one row) costs more than it saves: it is
    # not a job of the pool. Larger products, or the same weights times many rows, are.
    check = (
        "import mlx.core as mx, kernels; n = kernels.native; mx.random.seed(0); "
        "w = mx.random.normal((576, 192)).astype(mx.bfloat16); big = mx.random.normal((2048, 512)); "
        "jobs = []\n"
        "for x, weight in ((mx.ones((1, 192)), w), (mx.ones((1, 512)), big), (mx.ones((16, 192)), w)):\n"
        "    before = n.pool_jobs(); mx.eval(n.decode_matmul(x, weight)); jobs.append(n.pool_jobs() - before)\n"
        "print(*jobs)"
    )
    out = run_python(check, env={"T5_KERNEL_THREADS": "2"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [int(jobs) for jobs in out.stdout.split()] == [0, 1, 1]


CONCURRENT_PRODUCTS = """
import os, sys, threading, time
import mlx.core as mx, numpy as np, kernels
assert kernels.native is not None, kernels.active
mx.random.seed(0)
cases = []
for rows in (1, 3, 8, 16):
    x = mx.random.normal((rows, 384))
    w = mx.random.normal((320, 384))
    cases.append((x, (w,)))
    cases.append((x.astype(mx.bfloat16), (w.astype(mx.bfloat16),)))
    cases.append((x, (*mx.quantize(w, 64, 4), 64, 4)))
# One thread's results, then every thread's must equal them (the columns are split the same way each time).
expected = [np.array(kernels.linear(x, *weights).astype(mx.float32)) for x, weights in cases]
rounds, failures = [0], []
deadline = time.time() + float(sys.argv[1])

def work(offset):
    i = offset
    while time.time() < deadline and not failures:
        x, weights = cases[i % len(cases)]
        if not np.array_equal(np.array(kernels.linear(x, *weights).astype(mx.float32)), expected[i % len(cases)]):
            failures.append(i % len(cases))
        rounds[0] += 1
        i += 1

threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rounds[0], failures)
"""


@native
def test_products_from_several_python_threads_at_once():
    # Four Python threads (MLX evaluates each on its own stream) share one thread pool. T5_CONCURRENCY_SECONDS runs it
    # longer (minutes) than the suite's 15 s.
    seconds = float(os.environ.get("T5_CONCURRENCY_SECONDS", "15"))
    out = subprocess.run(
        [sys.executable, "-c", CONCURRENT_PRODUCTS, str(seconds)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env={**os.environ, "T5_KERNEL_THREADS": "3"},
    )
    assert out.returncode == 0, f"exit code {out.returncode}: {out.stderr[-2000:]}"
    rounds, failures = out.stdout.split(" ", 1)
    assert failures.strip() == "[]" and int(rounds) > 100


def copy_kernels(tmp_path):
    shutil.copytree(REPO / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("build", "__pycache__"))
    return tmp_path / "kernels"


@native
def test_a_module_built_for_another_mlx_is_refused_before_loading(tmp_path):
    # As after `pip install -U mlx` without a rebuild: the version written into the module differs from MLX's.
    copied = copy_kernels(tmp_path)
    (module,) = copied.glob("_native*.so")
    data = module.read_bytes()
    marker = b"t5-kernels-built-for-mlx:" + mx.__version__.encode()
    assert data.count(marker) == 1
    module.write_bytes(data.replace(marker, b"t5-kernels-built-for-mlx:" + b"9" * len(mx.__version__)))
    check = (
        "import sys, mlx.core as mx, kernels; print(kernels.active, '|', 'kernels._native' in sys.modules, '|', "
        "kernels.linear(mx.ones((2, 8)), mx.ones((3, 8))).tolist())"
    )
    out = run_python(check, cwd=tmp_path)
    active, loaded, result = out.stdout.strip().split(" | ")
    assert active == "mlx (native kernels stale)" and loaded == "False" and result == str([[8.0] * 3] * 2)
    assert out.stderr.count("warning:") == 1 and "built for MLX 999" in out.stderr
    assert "python kernels/build.py" in out.stderr


def test_a_module_whose_trial_product_is_wrong_is_not_used():
    # A module that loads but computes wrongly (a foreign build, a broken CPU path): load() tries it first.
    check = (
        "import sys, types, mlx.core as mx; fake = types.ModuleType('kernels._native'); "
        "fake.mlx_version = mx.__version__; fake.decode_matmul = lambda x, w, *q: (x @ w.T if not q else "
        "mx.quantized_matmul(x, w, *q[:2], True, *q[2:])) + 1e-2; sys.modules['kernels._native'] = fake; "
        "import kernels; print(kernels.active, '|', kernels.native)"
    )
    out = run_python(check)
    if sys.platform == "linux" and kernels.built_for() == mx.__version__:
        assert out.stdout.strip() == "mlx (native kernels failed their trial) | None"
        assert out.stderr.count("warning:") == 1 and "trial product differs" in out.stderr


def test_a_failed_rebuild_leaves_no_module_and_a_foreign_cmake_cache_is_not_reused(tmp_path):
    copied = copy_kernels(tmp_path)
    (copied / "_native.cpython-311-x86_64-linux-gnu.so").write_bytes(b"an old build")
    # A build directory configured by another interpreter and MLX.
    (copied / "build").mkdir()
    (copied / "build" / "CMakeCache.txt").write_text(
        f"CMAKE_HOME_DIRECTORY:INTERNAL={copied}\nT5_BUILD_ENVIRONMENT:STRING=/elsewhere/python|0.1.0\n"
    )
    # The rebuild fails (here: at configuration).
    with open(copied / "CMakeLists.txt", "a") as f:
        f.write('\nmessage(FATAL_ERROR "this build fails")\n')
    out = subprocess.run([sys.executable, str(copied / "build.py")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stderr.startswith("warning: native kernels not built")
    assert list(copied.glob("_native*")) == []
    if sys.platform == "linux":
        cache = (copied / "build" / "CMakeCache.txt").read_text()
        assert "/elsewhere/python" not in cache
        out = run_python("import kernels; print(kernels.active)", cwd=tmp_path)
        assert out.stdout.strip() == "mlx (native kernels not built)"


@native
def test_inputs_the_kernels_cannot_take_are_refused_when_the_graph_is_built():
    w, scales, biases = mx.quantize(mx.random.normal((8, 64)), 64, 4)
    x = mx.ones((2, 64))
    for bad in [
        (w, scales, biases.astype(mx.float16), 64, 4),  # biases read with the scales' type: an over-read
        (w, scales.astype(mx.int32), biases.astype(mx.int32), 64, 4),
        (w.astype(mx.int32), scales, biases, 64, 4),
        (mx.ones((8, 64), dtype=mx.int8),),
        (mx.ones((8, 64), dtype=mx.float64),),
    ]:
        with pytest.raises(ValueError):
            kernels.native.decode_matmul(x, *bad)  # raised here, not when evaluated
    with pytest.raises(ValueError):
        kernels.native.decode_matmul(mx.ones((2, 64), dtype=mx.int32), mx.ones((8, 64)))


@native
def test_linear_sends_what_the_kernels_cannot_take_to_mlx():
    mx.random.seed(3)
    x, w = mx.random.normal((3, 64)), mx.random.normal((8, 64))
    # Quantized without biases (a non-affine mode): MLX's product.
    w_fp, scales_fp = mx.quantize(w, 32, 4, mode="mxfp4")
    reference = mx.quantized_matmul(x, w_fp, scales_fp, None, True, 32, 4, mode="mxfp4")
    assert_close(kernels.linear(x, w_fp, scales_fp, None, 32, 4, mode="mxfp4"), reference, 64)
    # Scales and biases of different dtypes, integer weights: as MLX computes them.
    wq, scales, biases = mx.quantize(w, 64, 4)
    mixed = kernels.linear(x, wq, scales, biases.astype(mx.bfloat16), 64, 4)
    assert_close(mixed, mx.quantized_matmul(x, wq, scales, biases.astype(mx.bfloat16), True, 64, 4), 64)
    w_int = mx.arange(8 * 64).reshape(8, 64).astype(mx.int32) % 5
    assert_close(kernels.linear(x, w_int), x @ w_int.T, 64)


@native
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_weights_that_are_slices_or_transposes_and_negative_strides(dtype):
    mx.random.seed(4)
    x, w = mx.random.normal((5, 96)).astype(dtype), mx.random.normal((40, 96)).astype(dtype)

    def assert_close(ours, reference):
        tolerance = dict(rtol=1e-4, atol=1e-3) if dtype == mx.float32 else dict(rtol=3e-2, atol=0.3)
        ours, reference = np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32))
        np.testing.assert_allclose(ours, reference, **tolerance)

    full = kernels.native.decode_matmul(x, w)
    mx.eval(full)
    w_t = mx.random.normal((96, 40)).astype(dtype)
    for ours, reference in [
        (kernels.native.decode_matmul(x, w[::2]), full[:, ::2]),  # rows apart
        (kernels.native.decode_matmul(x, w[:, ::-1][:, ::-1]), full),
        (kernels.native.decode_matmul(x[::-1], w), full[::-1]),  # negative row stride
        (kernels.native.decode_matmul(x[:, ::-1], w[:, ::-1]), full),
        (kernels.native.decode_matmul(x, w_t.T), x.astype(mx.float32) @ w_t.astype(mx.float32)),  # column-major
        (kernels.native.decode_matmul(x, w + 0), full),  # not evaluated yet
    ]:
        assert_close(ours, reference)
    wq = mx.quantize(mx.random.normal((64, 96)).astype(dtype), 32, 4)
    reference = mx.quantized_matmul(x, *wq, True, 32, 4)
    sliced = [mx.repeat(a, 2, axis=0)[::2] for a in wq]  # every weight array strided
    assert_close(kernels.native.decode_matmul(x, *sliced, 32, 4), reference)


MEMORY_OF_A_LONG_PROMPT = """
import mlx.core as mx, kernels

def status(field):  # in KiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

M, K = 8192, 2048
x = mx.random.normal((M, K), dtype=mx.bfloat16)
w = mx.random.normal((64, K), dtype=mx.bfloat16)
q = mx.quantize(w, 64, 4)
mx.eval(x, *q, w)
mx.clear_cache()
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
mx.eval(kernels.native.decode_matmul(x, *q, 64, 4), kernels.native.decode_matmul(x, w))
print((status("VmHWM") - before) // 1024)
"""


@native
def test_a_long_prompt_is_converted_a_block_of_rows_at_a_time():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs to reset the peak resident size")
    # x is 32 MiB in bfloat16: converted whole it would take 64 MiB in float32, three times that for 4-bit weights.
    out = run_python(MEMORY_OF_A_LONG_PROMPT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 24, f"resident memory grew by {out.stdout.strip()} MiB"


@native
def test_the_thread_count_follows_the_cpus_the_process_may_use():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity here")
    cpu = min(os.sched_getaffinity(0))
    check = f"import os; os.sched_setaffinity(0, {{{cpu}}}); import kernels; print(kernels.native.threads())"
    env = {k: v for k, v in os.environ.items() if k != "T5_KERNEL_THREADS"}
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1", out.stderr
