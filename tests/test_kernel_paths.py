"""Every instruction-set path of the native kernels (portable, AVX2, AVX-512, as this CPU runs them) against a float64
numpy reference of the same arithmetic, the integer products exactly against an int64 reference, and each row of a
product equal bit for bit to the product of that row alone."""

import os

import mlx.core as mx
import numpy as np
import pytest

import kernels

if kernels.native is None and os.environ.get("T5_REQUIRE_KERNELS"):
    raise RuntimeError(f"native kernels required but not loaded: {kernels.active}")
pytestmark = pytest.mark.skipif(kernels.native is None, reason=f"native kernels not loaded: {kernels.active}")

ISAS = ["portable", "avx2", "avx512"]
FLOAT_DTYPES = [mx.float32, mx.bfloat16, mx.float16]
# 1-16 rows take one pass over the weights (bfloat16 weights with float32 x: 1-12), more rows several blocks; packed
# weights take 1-4, 5-8, 9-12 and 13-16 rows with 4, 3, 2 and 1 blocks of 16 columns at a time (AVX2: groups of up to
# 6 rows, one row with 4 blocks, two with 2, more with 1).
ROWS = [1, 2, 3, 5, 8, 9, 11, 12, 13, 16, 17, 40, 600]


@pytest.fixture(params=ISAS)
def isa(request):
    if kernels.native is None or request.param not in kernels.native.isas():
        pytest.skip(f"this CPU does not run {request.param}")
    before = kernels.native.isa()
    kernels.native.set_isa(request.param)
    yield request.param
    kernels.native.set_isa(before)


def as_f64(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


def unpack(w, bits):
    """MLX's packed uint32 words (N, K * bits / 32) -> (N, K) integer values (value i of a word in its bits*i..)."""
    words = np.array(w).astype(np.uint64)
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint64) * bits)[None, None, :]
    values = (words[:, :, None] >> shifts) & np.uint64((1 << bits) - 1)
    return values.reshape(words.shape[0], -1).astype(np.int64)


def quantized_weights(N, K, group_size, bits, dtype, seed):
    mx.random.seed(seed)
    return mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size, bits)


def dequantized(w, scales, biases, group_size, bits):
    values = unpack(w, bits)
    repeat = lambda a: np.repeat(as_f64(a), group_size, axis=1)  # noqa: E731
    return repeat(scales) * values + repeat(biases)


def assert_float32_close(ours, reference, terms):
    # float32 sums in another order than float64's: errors of order sqrt(K) * eps * the terms' size.
    ours = np.array(ours.astype(mx.float32)).astype(np.float64)
    scale = np.sqrt(terms.shape[-1]) * np.abs(terms).max() if terms.size else 1.0
    np.testing.assert_allclose(ours, reference, atol=4e-6 * scale + 1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_float_weights_against_float64(isa, dtype, rows):
    rng = np.random.default_rng(rows)
    for K, N in [(1, 3), (17, 9), (131, 61), (517, 33)]:
        x = mx.array(rng.standard_normal((rows, K)).astype(np.float32))
        w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(dtype)
        reference = as_f64(x) @ as_f64(w).T
        terms = np.abs(as_f64(x)).max(axis=1, keepdims=True) * np.abs(as_f64(w)).max()
        ours = kernels.native.decode_matmul(x, w)
        assert ours.dtype == mx.float32 and ours.shape == (rows, N)
        assert_float32_close(ours, reference, np.broadcast_to(terms, (rows, K)))
        if dtype != mx.float32:
            # x in the weights' dtype (bfloat16 pairs on AVX512_BF16): float32 sums, one rounding at the end.
            x_cast = x.astype(dtype)
            ours = kernels.native.decode_matmul(x_cast, w)
            assert ours.dtype == dtype
            reference = as_f64(x_cast) @ as_f64(w).T
            ulp = 2.0**-8 if dtype == mx.bfloat16 else 2.0**-11
            bound = ulp * np.abs(reference) + 4e-6 * np.sqrt(K) * np.abs(reference).max() + 1e-6
            assert np.all(np.abs(as_f64(ours) - reference) <= bound)


def unpacked(packed, dtype):
    """kernels.pack's layout read back with numpy: (N, K) in blocks of 16 rows stored k by k -> the weight (N, K)."""
    N, K = packed.shape
    blocks = np.array(packed).reshape(N // 16, K, 16).transpose(0, 2, 1).reshape(N, K)
    return mx.array(blocks).view(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_packed_weights_against_float64(isa, dtype, rows):
    rng = np.random.default_rng(rows + 1)
    for K, N in [(1, 16), (17, 48), (131, 64), (517, 32), (192, 576)]:
        x = mx.array(rng.standard_normal((rows, K)).astype(np.float32))
        w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(dtype)
        packed = kernels.pack(w)
        assert packed.dtype == kernels.PACKED[dtype] and packed.shape == (N, K)
        assert mx.array_equal(unpacked(packed, dtype), w).item()  # the same numbers, only moved
        reference = as_f64(x) @ as_f64(w).T
        terms = np.abs(as_f64(x)).max(axis=1, keepdims=True) * np.abs(as_f64(w)).max()
        ours = kernels.linear(x, packed)
        assert ours.dtype == mx.float32 and ours.shape == (rows, N)
        assert_float32_close(ours, reference, np.broadcast_to(terms, (rows, K)))
        if dtype == mx.bfloat16:
            # A bfloat16 model's x, widened exactly: the products exact in float32, one rounding at the end.
            x_cast = x.astype(dtype)
            ours = kernels.linear(x_cast, packed)
            assert ours.dtype == dtype
            reference = as_f64(x_cast) @ as_f64(w).T
            bound = 2.0**-8 * np.abs(reference) + 4e-6 * np.sqrt(K) * np.abs(reference).max() + 1e-6
            assert np.all(np.abs(as_f64(ours) - reference) <= bound)


def test_pack_takes_what_the_kernels_take_within_its_budget(monkeypatch):
    rng = np.random.default_rng(0)

    def weight(N, K, dtype=mx.float32):
        return mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(dtype)

    assert kernels.pack(weight(40, 8)) is None  # not a whole number of blocks of 16 outputs
    assert kernels.pack(weight(32, 8, mx.float16)) is None
    assert kernels.pack(weight(32, 8)) is not None
    # The budget counts the live copies: one that would overflow it is not made, a freed one gives its bytes back.
    monkeypatch.setenv(kernels.PACK_ENV_VAR, str((kernels.packed_bytes + 3 * 32 * 64 * 4) / (1 << 20)))
    first, second = kernels.pack(weight(32, 64)), kernels.pack(weight(32, 64))
    assert first is not None and second is not None
    assert kernels.pack(weight(32, 128)) is None
    del first
    assert kernels.pack(weight(32, 128)) is not None
    monkeypatch.setenv(kernels.PACK_ENV_VAR, "0")
    assert kernels.pack(weight(32, 8)) is None


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 600])
def test_quantized_float_activations_against_float64(isa, bits, group_size, rows):
    rng = np.random.default_rng(bits * rows + group_size)
    for K, N in [(group_size, 5), (3 * group_size, 67), (7 * group_size, 33)]:
        x = mx.array(rng.standard_normal((rows, K)).astype(np.float32))
        for dtype in [mx.float32, mx.bfloat16]:
            w, scales, biases = quantized_weights(N, K, group_size, bits, dtype, seed=K + rows)
            w_f64 = dequantized(w, scales, biases, group_size, bits)
            reference = as_f64(x) @ w_f64.T
            ours = kernels.native.decode_matmul(x, w, scales, biases, group_size, bits, integer=False)
            assert ours.shape == (rows, N)
            terms = np.abs(as_f64(x)).max(axis=1, keepdims=True) * np.abs(w_f64).max()
            assert_float32_close(ours, reference, np.broadcast_to(terms, (rows, K)))


def packed_quantized(w, scales, biases, group_size, bits):
    """kernels.pack_quantized's copy, made for the AVX-512 kernel (the only one it packs for) whatever path runs it:
    the portable kernel reads the same layout."""
    if "avx512" not in kernels.native.isas():
        pytest.skip("this CPU does not run avx512, for which quantized weights are packed")
    before = kernels.native.isa()
    kernels.native.set_isa("avx512")
    try:
        return kernels.pack_quantized(w, scales, biases, group_size, bits)
    finally:
        kernels.native.set_isa(before)


def unpacked_quantized(packed, bits, group_size):
    """(values (N, K), scales (N, K / group), biases) of a packed quantized weight, read as products.h lays it out."""
    codes, scales, biases = np.array(packed[0]), as_f64(packed[1]), as_f64(packed[2])
    N, groups = scales.shape
    words = codes.view(np.uint32).reshape(N // 16, -1, 16)  # per block of 16 columns, word by word
    values = unpack(words.transpose(0, 2, 1).reshape(N, -1), bits)
    per_group = lambda a: a.reshape(N // 16, groups, 16).transpose(0, 2, 1).reshape(N, groups)  # noqa: E731
    return values, per_group(scales), per_group(biases)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 9, 12, 13, 16, 17, 600])
def test_packed_quantized_weights_against_float64(isa, bits, group_size, rows, monkeypatch):
    monkeypatch.setattr(kernels, "integer", False)  # float activations (int8 ones: the test below)
    rng = np.random.default_rng(bits * rows + group_size)
    for K, N in [(group_size, 16), (3 * group_size, 48), (5 * group_size, 80)]:
        x = mx.array(rng.standard_normal((rows, K)).astype(np.float32))
        for dtype in FLOAT_DTYPES:
            w, scales, biases = quantized_weights(N, K, group_size, bits, dtype, seed=K + rows)
            packed = packed_quantized(w, scales, biases, group_size, bits)
            assert packed[0].dtype == mx.uint8 and packed[0].shape == (N, K * bits // 8)
            # The same values, scales and biases, only moved: the scales and biases keep their dtype (a bfloat16
            # model's are half the bytes of float32 ones).
            assert packed[1].dtype == packed[2].dtype == dtype
            values, packed_scales, packed_biases = unpacked_quantized(packed, bits, group_size)
            assert np.array_equal(values, unpack(w, bits))
            assert np.array_equal(packed_scales, as_f64(scales)) and np.array_equal(packed_biases, as_f64(biases))
            w_f64 = dequantized(w, scales, biases, group_size, bits)
            reference = as_f64(x) @ w_f64.T
            ours = kernels.linear(x, *packed, group_size, bits)
            assert ours.dtype == mx.float32 and ours.shape == (rows, N)
            terms = np.abs(as_f64(x)).max(axis=1, keepdims=True) * np.abs(w_f64).max()
            assert_float32_close(ours, reference, np.broadcast_to(terms, (rows, K)))


def test_pack_quantized_takes_what_its_kernel_takes(monkeypatch):
    q8 = quantized_weights(32, 128, 64, 8, mx.float32, seed=0)
    if "avx512" not in kernels.native.isas():
        assert kernels.pack_quantized(*q8, 64, 8) is None  # no kernel reads the packed layout fast
        return
    before = kernels.native.isa()
    try:
        kernels.native.set_isa("avx512")
        assert kernels.pack_quantized(*q8, 64, 8) is not None
        assert kernels.pack_quantized(*quantized_weights(40, 128, 64, 8, mx.float32, seed=0), 64, 8) is None  # N % 16
        monkeypatch.setattr(kernels, "integer", True)  # int8 activations: packed where the CPU has VNNI
        assert (kernels.pack_quantized(*q8, 64, 8) is not None) == kernels.native.integer_products()
        monkeypatch.setattr(kernels, "integer", None)
        monkeypatch.setenv(kernels.PACK_ENV_VAR, "0")
        assert kernels.pack_quantized(*q8, 64, 8) is None
        monkeypatch.delenv(kernels.PACK_ENV_VAR)
        kernels.native.set_isa("avx2")
        assert kernels.pack_quantized(*q8, 64, 8) is None
    finally:
        kernels.native.set_isa(before)


def quantize_x_reference(x, group_size):
    """Each row's groups to int8, in float32 as the kernels do: scale = max|x| / 127, q = rint(x * (127 / max|x|))."""
    rows, K = x.shape
    groups = x.reshape(rows, K // group_size, group_size)
    largest = np.abs(groups).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(largest > 0, np.float32(127) / largest, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(groups * inverse), -127, 127).astype(np.int64)
    return q.reshape(rows, K), (largest[:, :, 0] / np.float32(127)).astype(np.float32)


# (N, K in groups) per weight layout: MLX's (odd N), and the packed copy (N a multiple of 16: 1, 3 and 5 blocks; one
# row takes 4 blocks at a time, then 1; more rows 2, then 1).
INTEGER_SHAPES = {"mlx": [(3, 1), (37, 5), (20, 9)], "packed": [(16, 1), (48, 3), (80, 9)]}


@pytest.mark.parametrize("layout", ["mlx", "packed"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 600])
def test_integer_products_exact_before_scaling(isa, layout, bits, group_size, rows):
    """int8 activations, on MLX's layout and on the packed copy: x's q and scales, and the group dots, exactly those of
    an int64 reference; the scaled result within float32 of it."""
    if not kernels.native.integer_products():
        pytest.skip(f"{isa} has no integer products")
    rng = np.random.default_rng(bits * rows + group_size + 1)
    for N, groups in INTEGER_SHAPES[layout]:
        K = groups * group_size
        x_np = rng.standard_normal((rows, K)).astype(np.float32)
        x_np[0, :group_size] = 0  # a group of zeros: scale 0
        x = mx.array(x_np)
        q_ref, x_scales_ref = quantize_x_reference(x_np, group_size)
        q, x_scales = kernels.native.quantize_x(x, group_size)
        np.testing.assert_array_equal(np.array(q).astype(np.int64), q_ref)
        np.testing.assert_array_equal(np.array(x_scales), x_scales_ref)
        for dtype in FLOAT_DTYPES:
            w, scales, biases = quantized_weights(N, K, group_size, bits, dtype, seed=K + rows)
            held = (w, scales, biases) if layout == "mlx" else packed_quantized(w, scales, biases, group_size, bits)
            values = unpack(w, bits)
            dots_ref = np.einsum(
                "mgk,ngk->mng",
                q_ref.reshape(rows, -1, group_size),
                values.reshape(N, -1, group_size),
                dtype=np.int64,
            )
            dots = kernels.native.integer_group_dots(x, *held, group_size, bits)
            np.testing.assert_array_equal(np.array(dots).astype(np.int64), dots_ref)
            # After scaling: sum over groups of w_scale * x_scale * dot + w_bias * sum(x), within float32.
            x_sums = x_np.astype(np.float64).reshape(rows, -1, group_size).sum(axis=2)
            reference = np.einsum("ng,mg,mng->mn", as_f64(scales), x_scales_ref.astype(np.float64), dots_ref)
            reference += np.einsum("ng,mg->mn", as_f64(biases), x_sums)
            ours = kernels.native.decode_matmul(x, *held, group_size, bits, integer=True)
            terms = np.abs(as_f64(scales)).max() * 255 * np.abs(x_np).max() + np.abs(as_f64(biases)).max()
            np.testing.assert_allclose(
                np.array(ours.astype(mx.float32)), reference, atol=4e-6 * np.sqrt(K) * terms * 4, rtol=1e-5
            )


def products(isa):
    """(name, function of x) for every dtype the kernels take, quantized ones with float and int8 activations."""
    rng = np.random.default_rng(7)
    K, N = 384, 45
    out = []
    for dtype in FLOAT_DTYPES:
        w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(dtype)
        out.append((f"{dtype}", lambda x, w=w: kernels.native.decode_matmul(x.astype(w.dtype), w)))
        out.append((f"{dtype} float32 x", lambda x, w=w: kernels.native.decode_matmul(x, w)))
        if dtype in kernels.PACKED:
            # 5 blocks of 16 columns: one row takes 4 blocks at a time on AVX2, then 1; two rows 2, 2 and 1.
            packed = kernels.pack(mx.array(rng.standard_normal((80, K)).astype(np.float32)).astype(dtype))
            out.append((f"packed {dtype}", lambda x, w=packed: kernels.native.decode_matmul(x, w)))
            if dtype == mx.bfloat16:
                product = lambda x, w=packed: kernels.native.decode_matmul(x.astype(mx.bfloat16), w)  # noqa: E731
                out.append(("packed bfloat16, bfloat16 x", product))
    for bits in [4, 8]:
        for group_size in [32, 64, 128]:
            q = quantized_weights(N, K, group_size, bits, mx.float32, seed=bits + group_size)
            for integer in [False, True]:
                product = lambda x, q=q, g=group_size, b=bits, i=integer: kernels.native.decode_matmul(  # noqa: E731
                    x, *q, g, b, integer=i
                )
                out.append((f"{bits}-bit g{group_size} integer={integer}", product))
            if "avx512" in kernels.native.isas():
                q = quantized_weights(48, K, group_size, bits, mx.float32, seed=bits + group_size)
                packed = packed_quantized(*q, group_size, bits)
                for integer in [False, True]:
                    product = lambda x, p=packed, g=group_size, b=bits, i=integer: (  # noqa: E731
                        kernels.native.decode_matmul(x, *p, g, b, integer=i)
                    )
                    out.append((f"packed {bits}-bit g{group_size} integer={integer}", product))
    return K, out


@pytest.mark.parametrize("rows", [2, 5, 8, 9, 12, 13, 16, 17, 40])
def test_rows_independent(isa, rows):
    K, cases = products(isa)
    x = mx.array(np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32))
    for name, product in cases:
        together = np.array(product(x).astype(mx.float32))
        for r in range(rows):
            alone = np.array(product(x[r : r + 1]).astype(mx.float32))[0]
            assert np.array_equal(together[r], alone), f"{name}: row {r} of {rows}"


def test_isa_is_reported_and_forced(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    check = "import kernels; print(kernels.native.isa(), '|', kernels.active)"
    for name in kernels.native.isas():
        env = {**os.environ, "T5_KERNEL_ISA": name}
        out = subprocess.run([sys.executable, "-c", check], cwd=repo, env=env, capture_output=True, text=True)
        isa, active = out.stdout.strip().split(" | ")
        assert out.returncode == 0 and isa == name and active.startswith(f"native {name}")
    env = {**os.environ, "T5_KERNEL_ISA": "avx1024"}
    out = subprocess.run([sys.executable, "-c", check], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: T5_KERNEL_ISA=avx1024") and out.stderr.count("\n") == 1


def test_collapsing_an_array_onto_huge_pages_keeps_its_values():
    # 9 MB: at least three whole 2 MB pages inside, wherever it starts. Where the kernel collapses them (Linux 6.1 on,
    # transparent huge pages not off) whole 2 MB pages move; elsewhere nothing does. Either way the values stay.
    a = mx.random.normal(((9 << 20) // 4 // 1024, 1024))
    mx.eval(a)
    expected = np.array(a)
    moved = kernels.native.collapse_huge_pages(a)
    assert moved in (0, 6 << 20, 8 << 20) and moved % (2 << 20) == 0
    np.testing.assert_array_equal(np.array(a), expected)
    assert kernels.native.collapse_huge_pages(mx.zeros((16,))) == 0  # no whole page inside
