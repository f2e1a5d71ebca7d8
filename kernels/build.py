"""Build the native kernels in place (kernels/_native*.so) against the installed MLX; never fails the install.

Where they cannot be built (no compiler, cmake or nanobind; another platform) this prints one warning line and exits
0: everything then runs on MLX's own kernels. A module from an earlier build is removed first, so that a failed
rebuild (after an upgrade of MLX, say) leaves nothing stale to load.
"""

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mlx_version() -> str:
    try:
        import mlx.core as mx
    except ImportError:
        return "none"
    return mx.__version__


def cached_environment(build_dir: Path) -> str:
    """The interpreter and MLX that configured `build_dir` ("" if none did, or its cache names another source)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return ""
    # Lines "NAME:TYPE=value".
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        name_type, _, value = line.partition("=")
        entries[name_type.split(":")[0]] = value
    if Path(entries.get("CMAKE_HOME_DIRECTORY", "")).resolve() != HERE:
        return ""
    return entries.get("T5_BUILD_ENVIRONMENT", "")


def build() -> str:
    """Configure and build; return "" on success or why it failed."""
    if sys.platform != "linux":
        return f"only built on Linux (this is {sys.platform}; MLX's own kernels serve there)"
    for old in HERE.glob("_native*.so"):
        old.unlink()
    # pip's cmake sits beside the interpreter of a virtual environment that is not activated.
    beside = Path(sys.executable).parent / "cmake"
    cmake = str(beside) if beside.exists() else shutil.which("cmake")
    if cmake is None:
        return "cmake not found (pip install -r requirements.txt installs it)"
    build_dir = HERE / "build"
    environment = f"{sys.executable}|{mlx_version()}"
    if cached_environment(build_dir) != environment:
        # Configured by another interpreter or MLX (or in another checkout): its cached paths would be reused.
        shutil.rmtree(build_dir, ignore_errors=True)
    steps = [
        [
            cmake,
            "-S",
            str(HERE),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DT5_BUILD_ENVIRONMENT={environment}",
        ],
        [cmake, "--build", str(build_dir), "--parallel", "2"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            return lines[-1] if lines else f"{step[1]} failed"
    return ""


def main():
    problem = build()
    if problem:
        print(f"warning: native kernels not built: {problem}; MLX's own kernels will be used", file=sys.stderr)
    else:
        print(f"native kernels built in {HERE}")


if __name__ == "__main__":
    main()
