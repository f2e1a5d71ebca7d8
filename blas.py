"""Load an optimized BLAS for MLX on Linux. Import this module before `mlx` is first imported.

The `mlx[cpu]` Linux wheel links the reference (netlib) BLAS. MLX calls `cblas_sgemm` through the global symbol
scope, so a BLAS loaded with RTLD_GLOBAL before MLX is loaded serves its matrix products instead (30x faster gemm on a
2-core x86_64 box). macOS needs nothing: MLX uses Accelerate and Metal there.

T5_BLAS=/path/to/libopenblas.so.0 picks a library; T5_BLAS=none keeps the bundled one.
"""

import ctypes
import os
import platform
import sys

ENV_VAR = "T5_BLAS"
CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]
INSTALL_HINT = "apt-get install libopenblas0-pthread"

# What is active, for reports: "openblas: <path>", "bundled (reference BLAS)", "accelerate/metal" ...
active = "not loaded"


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def candidates():
    arch = platform.machine()
    return [path.format(arch=arch) for path in CANDIDATES]


def load(choice=None, paths=None) -> str:
    """Load a BLAS as the environment asks; return a description of the active BLAS. Never raises."""
    global active
    choice = os.environ.get(ENV_VAR, "") if choice is None else choice
    if sys.platform != "linux":
        active = "system (Accelerate/Metal)"
        return active
    if choice.lower() == "none":
        active = "bundled reference BLAS (T5_BLAS=none)"
        return active
    if choice:
        paths = [choice]
    found = next((path for path in (candidates() if paths is None else paths) if os.path.exists(path)), None)
    if found and "mlx.core" in sys.modules:
        warn("blas was imported after mlx; MLX keeps its reference BLAS")
        active = "bundled reference BLAS (mlx imported first)"
        return active
    if found:
        try:
            ctypes.CDLL(found, mode=ctypes.RTLD_GLOBAL)
            active = f"openblas: {found}"
            return active
        except OSError:
            pass
    where = f"{ENV_VAR}={choice} could not be loaded" if choice else "no OpenBLAS found"
    warn(f"{where}; MLX uses its slow reference BLAS (for speed: {INSTALL_HINT})")
    active = "bundled reference BLAS"
    return active


load()
