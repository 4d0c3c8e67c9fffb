"""Data-parallel scaling on this machine: one process, then 1 and 2 MPI ranks, one thread each.

    python benchmarks/distributed_scaling.py                 # numpy and numba, two model sizes
    python benchmarks/distributed_scaling.py --quick         # fewer steps (a smoke check)
    python benchmarks/distributed_scaling.py --backends numba --json scaling.json

Every run trains the same MLP (softmax cross-entropy, SGD with momentum) on
the same global batch, with ``NNFAST_NUM_THREADS=1`` and one BLAS thread per
process, so that N ranks use N cores. It reports, per backend and model,
the median time per training step of

* ``1 process``: the plain training step, no MPI;
* ``1 rank``: the data-parallel step under ``mpiexec -n 1`` (the hook's own cost);
* ``2 ranks``: ``mpiexec -n 2``, each rank half of the global batch;

the speedup of 2 ranks over one process (efficiency = speedup / 2), the
gradient all-reduce time that the backward pass did not hide (the median
time spent in ``reduce_gradients``, which includes waiting for the slower
rank), and the CPU time per step of one process and of one of the two ranks
(on a busy machine the wall-clock figures show how much CPU the ranks got;
the CPU figures show the work: ideal scaling halves it). Startup and the first steps (Numba
compiles) are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# name -> (layer sizes, global batch)
MODELS = {
    "[784,1024,1024,10] b256": ([784, 1024, 1024, 10], 256),
    "[64,128,10] b64": ([64, 128, 10], 64),
}
ONE_THREAD = {"NNFAST_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def worker(backend: str, model_name: str, steps: int, warmup: int, distributed: bool) -> dict:
    """Time ``steps`` training steps in this process; rank 0's figures."""
    import nnfast as nf
    from nnfast.distributed import SingleProcess, init

    dp = init(backend) if distributed else SingleProcess()
    sizes, batch = MODELS[model_name]
    with nf.use_backend(backend) as b:
        rng = np.random.default_rng(0)
        x = b.asarray(rng.random((batch, sizes[0]), dtype=np.float32))
        y = b.asarray(rng.integers(0, sizes[-1], batch))
        model = nf.MLP(sizes, activation="relu", seed=0)
        opt = nf.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = nf.SoftmaxCrossEntropy()
        dp.attach(model, opt, threading.Event())
        idx = np.arange(batch)
        step_times, reduce_times, cpu_times = [], [], []
        for step in range(warmup + steps):
            began, cpu_began = time.perf_counter(), time.process_time()
            rows = dp.shard(idx)
            loss, dlogits = dp.global_loss(*loss_fn(model.forward(x[rows]), y[rows]))
            model.backward(dlogits, need_input_grad=False, after_layer=dp.after_layer)
            reducing = time.perf_counter()
            dp.reduce_gradients()
            reduced = time.perf_counter()
            opt.step()
            opt.zero_grad()
            dp.stop_requested()
            b.synchronize()
            if step >= warmup:
                step_times.append(time.perf_counter() - began)
                cpu_times.append(time.process_time() - cpu_began)
                reduce_times.append(reduced - reducing)
    return {"rank": dp.rank, "world_size": dp.world_size, "step_ms": 1e3 * statistics.median(step_times),
            "exposed_reduce_ms": 1e3 * statistics.median(reduce_times),
            "cpu_ms": 1e3 * statistics.median(cpu_times),
            "buckets": len(getattr(dp, "buckets", []))}


def measure(backend: str, model_name: str, ranks: int | None, steps: int, warmup: int) -> dict:
    """Run one configuration in fresh processes: ``ranks`` None means one plain process."""
    from nnfast.distributed import mpiexec_path

    command = [sys.executable, __file__, "--worker", backend, model_name, str(steps), str(warmup)]
    if ranks is not None:
        command = [mpiexec_path(), "-n", str(ranks), *command, "--distributed"]
    env = dict(os.environ, **ONE_THREAD, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def _median_run(runs: list[dict]) -> dict:
    """The run whose step time is the median (the lower middle for an even count)."""
    return sorted(runs, key=lambda r: r["step_ms"])[(len(runs) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy,numba", help="comma-separated (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="10 timed steps instead of 40, one round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each configuration, interleaved; the median is reported (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--worker", nargs=4, metavar=("BACKEND", "MODEL", "STEPS", "WARMUP"), help=argparse.SUPPRESS)
    parser.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        backend, model_name, steps, warmup = args.worker
        result = worker(backend, model_name, int(steps), int(warmup), args.distributed)
        if result["rank"] == 0:  # the ranks are in step: rank 0 speaks for all
            print(json.dumps(result), flush=True)
        return 0

    steps, warmup, rounds = (10, 3, 1) if args.quick else (40, 5, max(1, args.rounds))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} cores, 1-minute load average {load:.2f} at the start; one thread per process; "
          f"median of {steps} steps after {warmup} warm-up steps; median of {rounds} interleaved rounds\n")
    print("| backend | model, global batch | 1 process ms/step | 1 rank ms/step | 2 ranks ms/step "
          "| speedup 2 ranks | efficiency | in reduce_gradients (2 ranks) | CPU ms/step: 1 process "
          "| CPU ms/step: each of 2 ranks | buckets |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for backend in args.backends.split(","):
        for model_name in MODELS:
            # Interleaved rounds: a burst of load from elsewhere hits every mode alike.
            runs: dict[int | None, list[dict]] = {None: [], 1: [], 2: []}
            for _ in range(rounds):
                for ranks in runs:
                    runs[ranks].append(measure(backend, model_name, ranks, steps, warmup))
            plain, one, two = (_median_run(runs[ranks]) for ranks in (None, 1, 2))
            speedup = plain["step_ms"] / two["step_ms"]
            rows.append({"backend": backend, "model": model_name, "process": plain, "rank1": one, "rank2": two,
                         "speedup": speedup, "load_average": load})
            print(f"| {backend} | {model_name} | {plain['step_ms']:.2f} | {one['step_ms']:.2f} | "
                  f"{two['step_ms']:.2f} | {speedup:.2f}x | {100 * speedup / 2:.0f}% | "
                  f"{two['exposed_reduce_ms']:.2f} ms | {plain['cpu_ms']:.2f} | {two['cpu_ms']:.2f} | "
                  f"{two['buckets']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
