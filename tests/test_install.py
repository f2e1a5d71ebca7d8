"""`pip install .`: kernels/build.py as the build backend, a wheel of metadata alone, and an install that goes on
without a compiler."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT


def build_backend():
    spec = importlib.util.spec_from_file_location("kernels_build", ROOT / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheel_holds_metadata_alone_with_the_requirements_as_dependencies(tmp_path):
    backend = build_backend()
    name = backend.write_wheel(tmp_path)
    with zipfile.ZipFile(tmp_path / name) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    # Nothing importable lands in site-packages: no model.py, main.py or kernels/.
    assert names and all(re.fullmatch(r"t5_speculative-[\d.]+\.dist-info/(METADATA|WHEEL|RECORD)", n) for n in names)
    requirements = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [line[len("Requires-Dist: ") :] for line in metadata.splitlines() if line.startswith("Requires-Dist")] == (
        requirements
    )


def test_the_build_environment_has_the_mlx_the_kernels_run_with():
    # The kernels are compiled against the build environment's MLX and refused by any other (kernels/__init__.py).
    pyproject = (ROOT / "pyproject.toml").read_text()
    requirements = (ROOT / "requirements.txt").read_text()
    for package in ("mlx", "nanobind"):
        pin = re.search(rf"^{package}(\[cpu\])?==([\d.]+) ; sys_platform == \"linux\"", requirements, re.M)
        assert pin and f"\"{package}{pin[1] or ''}=={pin[2]} ; sys_platform == 'linux'\"" in pyproject


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels are built on Linux only")
def test_without_a_compiler_the_build_warns_once_and_succeeds(tmp_path):
    kernels = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", kernels, ignore=shutil.ignore_patterns("build", "_native*", "__pycache__"))
    # A PATH with cmake on it but no C++ compiler.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    beside = os.path.join(os.path.dirname(sys.executable), "cmake")
    (bin_dir / "cmake").symlink_to(beside if os.path.exists(beside) else shutil.which("cmake"))
    env = {key: value for key, value in os.environ.items() if key not in ("CXX", "CC")}
    result = subprocess.run(
        [sys.executable, str(kernels / "build.py")], env={**env, "PATH": str(bin_dir)}, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stderr.count("warning:") == 1 and "no C++ compiler found" in result.stderr
    assert list(kernels.glob("_native*")) == []
