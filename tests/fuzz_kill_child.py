"""Driver for test_checkpoint_kill.py: kill a checkpoint write with SIGKILL at many points.

Run as ``python fuzz_kill_child.py MODE DIR [N]``; prints one JSON object per
line. The driver imports nnfast once, then forks one child per kill point, so
each point costs a fork rather than an interpreter start. Every child starts
from a directory holding the *old* checkpoint and saves the *new* one into
it; the driver then reports what the directory holds.

Modes:

``count``
    Save once under ``sys.settrace`` and report how many trace events
    (Python lines, calls, returns) the save takes.
``trace K1,K2,...``
    For each K: the child counts trace events during ``save`` and SIGKILLs
    itself at the K-th, so the kill lands between two chosen Python lines
    anywhere in ``save`` (building the archive, ``mkstemp``, ``write``,
    ``fsync``, ``os.replace``, the directory ``fsync``).
``timed N``
    N children save the new checkpoint in a loop and are SIGKILLed from
    outside after a random delay of 0-40 ms (seeded).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

os.environ.setdefault("NNFAST_BACKEND", "numpy")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import nnfast as nf  # noqa: E402

NAME = "model.npz"


def make(seed: int):
    """A model and optimizer with non-trivial state; different seeds give different bytes."""
    model = nf.MLP([12, 32, 5], activation="tanh", seed=seed)
    opt = nf.Adam(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        y = model.forward(rng.standard_normal((6, 12)))
        model.backward(rng.standard_normal(tuple(y.shape)))
        opt.step()
        opt.zero_grad()
    return model, opt


def describe(directory: str, old: dict, new: dict) -> str:
    """``"old"``, ``"new"``, ``"missing"`` or ``"corrupt: ..."`` for the checkpoint in ``directory``."""
    path = os.path.join(directory, NAME)
    if not os.path.exists(path):
        return "missing"
    model, opt = make(99)
    try:
        nf.load(path, model, opt)
    except Exception as err:  # noqa: BLE001 - reported to the test
        return f"corrupt: {type(err).__name__}: {err}"
    got = {name: nf.to_numpy(p.data).tobytes() for name, p in model.named_parameters()}
    got |= {k: v.tobytes() for k, v in opt.state_dict().items()}
    if got == old:
        return "old"
    if got == new:
        return "new"
    return "corrupt: loads, but is neither the old nor the new checkpoint"


def fingerprint(model, opt) -> dict:
    out = {name: nf.to_numpy(p.data).tobytes() for name, p in model.named_parameters()}
    return out | {k: v.tobytes() for k, v in opt.state_dict().items()}


def reset(directory: str, old_bytes: bytes) -> None:
    for entry in os.listdir(directory):
        os.unlink(os.path.join(directory, entry))
    with open(os.path.join(directory, NAME), "wb") as f:
        f.write(old_bytes)


def counting_save(directory: str, model, opt, kill_at: int | None, where: list | None = None) -> int:
    """Save under a trace function that counts events and SIGKILLs the process at ``kill_at``.

    ``where``, when given, receives the file name of every event's frame.
    """
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += 1
        if where is not None:
            where.append(os.path.basename(frame.f_code.co_filename))
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return tracer

    sys.settrace(tracer)
    try:
        nf.save(os.path.join(directory, NAME), model, opt, extra={"tag": "new"})
    finally:
        sys.settrace(None)
    return count


def run_child(target) -> str:
    pid = os.fork()
    if pid == 0:  # child
        try:
            target()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return "finished" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    old_model, old_opt = make(1)
    new_model, new_opt = make(2)
    old, new = fingerprint(old_model, old_opt), fingerprint(new_model, new_opt)
    nf.save(os.path.join(directory, NAME), old_model, old_opt, extra={"tag": "old"})
    with open(os.path.join(directory, NAME), "rb") as f:
        old_bytes = f.read()

    if mode == "count":
        reset(directory, old_bytes)
        where: list[str] = []
        events = counting_save(directory, new_model, new_opt, None, where)
        # 1-based indices of the events in the file-system half of save (not building the archive).
        io_events = [i + 1 for i, name in enumerate(where) if name in ("serialization.py", "tempfile.py", "os.py")]
        print(json.dumps({"events": events, "io_events": io_events, "state": describe(directory, old, new)}),
              flush=True)
        return

    if mode == "trace":
        points = [int(k) for k in sys.argv[3].split(",")]
        for k in points:
            reset(directory, old_bytes)
            outcome = run_child(lambda: counting_save(directory, new_model, new_opt, k))
            leftovers = sorted(e for e in os.listdir(directory) if e != NAME)
            print(json.dumps({"kill_at": k, "outcome": outcome, "state": describe(directory, old, new),
                              "leftovers": leftovers}), flush=True)
        return

    if mode == "timed":
        rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 0)
        for i in range(int(sys.argv[3])):
            reset(directory, old_bytes)
            delay = rng.uniform(0.0, 0.04)
            pid = os.fork()
            if pid == 0:
                try:
                    while True:  # keep saving until killed
                        nf.save(os.path.join(directory, NAME), new_model, new_opt, extra={"tag": "new"})
                finally:
                    os._exit(0)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            print(json.dumps({"delay": delay, "outcome": "killed" if os.WIFSIGNALED(status) else "finished",
                              "state": describe(directory, old, new)}), flush=True)
        return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
