"""One training step of an MLP on the GPU: eager, recorded launches, and CUDA graph replay.

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

Columns: ``us/step`` -- wall time per step over many steps, CUDA events, the median of
repeats; ``host us/call`` -- the Python call alone, the device not waited for; ``launches`` --
kernel launches per step made by the host, and the asynchronous copies of a ``TrainStep`` call
(the input, the labels, the loss out, the label flags to pinned memory; CuPy's own element-wise
kernels of the eager loop, such as the loss sum, are not counted). Speed is reported, never asserted.

Run on a machine with a GPU (``python benchmarks/train_step_gpu.py --json out.json``) or call
:func:`measure` (``tests/test_train_step_gpu.py`` does, with few steps).
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
def _counted_launches() -> Iterator[list[int]]:
    """Count the backend's kernel launches (CuPy's own element-wise kernels are not counted)."""
    from nnfast.backends import cupy_backend

    count = [0]
    launch = cupy_backend._launch

    def counting(*args: Any) -> None:
        count[0] += 1
        launch(*args)

    cupy_backend._launch = counting
    try:
        yield count
    finally:
        cupy_backend._launch = launch


def _time_steps(run: Callable[[int], Any], steps: int, repeats: int) -> tuple[float, float]:
    """(median µs per step with the device waited for, median host µs per call)."""
    import cupy

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


def _model(optimizer: str, seed: int = 0) -> tuple[Any, Any, Any]:
    import nnfast as nf

    model = nf.MLP(list(SIZES), activation="relu", seed=seed)
    opt = (nf.Adam(model.parameters(), lr=1e-3) if optimizer == "adam"
           else nf.SGD(model.parameters(), lr=0.05, momentum=0.9))
    return model, nf.SoftmaxCrossEntropy(), opt


def measure(steps: int = 300, repeats: int = 5, optimizer: str = "adam", torch: bool = True) -> list[dict[str, Any]]:
    """Time every mode; returns one row per mode (see the module documentation)."""
    import cupy

    import nnfast as nf

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    host_batches = [(rng.standard_normal((BATCH, SIZES[0])).astype(np.float32),
                     rng.integers(0, SIZES[-1], size=BATCH)) for _ in range(8)]
    with nf.use_backend("cupy") as backend:
        batches = [(backend.asarray(x), backend.asarray(y)) for x, y in host_batches]

        def pick(i: int) -> tuple[Any, Any]:
            return batches[i % len(batches)]

        def row(mode: str, run: Callable[[int], Any], launches: Any, warm: int = 20) -> None:
            for i in range(warm):
                run(i)
            backend.synchronize()
            with _counted_launches() as count:
                run(0)
                backend.synchronize()
            per_step, host = _time_steps(run, steps, repeats)
            backend.synchronize()
            rows.append({"mode": mode, "us_per_step": per_step, "host_us_per_call": host,
                         "launches": launches if launches is not None else count[0]})

        # eager: the layer API, the loss summed on the device
        model, loss_fn, opt = _model(optimizer)
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
            step = nf.TrainStep(*_model(optimizer))
            row("eager plan", lambda i: step(*pick(i)), None)
        with _env("NNFAST_CUDA_GRAPH", "0"):
            direct = nf.TrainStep(*_model(optimizer))
            direct(*pick(0))
        kernels = len(next(iter(direct._plans.values())).launches)
        row("launches", lambda i: direct(*pick(i)), f"{kernels}, 4 copies")
        step = nf.TrainStep(*_model(optimizer))
        step(*pick(0))
        plan, = step._plans.values()
        row("graph", lambda i: step(*pick(i)), f"1 graph ({kernels} kernels), 4 copies")
        stream = cupy.cuda.get_current_stream()
        row("graph replay", lambda i: plan.graph.launch(stream), f"1 graph ({kernels} kernels)")
    if torch:
        rows.extend(_torch_rows(host_batches, steps, repeats, optimizer))
    return rows


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
    return [{"mode": "torch eager", "us_per_step": statistics.median(device),
             "host_us_per_call": statistics.median(host), "launches": "-"}]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table, with each mode's speed-up over torch eager where it was measured."""
    torch_us = next((r["us_per_step"] for r in rows if r["mode"] == "torch eager"), None)
    lines = [f"{'mode':<14}{'us/step':>10}{'host us/call':>14}{'x torch':>9}  launches"]
    for r in rows:
        ratio = f"{torch_us / r['us_per_step']:.1f}" if torch_us else "-"
        lines.append(f"{r['mode']:<14}{r['us_per_step']:>10.1f}{r['host_us_per_call']:>14.1f}{ratio:>9}"
                     f"  {r['launches']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = measure(args.steps, args.repeats, args.optimizer, torch=not args.no_torch)
    print(f"training step {list(SIZES)}, batch {BATCH}, {args.optimizer}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
