"""Backend selection: NNFAST_BACKEND, set_backend, use_backend (DESIGN §4)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

import nnfast as nf
from nnfast.backends import BACKEND_NAMES, unavailable_reason

AVAILABLE = nf.available_backends()


def _run(code: str, env_value: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("NNFAST_BACKEND", None)
    if env_value is not None:
        env["NNFAST_BACKEND"] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value", ["numpy", "numba", "cupy", "auto", "NumPy", None])
def test_env_value_selects_backend_or_raises(value):
    proc = _run("import nnfast as nf; print(nf.get_backend().name)", value)
    wanted = (value or "auto").lower()
    if wanted == "auto":
        assert proc.returncode == 0, proc.stderr
        expected = "cupy" if "cupy" in AVAILABLE else ("numba" if "numba" in AVAILABLE else "numpy")
        assert proc.stdout.strip() == expected
    elif wanted in AVAILABLE:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == wanted
    else:
        assert proc.returncode != 0
        assert "BackendError" in proc.stderr and repr(wanted) in proc.stderr
        assert unavailable_reason(wanted).split(" (")[0] in proc.stderr


def test_unknown_env_value_raises_at_import_listing_choices():
    proc = _run("import nnfast", "tensorflow")
    assert proc.returncode != 0
    assert "BackendError" in proc.stderr
    assert "'tensorflow'" in proc.stderr
    for name in ("numpy", "numba", "cupy", "auto"):
        assert name in proc.stderr


def test_auto_logs_its_pick_at_debug_level():
    code = ("import logging, nnfast as nf; logging.basicConfig(level=logging.DEBUG); "
            "print(nf.get_backend().name)")
    proc = _run(code, "auto")
    assert proc.returncode == 0, proc.stderr
    assert f"picked {proc.stdout.strip()!r}" in proc.stderr


def test_unknown_name_raises():
    with pytest.raises(nf.BackendError, match="'torch'.*numpy, numba, cupy, auto"):
        nf.set_backend("torch")
    with pytest.raises(nf.BackendError, match="unknown backend"):
        with nf.use_backend(3):
            pass


@pytest.mark.parametrize("name", [n for n in BACKEND_NAMES if n not in AVAILABLE])
def test_unavailable_backend_raises_never_falls_back(name):
    before = nf.get_backend()
    with pytest.raises(nf.BackendError, match=f"backend {name!r} cannot run here"):
        nf.set_backend(name)
    assert nf.get_backend() is before


def test_use_backend_nests_and_restores():
    outer = nf.get_backend()
    with nf.use_backend("numpy") as a:
        assert nf.get_backend() is a and a.name == "numpy"
        inner_name = AVAILABLE[-1]
        with nf.use_backend(inner_name) as b:
            assert nf.get_backend() is b and b.name == inner_name
        assert nf.get_backend() is a
    assert nf.get_backend() is outer


def test_use_backend_restores_after_exception():
    outer = nf.get_backend()
    with pytest.raises(ZeroDivisionError):
        with nf.use_backend("numpy"):
            1 / 0
    assert nf.get_backend() is outer


def test_set_backend_is_process_wide():
    outer = nf.get_backend()
    try:
        nf.set_backend("numpy")
        seen = []
        t = threading.Thread(target=lambda: seen.append(nf.get_backend().name))
        t.start()
        t.join()
        assert seen == ["numpy"]
    finally:
        nf.set_backend(outer)


def test_use_backend_is_per_thread():
    names = AVAILABLE
    barrier = threading.Barrier(len(names) * 2)
    results, errors = {}, []

    def worker(i: int, name: str) -> None:
        try:
            with nf.use_backend(name):
                barrier.wait(timeout=30)
                for _ in range(200):
                    assert nf.get_backend().name == name
                results[i] = nf.get_backend().name
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i, names[i % len(names)])) for i in range(len(names) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: names[i % len(names)] for i in range(len(threads))}


def test_asarray_and_to_numpy_round_trip():
    import numpy as np

    with nf.use_backend("numpy"):
        a = nf.asarray([[1, 2]], dtype="float32")
        assert isinstance(a, np.ndarray) and a.dtype == np.float32
        assert nf.to_numpy(a) is a
    with pytest.raises(TypeError, match="x: cannot convert a object to a numeric array"):
        nf.asarray(object())


def test_num_threads_env_is_validated():
    from nnfast.backends import apply_num_threads

    calls = []
    os.environ["NNFAST_NUM_THREADS"] = "1"
    try:
        assert apply_num_threads(calls.append, 4) == 1 and calls == [1]
        os.environ["NNFAST_NUM_THREADS"] = "64"
        assert apply_num_threads(calls.append, 4) == 4
        os.environ["NNFAST_NUM_THREADS"] = "many"
        with pytest.raises(nf.BackendError, match="NNFAST_NUM_THREADS"):
            apply_num_threads(calls.append, 4)
    finally:
        del os.environ["NNFAST_NUM_THREADS"]
