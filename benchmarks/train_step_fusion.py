"""What each stage of the fused CPU training step buys: one MLP step in every configuration the code can select.

For each training shape of ``nnfast bench`` (``[64,128,10]`` batch 64, ``[784,256,256,10]`` batch 128,
``[784,1024,1024,10]`` batch 256: ReLU, softmax-CE, SGD with momentum) and each thread count, side by
side in one run (the samples of every configuration taken in turn, round after round, by
``nnfast.bench``'s timer):

* ``numpy eager loop``: the reference backend's layer calls (forward, loss, backward, ``step``);
* ``eager loop``: the same layer calls on Numba: one kernel call per op, about 20 per step;
* ``TrainStep, eager plan``: ``nf.TrainStep`` with no backend plan registered -- the same calls
  behind one entry point, the loss checked before the update;
* ``fused, serial``: the fused plan (:mod:`nnfast.train_step.numba_fused`) forced onto the calling
  thread (its ``PARALLEL_MIN_MACS`` raised above the step): one compiled call, no parallel region;
* ``fused, parallel``: the fused plan forced parallel (``PARALLEL_MIN_MACS`` 0): each GEMM at least
  ``gemm.PARALLEL_MIN_MACS`` multiply-adds is a parallel region, the others run on the calling
  thread (on one thread: not run, it is the serial plan);
* ``fused, parallel, every GEMM split``: as above with ``gemm.PARALLEL_MIN_MACS`` 0 as well, so every
  GEMM of the step is a parallel region (on one thread: not run);
* ``TrainStep``: what ``nf.TrainStep`` picks by itself (the ``plan`` column says which);
* ``torch eager``: PyTorch's loop on the CPU, when it imports (a yardstick, never a dependency).

The fusions inside the fused step (activation derivative and ``db`` in the dx GEMM's epilogue, the
SGD update in the dW GEMM's epilogue, softmax-CE with the last layer's backward) have no switch of
their own: the step between ``TrainStep, eager plan`` and ``fused, serial`` is all of them at once.
The switches are module attributes read when a plan is made; this script sets them only while it
makes the plans of a configuration.

Columns: ``ms/step`` (the median sample), ``vs eager loop`` and ``vs torch`` (speedups of that
median), ``plan`` (the plan the configuration's ``TrainStep`` made: ``eager``, ``fused serial`` or
``fused parallel``), ``first loss`` (the loss of each configuration's first step: every nnfast
configuration starts from the same parameters and batch, so they agree to rounding).

Standalone: ``PYTHONPATH=<checkout> python3 benchmarks/train_step_fusion.py [--threads 1,2]
[--json out.json]``; ``--quick`` measures a tiny MLP with few samples (a smoke check of the
script, run by ``tests/test_train_step_fusion_script.py``; its figures mean nothing). Speed is
reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnfast import bench  # noqa: E402
from nnfast.bench.machine import ThreadLimits  # noqa: E402
from nnfast.bench.timing import FULL, QUICK, Clock, Settings, Timed, figures, measure  # noqa: E402
from nnfast.op_spec import Shape  # noqa: E402

QUICK_SHAPE = Shape("small", ((24, 16, 16, 5), 8), "[24,16,16,5] b8")
#: Far above any step: the fused plan stays on the calling thread.
NEVER = 1 << 62


@contextlib.contextmanager
def _patched(settings: list[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    for obj, name, value in settings:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def configurations(threads: int) -> list[tuple[str, str, str, list[tuple[Any, str, Any]]]]:
    """``(name, backend, bench variant, switches set while the plans are made)`` for ``threads`` threads."""
    from nnfast import train_step
    from nnfast.backends.numba_kernels import gemm
    from nnfast.train_step import numba_fused

    out = [("numpy eager loop", "numpy", "eager", []),
           ("eager loop", "numba", "eager", []),
           ("TrainStep, eager plan", "numba", "TrainStep", [(train_step, "PLAN_BUILDERS", {})]),
           ("fused, serial", "numba", "TrainStep", [(numba_fused, "PARALLEL_MIN_MACS", NEVER)])]
    if threads > 1:
        out += [("fused, parallel", "numba", "TrainStep", [(numba_fused, "PARALLEL_MIN_MACS", 0)]),
                ("fused, parallel, every GEMM split", "numba", "TrainStep",
                 [(numba_fused, "PARALLEL_MIN_MACS", 0), (gemm, "PARALLEL_MIN_MACS", 0)])]
    out.append(("TrainStep", "numba", "TrainStep", []))
    return out


def _plan_kind(fn: Callable[[], Any]) -> str:
    step = getattr(fn, "train_step", None)
    if step is None:
        return "–"
    kinds = {plan.name + ("" if plan.name != "fused" else " parallel" if plan.parallel else " serial")
             for plan in step._plans.values()}
    return ", ".join(sorted(kinds))


def measure_shape(shape: Shape, threads: int, settings: Settings, torch: Any, dtype: str) -> list[dict[str, Any]]:
    """Every configuration of one shape at ``threads`` threads, measured side by side; one row each."""
    from nnfast.backends import backend_for

    spec = bench.OPS["train_step"]
    timed: list[Timed] = []
    meta: dict[str, dict[str, Any]] = {}
    for name, backend, variant, switches in configurations(threads):
        with _patched(switches):
            fn = bench.make_nnfast(backend_for(backend), spec, variant, shape, dtype)
            first = fn().item()  # the plans are made here, under the switches
        meta[name] = {"plan": _plan_kind(fn), "first_loss": first}
        timed.append(Timed(name, fn, Clock()))
    if torch is not None:
        fn = bench.make_torch(torch, "cpu", spec, "eager", shape, dtype)
        meta["torch eager"] = {"plan": "–", "first_loss": fn().item()}
        timed.append(Timed("torch eager", fn, Clock()))
    measure(timed, settings)
    amount = bench.work(spec, shape, np.dtype(dtype).itemsize)
    rows = [{"config": t.key, **meta[t.key], **figures(t, amount)} for t in timed]
    by_name = {r["config"]: r for r in rows}
    for r in rows:
        r["vs_eager_loop"] = by_name["eager loop"]["median_s"] / r["median_s"]
        if "torch eager" in by_name:
            r["vs_torch"] = by_name["torch eager"]["median_s"] / r["median_s"]
        r.update(shape=shape.label, threads=threads)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = ["config", "ms/step", "vs eager loop", "vs torch", "plan", "first loss"]
    cells = [[r["config"], f"{r['median_s'] * 1e3:.3f}", f"{r['vs_eager_loop']:.2f}×",
              f"{r['vs_torch']:.2f}×" if "vs_torch" in r else "–", r["plan"], f"{r['first_loss']:.6g}"]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells])


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"train_step_fusion.py: error: --threads: expected positive counts like 1,2, got {text!r}")
    return list(dict.fromkeys(counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                        help="comma-separated thread counts, each a run of every configuration (default: 1 and "
                             "every CPU)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--quick", action="store_true", help="a tiny MLP, few samples: a smoke check")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even when it imports")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    counts = _thread_counts(args.threads)

    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("note: PyTorch does not import here: no torch row", file=sys.stderr)
    shapes = [QUICK_SHAPE] if args.quick else [s for s in bench.OPS["train_step"].shapes if len(s.dims) == 2]
    settings = QUICK if args.quick else FULL
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    for threads in counts:
        limits = ThreadLimits(threads, torch, notes)
        try:
            for shape in shapes:
                shape_rows = measure_shape(shape, threads, settings, torch, args.dtype)
                print(f"\n{shape.label} {args.dtype}, {threads} thread{'s' if threads > 1 else ''}"
                      + (" (quick: the figures mean nothing)" if args.quick else ""))
                print(table(shape_rows))
                rows += shape_rows
        finally:
            limits.undo()
    for note in dict.fromkeys(notes):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"quick": args.quick, "dtype": args.dtype, "rows": rows}, indent=2)
                                   + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
