"""Packaging: the wheel ships kernels/ and nnfast finds them, installed or editable."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIND_KERNELS = ("import nnfast, nnfast.backends.cuda_launch as c; d = c.kernel_dir(); "
                "print(nnfast.__file__); print(d); print(sorted(p.name for p in d.glob('*.cu')))")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "Could not find a version that satisfies the requirement hatchling" in proc.stderr:
        pytest.skip("the build backend (hatchling) cannot be downloaded here")
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("nnfast-*.whl")
    return path


def test_wheel_contains_package_kernels_and_entry_point(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.cu*"))
    assert sources, "kernels/ holds no CUDA sources"
    for name in sources:
        assert f"nnfast/kernels/{name}" in names
    assert "nnfast/__init__.py" in names and "nnfast/backends/base.py" in names
    assert "nnfast = nnfast.cli:main" in entry_points


def test_installed_wheel_finds_its_kernels(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    # Dependencies (numpy, ...) come from the test environment, after the wheel's own package.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", FIND_KERNELS], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    package_file, kernel_dir, cu_files = proc.stdout.splitlines()
    assert Path(package_file).is_relative_to(site)
    assert Path(kernel_dir) == site / "nnfast" / "kernels"
    assert eval(cu_files) == sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))


def test_editable_install_finds_source_kernels(tmp_path):
    """Run from elsewhere, so that nnfast is imported through the (editable) install."""
    proc = subprocess.run([sys.executable, "-c", FIND_KERNELS], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    package_file, kernel_dir, _ = proc.stdout.splitlines()
    assert Path(package_file) == ROOT / "nnfast" / "__init__.py"
    assert Path(kernel_dir) == ROOT / "kernels"
