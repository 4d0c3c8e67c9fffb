"""One training step of an MLP: eager against ``nf.TrainStep`` recorded and replayed as a CUDA graph.

The target shape is [784, 256, 256, 10], ReLU, batch 128, Adam (``--optimizer sgd`` for SGD
with momentum). Every mode trains its own copy of one model on the same batches (random data,
never zeros), in one run:

* ``eager``: the layer API, as a training loop writes it (forward, loss, backward, step; the
  loss summed on the device, never read per step);
* ``eager plan``: ``nf.TrainStep`` with its eager plan (it reads the loss each step to guard
  the update: one synchronisation per step);
* ``launches``: ``nf.TrainStep``'s recorded step made as direct launches (``NNFAST_CUDA_GRAPH=0``);
* ``graph``: ``nf.TrainStep``'s recorded step replayed as a CUDA graph;
* ``graph replay``: the captured graph alone, launched back to back (the device's time for a step);
* ``torch eager``: the same model and optimizer in PyTorch (CUDA, eager), when it is installed.

Columns: ``steps/s`` and ``us/step`` -- wall time per step over many steps, the device waited for
at the end (CUDA events), the median of repeats; ``host us/call`` -- the Python call alone, the
device not waited for; ``syncs/step`` -- the fraction of calls that waited for the device: before
each of a few probe calls a kernel keeps the device busy for 20 ms, and a call whose host time
exceeds half of that waited for it (1.0: every call synchronises, as the eager plan's loss
check does; 0.0: none); ``launches`` -- kernel launches per step made by the host, and the
asynchronous copies of a ``TrainStep`` call (the input, the labels, the loss out, the label
flags to pinned memory; CuPy's own element-wise kernels of the eager loop, such as the loss
sum, are not counted). Speed is reported, never asserted.

Standalone: ``PYTHONPATH=<checkout> python3 benchmarks/gpu/train_step.py [--json out.json]``
needs CuPy and a GPU. ``--dry-run`` runs the modes a CPU backend has (``eager``, ``eager plan``)
on Numba (NumPy without it) at a tiny shape with a few steps, with no probe, so that CI keeps
the script working (``tests/test_bench_train_step_gpu.py``); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

SIZES = (784, 256, 256, 10)
BATCH = 128
DRY_SIZES = (24, 16, 16, 5)
DRY_BATCH = 8
#: How long the probe kernel keeps the device busy before a probe call, and how many probe calls.
PROBE_SECONDS, PROBE_CALLS = 0.02, 8


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _eager_plans_only() -> Iterator[None]:
    from nnfast.train_step import PLAN_BUILDERS

    saved = dict(PLAN_BUILDERS)
    PLAN_BUILDERS.clear()
    try:
        yield
    finally:
        PLAN_BUILDERS.update(saved)


@contextlib.contextmanager
def _counted_launches(gpu: bool) -> Iterator[list[int]]:
    """Count the CuPy backend's kernel launches (CuPy's own element-wise kernels are not counted)."""
    count = [0]
    if not gpu:
        yield count
        return
    from nnfast.backends import cupy_backend

    launch = cupy_backend._launch

    def counting(*args: Any) -> None:
        count[0] += 1
        launch(*args)

    cupy_backend._launch = counting
    try:
        yield count
    finally:
        cupy_backend._launch = launch


class _CpuClock:
    """Wall time on the host; the backend's work is done when its call returns."""

    def time(self, run: Callable[[int], Any], steps: int, repeats: int) -> tuple[float, float]:
        """(median µs per step, the same as host µs per call)."""
        per_step = []
        for _ in range(repeats):
            began = time.perf_counter()
            for i in range(steps):
                run(i)
            per_step.append((time.perf_counter() - began) / steps * 1e6)
        return statistics.median(per_step), statistics.median(per_step)

    def syncs_per_step(self, run: Callable[[int], Any]) -> float | None:
        return None  # no device to wait for


class _GpuClock:
    """CUDA events for the device's time, the host's clock for the call, and the busy-device probe."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.spin = cupy.RawKernel(r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}""", "spin")
        self.cycles = np.int64(PROBE_SECONDS * 1e9)  # about 20 ms at 1 GHz, then calibrated
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        for _ in range(2):  # the first launch also loads the kernel
            start.record()
            self.spin((1,), (1,), (self.cycles,))
            end.record()
            end.synchronize()
        seconds = cupy.cuda.get_elapsed_time(start, end) / 1e3
        self.cycles = np.int64(self.cycles * PROBE_SECONDS / seconds)

    def time(self, run: Callable[[int], Any], steps: int, repeats: int) -> tuple[float, float]:
        """(median µs per step with the device waited for, median host µs per call)."""
        cupy = self.cupy
        stream = cupy.cuda.get_current_stream()
        device, host = [], []
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            stream.synchronize()
            start.record(stream)
            began = time.perf_counter()
            for i in range(steps):
                run(i)
            host.append((time.perf_counter() - began) / steps * 1e6)
            end.record(stream)
            end.synchronize()
            device.append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / steps)
        return statistics.median(device), statistics.median(host)

    def syncs_per_step(self, run: Callable[[int], Any]) -> float:
        """The fraction of probe calls that waited for a kernel queued before them."""
        stream = self.cupy.cuda.get_current_stream()
        waited = 0
        for i in range(PROBE_CALLS):
            stream.synchronize()
            self.spin((1,), (1,), (self.cycles,))
            began = time.perf_counter()
            run(i)
            waited += time.perf_counter() - began > PROBE_SECONDS / 2
            stream.synchronize()
        return waited / PROBE_CALLS


def _model(optimizer: str, sizes: tuple[int, ...], seed: int = 0) -> tuple[Any, Any, Any]:
    import nnfast as nf

    model = nf.MLP(list(sizes), activation="relu", seed=seed)
    opt = (nf.Adam(model.parameters(), lr=1e-3) if optimizer == "adam"
           else nf.SGD(model.parameters(), lr=0.05, momentum=0.9))
    return model, nf.SoftmaxCrossEntropy(), opt


def dry_backend() -> str:
    """The CPU backend of ``--dry-run``: Numba where it imports, else NumPy."""
    import nnfast as nf

    return "numba" if "numba" in nf.available_backends() else "numpy"


def measure(steps: int = 300, repeats: int = 5, optimizer: str = "adam", torch: bool = True,
            dry_run: bool = False) -> list[dict[str, Any]]:
    """Time every mode; returns one row per mode (see the module documentation)."""
    import nnfast as nf

    sizes, batch = (DRY_SIZES, DRY_BATCH) if dry_run else (SIZES, BATCH)
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    host_batches = [(rng.standard_normal((batch, sizes[0])).astype(np.float32),
                     rng.integers(0, sizes[-1], size=batch)) for _ in range(8)]
    with nf.use_backend(dry_backend() if dry_run else "cupy") as backend:
        clock = _CpuClock() if dry_run else _GpuClock()
        batches = [(backend.asarray(x), backend.asarray(y)) for x, y in host_batches]

        def pick(i: int) -> tuple[Any, Any]:
            return batches[i % len(batches)]

        def row(mode: str, run: Callable[[int], Any], launches: Any, warm: int = 20) -> None:
            for i in range(warm):
                run(i)
            backend.synchronize()
            with _counted_launches(not dry_run) as count:
                run(0)
                backend.synchronize()
            per_step, host = clock.time(run, steps, repeats)
            syncs = clock.syncs_per_step(run)
            backend.synchronize()
            rows.append({"mode": mode, "backend": backend.name, "us_per_step": per_step,
                         "steps_per_s": 1e6 / per_step, "host_us_per_call": host, "syncs_per_step": syncs,
                         "launches": launches if launches is not None else count[0] if not dry_run else "-"})

        # eager: the layer API, the loss summed on the device
        model, loss_fn, opt = _model(optimizer, sizes)
        total = backend.zeros((), "float32")

        def eager(i: int) -> None:
            nonlocal total
            x, y = pick(i)
            opt.zero_grad()
            loss, dlogits = loss_fn(model.forward(x), y)
            model.backward(dlogits, need_input_grad=False)
            opt.step()
            total = total + loss

        row("eager", eager, None)
        with _eager_plans_only():
            step = nf.TrainStep(*_model(optimizer, sizes))
            row("eager plan", lambda i: step(*pick(i)), None)
        if not dry_run:
            _recorded_rows(row, pick, optimizer)
    if torch and not dry_run:
        rows.extend(_torch_rows(host_batches, steps, repeats, optimizer))
    return rows


def _recorded_rows(row: Callable[..., None], pick: Callable[[int], Any], optimizer: str) -> None:
    """The ``launches``, ``graph`` and ``graph replay`` modes (CuPy only), each measured by ``row``."""
    import cupy

    import nnfast as nf

    with _env("NNFAST_CUDA_GRAPH", "0"):
        direct = nf.TrainStep(*_model(optimizer, SIZES))
        direct(*pick(0))
    kernels = len(next(iter(direct._plans.values())).launches)
    row("launches", lambda i: direct(*pick(i)), f"{kernels}, 4 copies")
    step = nf.TrainStep(*_model(optimizer, SIZES))
    step(*pick(0))
    plan, = step._plans.values()
    row("graph", lambda i: step(*pick(i)), f"1 graph ({kernels} kernels), 4 copies")
    stream = cupy.cuda.get_current_stream()
    row("graph replay", lambda i: plan.graph.launch(stream), f"1 graph ({kernels} kernels)")


def _torch_rows(host_batches: list[tuple[np.ndarray, np.ndarray]], steps: int, repeats: int,
                optimizer: str) -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    layers: list[Any] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).cuda()
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    batches = [(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()) for x, y in host_batches]

    def run(i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for i in range(20):
        run(i)
    torch.cuda.synchronize()
    device, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        began = time.perf_counter()
        for i in range(steps):
            run(i)
        host.append((time.perf_counter() - began) / steps * 1e6)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end) * 1e3 / steps)
    per_step = statistics.median(device)
    return [{"mode": "torch eager", "backend": "torch", "us_per_step": per_step, "steps_per_s": 1e6 / per_step,
             "host_us_per_call": statistics.median(host), "syncs_per_step": None, "launches": "-"}]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table, with each mode's speed-up over torch eager where it was measured."""
    torch_us = next((r["us_per_step"] for r in rows if r["mode"] == "torch eager"), None)
    lines = [f"{'mode':<14}{'steps/s':>10}{'us/step':>10}{'host us/call':>14}{'syncs/step':>12}{'x torch':>9}"
             "  launches"]
    for r in rows:
        ratio = f"{torch_us / r['us_per_step']:.1f}" if torch_us else "-"
        syncs = "-" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.2f}"
        lines.append(f"{r['mode']:<14}{r['steps_per_s']:>10.0f}{r['us_per_step']:>10.1f}"
                     f"{r['host_us_per_call']:>14.1f}{syncs:>12}{ratio:>9}  {r['launches']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat (300; 5 with --dry-run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (5; 2 with --dry-run)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU modes on Numba (or NumPy) at a tiny shape: checks the script, measures nothing")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    for name, full, dry in (("steps", 300, 5), ("repeats", 5, 2)):
        value = getattr(args, name)
        if value is None:
            setattr(args, name, dry if args.dry_run else full)
        elif value < 1:
            parser.error(f"--{name}: expected a positive count, got {value}")
    rows = measure(args.steps, args.repeats, args.optimizer, torch=not args.no_torch, dry_run=args.dry_run)
    sizes, batch = (DRY_SIZES, DRY_BATCH) if args.dry_run else (SIZES, BATCH)
    print(f"training step {list(sizes)}, batch {batch}, {args.optimizer}, {rows[0]['backend']}"
          + (" (dry run: the figures mean nothing)" if args.dry_run else ""))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": list(sizes), "batch": batch, "optimizer": args.optimizer,
                       "dry_run": args.dry_run, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
