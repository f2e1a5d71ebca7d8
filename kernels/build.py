"""Build the native kernels in place (kernels/_native*.so) against MLX; never fails the install.

`pip install .` runs this as the project's build backend (pyproject.toml): the kernels are built against the MLX of
pip's build environment (the version requirements.txt pins), and the wheel holds only the project's metadata, so
that its dependencies are installed and no module lands in site-packages: the product runs from this directory.
`python kernels/build.py` rebuilds them against the MLX of the running interpreter.

Where they cannot be built (no compiler, cmake or nanobind; another platform) this prints one warning line and the
install goes on: everything then runs on MLX's own kernels, and kernels/__init__.py says so once per run. A module
from an earlier build is removed first, so that a failed rebuild (after an upgrade of MLX, say) leaves nothing stale
to load.
"""

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME, VERSION = "t5_speculative", "0.1.0"
SUMMARY = "Speculative decoding for T5 encoder-decoder models on MLX"


def mlx_version() -> str:
    """The version and place of the MLX the build compiles against: pip's build environments differ in place."""
    try:
        import mlx.core as mx
    except ImportError:
        return "none"
    return f"{mx.__version__} at {Path(mx.__file__).parent}"


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
    if not (os.environ.get("CXX") or any(shutil.which(name) for name in ("c++", "g++", "clang++"))):
        return "no C++ compiler found (install g++ or clang++, then run python kernels/build.py)"
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
            lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            errors = [i for i, line in enumerate(lines) if "error" in line.lower()]
            # The first error and the line that says what it is ("CMake Error at ...:", "The C++ compiler ...").
            return " ".join(lines[errors[0] : errors[0] + 2]) if errors else (lines[-1] if lines else "cmake failed")
    return ""


def main():
    problem = build()
    if problem:
        print(f"warning: native kernels not built: {problem}; MLX's own kernels will be used", file=sys.stderr)
    else:
        print(f"native kernels built in {HERE}")


# The build backend's hooks (PEP 517): a wheel of metadata alone, its dependencies those of requirements.txt.


def requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def metadata() -> str:
    fields = [("Metadata-Version", "2.1"), ("Name", NAME), ("Version", VERSION), ("Summary", SUMMARY)]
    fields += [("Requires-Python", ">=3.10")] + [("Requires-Dist", line) for line in requirements()]
    return "".join(f"{key}: {value}\n" for key, value in fields)


def write_wheel(wheel_directory) -> str:
    files = {
        "METADATA": metadata(),
        "WHEEL": "Wheel-Version: 1.0\nGenerator: kernels/build.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    dist_info = f"{NAME}-{VERSION}.dist-info"
    record = []
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(Path(wheel_directory) / name, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            wheel.writestr(f"{dist_info}/{file}", data)
            record.append(f"{dist_info}/{file},sha256={digest},{len(data)}")
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n")
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    main()
    return write_wheel(wheel_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return build_wheel(wheel_directory, config_settings, metadata_directory)


if __name__ == "__main__":
    main()
