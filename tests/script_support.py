"""Running a script of ``benchmarks/`` standalone, as on a bare machine: a checkout on PYTHONPATH, nothing installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: Path, *args: str, cwd: Path, numba_threads: int, timeout: float = 300,
               ) -> subprocess.CompletedProcess[str]:
    """``python script args`` in ``cwd`` with this checkout on PYTHONPATH and ``numba_threads`` Numba threads."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS=str(numba_threads))
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
