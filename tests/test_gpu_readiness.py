"""What a GPU machine needs from this repository before any GPU test runs.

* ``pip install -e ".[cuda12]"`` (or ``cuda13``) on a machine with only the
  NVIDIA driver brings every CUDA library CuPy loads (NVRTC above all: the
  kernels are compiled at first use): CuPy's ``ctk`` extra.
* ``pytest -m gpu`` collects every test module even where tqdm or
  scikit-learn is missing (they are imported lazily), so a device run never
  ends at collection.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_extras_bring_the_cuda_libraries_and_nccl():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for cuda in ("12", "13"):
        line = re.search(rf"^cuda{cuda} = \[(.*)\]$", text, re.M).group(1)
        requirements = [r.strip().strip('"') for r in line.split(",")]
        (cupy,) = [r for r in requirements if r.startswith("cupy-")]
        m = re.fullmatch(rf"cupy-cuda{cuda}x\[ctk\]>=(\d+)\.\d+", cupy)
        assert m and int(m.group(1)) >= 14, cupy  # CuPy's ctk extra exists from 14.0
        assert any(r.startswith(f"nvidia-nccl-cu{cuda}>=") for r in requirements), requirements


def test_gpu_tests_are_collected_without_tqdm_and_scikit_learn():
    code = ("import sys\n"
            "for name in ('tqdm', 'sklearn'):\n"
            "    sys.modules[name] = None  # import tqdm / sklearn -> ImportError\n"
            "import pytest\n"
            "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', 'tests']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().split("tests collected")[-1], proc.stdout[-2000:]
    assert re.search(r"\d+/\d+ tests collected", proc.stdout), proc.stdout[-2000:]
