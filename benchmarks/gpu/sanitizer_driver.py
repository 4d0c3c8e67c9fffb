"""A small program that launches every kernel family, for ``compute-sanitizer``.

It runs ``nnfast selftest``'s checks at their small shapes: every activation
forward and backward, every GEMM tile configuration forced on its vector,
scalar, misaligned and split-K paths (with the bias/activation backward and
column-sum kernels of the backward pass), softmax and log-softmax at every
row-thread count, the cross-entropy kernels with every reduction and bad
labels, and both optimizers. Left out: the 20-step training runs and the
unforced plans at a training shape (the same kernels, larger).

``--no-pool`` turns CuPy's memory pool off before anything is allocated:
every array is then its own ``cudaMalloc``, so an access past its end lands
outside any allocation and memcheck sees it (inside a pooled block it would
not). ``--quick`` (for racecheck, which is slow on shared-memory-heavy
kernels) leaves out the linear-layer checks, whose GEMMs the GEMM checks
already launch, and the misaligned activation views.

Exit status 1 if a check fails, as ``nnfast selftest``.
"""

from __future__ import annotations

import argparse
import os
import sys


def selected(quick: bool):
    """The selftest checks this driver runs."""
    def select(check) -> bool:
        if check.family == "train" or "default plan" in check.name:
            return False
        if quick and (check.family == "linear" or (check.family == "activation" and "misaligned" in check.name)):
            return False
        return True
    return select


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cupy", help="backend to drive (default: cupy)")
    parser.add_argument("--dtype", choices=("float32", "float64", "all"), default="all")
    parser.add_argument("--no-pool", action="store_true", help="CuPy's memory pool off: one cudaMalloc per array")
    parser.add_argument("--quick", action="store_true", help="fewer launches (for racecheck)")
    args = parser.parse_args(argv)
    if args.no_pool:
        import cupy

        cupy.cuda.set_allocator(None)
        cupy.cuda.set_pinned_memory_allocator(None)
    from nnfast import selftest

    dtypes = ("float32", "float64") if args.dtype == "all" else (args.dtype,)
    report = selftest.run(args.backend, dtypes, select=selected(args.quick), log=lambda line: print(line, flush=True))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
