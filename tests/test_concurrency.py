"""Concurrency: ``use_backend`` is per thread / per task; kernels are correct when called from many threads."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import nnfast as nf
from nnfast.backends import backend_for
from nnfast.backends.numpy_backend import NumpyBackend

import fuzz_threads
from op_table import AVAILABLE

HERE = Path(__file__).resolve().parent


def _distinct_backends() -> list[nf.Backend]:
    """Every available backend, plus extra NumPy instances, so several threads each hold a different one."""
    backends = [backend_for(name) for name in AVAILABLE]
    while len(backends) < 6:
        backends.append(NumpyBackend())
    return backends


def test_use_backend_in_many_threads_keeps_each_threads_backend():
    backends = _distinct_backends()
    default = nf.get_backend()
    barrier = threading.Barrier(len(backends))
    errors: list[str] = []

    def worker(i: int, mine: nf.Backend) -> None:
        other = backends[(i + 1) % len(backends)]
        try:
            for round_ in range(150):
                with nf.use_backend(mine) as got:
                    assert got is mine
                    barrier.wait(timeout=60)  # every thread is inside its own block now
                    assert nf.get_backend() is mine, f"round {round_}: saw {nf.get_backend()}"
                    lin = nf.Linear(2, 2, seed=0)
                    assert lin.backend is mine and nf.SoftmaxCrossEntropy().backend is mine
                    with nf.use_backend(other):
                        assert nf.get_backend() is other
                        try:
                            with nf.use_backend(mine):
                                raise KeyError("inside")
                        except KeyError:
                            pass
                        assert nf.get_backend() is other  # restored after the exception
                    assert nf.get_backend() is mine
                    barrier.wait(timeout=60)
                assert nf.get_backend() is default  # outside any block: the process default
        except BaseException as err:  # noqa: BLE001
            errors.append(f"thread {i}: {type(err).__name__}: {err}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, b)) for i, b in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:3]
    assert nf.get_backend() is default


def test_set_backend_elsewhere_does_not_disturb_a_scoped_thread():
    before = nf.get_backend()
    mine = NumpyBackend()
    inside, proceed, seen = threading.Event(), threading.Event(), []

    def worker():
        with nf.use_backend(mine):
            inside.set()
            proceed.wait(timeout=30)
            seen.append(nf.get_backend())
        seen.append(nf.get_backend())

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(timeout=30)
    try:
        other = nf.set_backend(AVAILABLE[-1])
        proceed.set()
        t.join(timeout=30)
        assert seen[0] is mine  # the scoped backend wins over the new default
        assert seen[1] is other  # outside its block, the thread follows the process default
    finally:
        nf.set_backend(before)


def test_use_backend_is_per_asyncio_task():
    backends = _distinct_backends()

    async def task(mine):
        for _ in range(20):
            with nf.use_backend(mine):
                await asyncio.sleep(0)
                assert nf.get_backend() is mine
                await asyncio.sleep(0)
        return True

    async def run_all():
        return await asyncio.gather(*(task(b) for b in backends))

    assert all(asyncio.run(run_all()))


def test_layers_used_from_many_threads_give_serial_results():
    """Independent models trained in parallel threads match the same models trained one after another."""
    def run(seed):
        model = nf.MLP([20, 32, 5], activation="silu", dtype="float64", seed=seed)
        opt = nf.Adam(model.parameters(), lr=0.01)
        ce = nf.SoftmaxCrossEntropy(label_smoothing=0.1)
        rng = np.random.default_rng(seed)
        for _ in range(10):
            loss, d = ce(model.forward(rng.standard_normal((16, 20))), rng.integers(0, 5, 16))
            model.backward(d)
            opt.step()
            opt.zero_grad()
        return [nf.to_numpy(p.data) for p in model.parameters()]

    for name in AVAILABLE:
        with nf.use_backend(name):
            expected = [run(s) for s in range(6)]
        results: dict[int, list] = {}

        def worker(seed):
            with nf.use_backend(name):
                results[seed] = run(seed)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for s in range(6):
            for g, e in zip(results[s], expected[s]):
                np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12, err_msg=f"{name} model {s}")


@pytest.mark.parametrize("name", AVAILABLE)
def test_kernels_from_many_threads_give_correct_results(name):
    if name == "numpy":
        assert fuzz_threads.check(name, threads=4, rounds=2) > 0
        return
    # Compiled kernels run in a child process: a kernel that is not thread-safe may abort the process.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_threads.py"), name, "4", "2"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok "), (proc.returncode, proc.stderr[-3000:])


@pytest.mark.parametrize("name", [n for n in AVAILABLE if n != "numpy"]
                         or [pytest.param("none", marks=pytest.mark.skip(reason="no CPU-threaded backend"))])
def test_num_threads_cap_holds_in_every_thread(name):
    """NNFAST_NUM_THREADS caps kernels called from any thread (Numba's thread count is per thread)."""
    if name == "cupy":
        pytest.skip("GPU kernels have no CPU thread count")
    code = ("import threading, numba, nnfast as nf\n"
            f"b = nf.set_backend({name!r})\n"
            "x = nf.asarray([[1.0]])\n"
            "seen = []\n"
            "def work():\n"
            "    b.linear_forward(x, x)\n"
            "    seen.append(numba.get_num_threads())\n"
            "t = threading.Thread(target=work); t.start(); t.join()\n"
            "print(seen[0], numba.get_num_threads())\n")
    env = dict(os.environ, NNFAST_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1"], proc.stdout
