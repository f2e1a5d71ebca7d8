"""Build the native kernels in place (kernels/_native*.so) against the installed MLX; never fails the install.

Where they cannot be built (no compiler, cmake or nanobind; another platform) this prints one warning line and exits
0: everything then runs on MLX's own kernels.
"""

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build() -> str:
    """Configure and build; return "" on success or why it failed."""
    if sys.platform != "linux":
        return f"only built on Linux (this is {sys.platform}; MLX's own kernels serve there)"
    # pip's cmake sits beside the interpreter of a virtual environment that is not activated.
    beside = Path(sys.executable).parent / "cmake"
    cmake = str(beside) if beside.exists() else shutil.which("cmake")
    if cmake is None:
        return "cmake not found (pip install -r requirements.txt installs it)"
    build_dir = HERE / "build"
    steps = [
        [cmake, "-S", str(HERE), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}"],
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
