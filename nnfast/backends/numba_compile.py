"""Compiling a training run's Numba kernels in two processes when the disk cache is cold.

The kernels of a fused training step fall in two halves that do not link
each other: the C-callable kernels whose addresses the plans keep (the GEMM
task, the activations' loops, the optimizer update), and the kernels that
call them through those addresses (the step kernels of
:mod:`.numba_kernels.train_step`, the GEMM driver of the layer ops, which
evaluation runs). Numba compiles one function at a time in a process (a
global compiler lock), so a first run on a machine with a second core starts
a child process (``python -m nnfast.backends.numba_compile``) that compiles
the second half into the disk cache while this process compiles the first;
this process then loads the second half from the cache. Each half is a few
seconds of compilation on a small machine.

Nothing depends on the child: when it cannot start, fails, or its kernels
are not in the cache in the end (a cache that cannot be written), this
process compiles them itself, as it would have without it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any, Iterator

import numpy as np

#: How long to wait for the child before compiling without it (seconds).
TIMEOUT = 600.0


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def beside(dtype: Any, steps: list[str]) -> Iterator[subprocess.Popen | None]:
    """Inside the block, a child process compiles the step kernels ``steps`` and the evaluation's GEMM
    driver for ``dtype``; leaving the block waits for it (stopping it after :data:`TIMEOUT` seconds, or
    when the block raises). Yields the child, or None where there is no second core or it cannot start
    (the block then runs alone)."""
    if cores() < 2:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "NNFAST_BACKEND"}  # the child needs no backend
    started = False
    try:
        with subprocess.Popen([sys.executable, "-m", __name__, np.dtype(dtype).name, *steps], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) as child:
            started = True
            try:
                yield child
                child.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if child.poll() is None:
                    child.kill()
    except OSError:
        if started:
            raise
        yield None  # it could not start


def compile_callers(dtype: Any, steps: list[str]) -> None:
    """Compile (or load) the step kernels ``steps`` and :func:`.numba_kernels.gemm.gemm`'s driver for ``dtype``."""
    from ..train_step.numba_fused import step_types
    from .numba_kernels import gemm, train_step

    for name in steps:
        getattr(train_step, name).compile(step_types(dtype))
    gemm._gemm_op.compile(gemm.op_types(dtype))


def main(argv: list[str]) -> int:
    """The child: ``DTYPE [STEP ...]``."""
    dtype, *steps = argv
    compile_callers(np.dtype(dtype), steps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
