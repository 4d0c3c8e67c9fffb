"""``nnfast selftest``: every op of a backend against the NumPy reference, on this machine.

The first thing to run after installing nnfast on a new machine (a new GPU,
a new driver, a new CuPy): like ``numba -s`` or ``cupy.show_config()``, but
it runs the kernels. Each check prints one line -- its name, shape, largest
absolute and relative error, tolerance, PASS or FAIL -- and the run ends
with a summary; the command exits 1 if any check failed::

    nnfast selftest --backend cupy --dtype all --json selftest.json

The checks are made from the two tables (:mod:`nnfast.ops`,
:mod:`nnfast.activations`), so a new op or activation is covered by its row:

* every activation, forward and backward, aligned and one element into its
  buffer, with saturating inputs (:mod:`.layers`);
* a linear layer with every activation, fused in the GEMM and unfused, with
  and without a bias (:mod:`.layers`);
* every GEMM tile configuration forced in turn, on its vector path, its
  scalar path, misaligned operands and split K, checking on the GPU that the
  path forced is the path launched; transposed and strided operands; the
  unforced plans (:mod:`.gemm`);
* softmax and log-softmax at every row-thread count of the CUDA kernels;
  cross-entropy with every reduction, label smoothing, ignored rows, and bad
  labels (raised, naming the row; the backend keeps working) (:mod:`.rows`);
* SGD (momentum, Nesterov, weight decay) and Adam / AdamW over parameter
  lists of mixed sizes; 20 steps of :class:`nnfast.TrainStep` against the
  reference trajectory (:mod:`.training`).

The reference is the NumPy backend in float64 on the same inputs
(:mod:`.compare` says how errors are measured and bounded). Nothing here
depends on a GPU: ``nnfast selftest --backend numba`` checks the CPU kernels.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..paths import check_output_path
from .check import Check, CheckFailed, Context
from .compare import Measure, Pair, compare, tolerance
from .runner import DTYPES, PRECISIONS, SCHEMA, Precision, Report, Result, checks, run, run_check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nnfast selftest`` options (destinations are prefixed ``selftest_``)."""
    parser.add_argument("--backend", dest="selftest_backend", choices=["numpy", "numba", "cupy", "auto"],
                        help="backend to check (default: NNFAST_BACKEND, else auto)")
    parser.add_argument("--dtype", dest="selftest_dtype", choices=[*DTYPES, "all"], default="float32",
                        help="float32 (default), float64, or all")
    parser.add_argument("--json", dest="selftest_json", metavar="FILE",
                        help="write every check's result as JSON (rewritten after each check)")
    parser.add_argument("-k", "--match", dest="selftest_match", metavar="TEXT", action="append",
                        help="run only the checks whose name contains TEXT (repeatable: any of them)")


def command(args: argparse.Namespace) -> int:
    """Run ``nnfast selftest`` as ``args`` (from :func:`add_arguments`) says; 0 if every check passed, else 1."""
    dtype = args.selftest_dtype
    if args.selftest_json:
        check_output_path(args.selftest_json, "--json")  # before the checks, not after them
    report = run(args.selftest_backend, DTYPES if dtype == "all" else (dtype,), match=args.selftest_match,
                 json_path=args.selftest_json, log=lambda line: print(line, flush=True))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nnfast.selftest``: the same as ``nnfast selftest``."""
    parser = argparse.ArgumentParser(prog="nnfast selftest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    from ..errors import BackendError

    try:
        return command(parser.parse_args(argv))
    except (BackendError, ValueError, OSError) as err:
        print(f"nnfast selftest: error: {err}", file=sys.stderr)
        return 2


__all__ = ["Check", "CheckFailed", "Context", "DTYPES", "Measure", "PRECISIONS", "Pair", "Precision", "Report",
           "Result", "SCHEMA", "add_arguments", "checks", "command", "compare", "main", "run", "run_check",
           "tolerance"]
