"""One rank of the MPI tests: ``mpiexec -n N python distributed_rank.py SCENARIO OUTDIR``.

Scenarios (tests/test_distributed_mpi.py checks what they write):

* ``trajectories``: trains every case of :data:`CASES` data-parallel and
  writes ``<case>.rank<R>.npz`` (parameters, optimizer state, per-epoch loss
  and accuracy) for comparison with one process and between ranks;
* ``stop``: rank 1 alone asks to stop (as a Ctrl-C reaching one rank would);
  every rank must stop after the same step, and rank 0 alone saves;
* ``threads``: records the Numba thread count ``init()`` chose for the rank;
* ``kill``, ``raise``, ``raise-unguarded``, ``hang``: rank 1 fails at its
  third step (SIGKILL, an exception inside or outside the CLI's guard, a
  sleep that never ends); the job must end with an error, not hang.

The module also defines the data and cases the tests' single-process runs use.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from nnfast.data import Dataset
from nnfast.train import Interrupted, TrainConfig


def make_data(n_train: int = 29, n_test: int = 11, features: int = 12, classes: int = 4) -> Dataset:
    """A small learnable set: 29 rows split 7 at a time leave a last batch of 1 row."""
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(n_train + n_test, features)).astype(np.float32)
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.3 * rng.normal(size=(n_train + n_test, classes)), axis=1).astype(np.int64)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:])


_COMMON = dict(hidden=(16, 8), epochs=3, batch_size=7, label_smoothing=0.1, dtype="float64", progress=False)
# name -> (TrainConfig settings, gradient bucket bytes). 7 rows per global batch split over two ranks
# are 4 + 3; the last batch of each epoch (1 row) leaves rank 1 an empty slice.
CASES = {
    "numpy-sgd": (dict(_COMMON, backend="numpy", optimizer="sgd", lr=0.1, weight_decay=1e-3), 256),
    "numpy-adam": (dict(_COMMON, backend="numpy", optimizer="adam", lr=0.01, weight_decay=1e-2), 256),
    "numba-sgd": (dict(_COMMON, backend="numba", optimizer="sgd", lr=0.1, weight_decay=1e-3), 256),
    "numba-adam": (dict(_COMMON, backend="numba", optimizer="adam", lr=0.01, weight_decay=1e-2), 256),
    "numba-sgd-float32-one-bucket": (dict(_COMMON, backend="numba", optimizer="sgd", lr=0.1, dtype="float32"),
                                     1 << 20),
}


def config(case: str, **changes) -> TrainConfig:
    settings, _ = CASES[case]
    return TrainConfig(**dict(settings, **changes))


def snapshot(result, opt_state: dict) -> dict[str, np.ndarray]:
    """What a rank writes: parameters, optimizer state, per-epoch statistics."""
    out = {f"param/{name}": np.asarray(p.data) for name, p in result.model.named_parameters()}
    out.update({f"optim/{k}": v for k, v in opt_state.items()})
    out["loss"] = np.array([e.loss for e in result.history])
    out["accuracy"] = np.array([e.test_accuracy for e in result.history])
    return out


class Keep:
    """A training hook that passes everything to ``inner`` and keeps the optimizer it is given."""

    def __init__(self, inner) -> None:
        self.inner, self.optimizer = inner, None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def attach(self, model, optimizer, stop) -> None:
        self.optimizer = optimizer
        self.inner.attach(model, optimizer, stop)


def run(cfg: TrainConfig, parallel=None, **kwargs):
    """``train`` on :func:`make_data`; returns the result and the optimizer's final state."""
    from nnfast.distributed import SingleProcess
    from nnfast.train import train

    hook = Keep(parallel if parallel is not None else SingleProcess())
    result = train(cfg, log=lambda line: None, data=make_data(), parallel=hook, **kwargs)
    return result, hook.optimizer.state_dict()


def main(scenario: str, out: Path) -> None:
    from nnfast import distributed
    from nnfast.train import NonFiniteLossError

    dp = distributed.init("numba" if scenario == "threads" else "numpy")
    rank = dp.rank
    if scenario == "threads":  # what init() left for the Numba backend of this rank
        (out / f"threads.rank{rank}.json").write_text(json.dumps(os.environ.get("NNFAST_NUM_THREADS")))
        return
    if scenario == "trajectories":
        for case, (_, bucket_bytes) in CASES.items():
            parallel = distributed.DataParallel(dp.engine, bucket_bytes=bucket_bytes)
            with dp.abort_on_error():
                result, state = run(config(case), parallel=parallel)
            np.savez(out / f"{case}.rank{rank}.npz", **snapshot(result, state))
        return
    if scenario == "stop":
        stop = threading.Event()

        def on_step(epoch: int, batch: int) -> None:
            if rank == 1 and (epoch, batch) == (1, 1):
                stop.set()

        try:
            with dp.abort_on_error((Interrupted,)):
                run(config("numpy-adam", checkpoint=str(out / f"stop.rank{rank}.npz")),
                                           parallel=dp, stop=stop, on_step=on_step)
        except Interrupted as err:
            (out / f"interrupted.rank{rank}.json").write_text(json.dumps([err.epoch, err.batch]))
        return

    steps = [0]

    def fail(epoch: int, batch: int) -> None:
        steps[0] += 1
        if rank != 1 or steps[0] != 3:
            return
        if scenario == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if scenario in ("raise", "raise-unguarded"):
            raise RuntimeError("injected failure on rank 1")
        if scenario == "hang":
            time.sleep(3600)

    cfg = config("numpy-sgd", epochs=50)
    if scenario == "raise-unguarded":  # the exception hook init() installed must end the job
        run(cfg, parallel=dp, on_step=fail)
    else:
        with dp.abort_on_error((Interrupted, NonFiniteLossError)):
            run(cfg, parallel=dp, on_step=fail)
    (out / f"finished.rank{rank}").write_text("")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
