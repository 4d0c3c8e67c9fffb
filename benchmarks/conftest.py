"""pytest-benchmark suites of nnfast's kernels: ``pytest benchmarks/ --benchmark-only``.

Each ``bench_*.py`` module holds ``test_<op>`` functions, one per op of the
backend contract (``test_train_step`` for a whole training step); the hook
below parametrises them over implementation × dtype × shape, with the shapes,
inputs and work models of :mod:`nnfast.bench` (from the op table), so the two harnesses measure
the same thing. Implementations are the nnfast backends (``numpy``,
``numba``, ``cupy``) and PyTorch (``torch`` on the CPU, ``torch-cuda``); one
that cannot run here is skipped with the reason, so test ids stay the same on
every machine and ``--benchmark-compare`` lines runs up.

Environment:

* ``NNFAST_BENCH_SIZES``: comma-separated size tags to keep
  (``small,medium,large,mlp,epoch``; default all; ``epoch`` is the training
  epoch of 60,000 samples, a second or more per call).
* ``NNFAST_BENCH_DTYPES``: ``float32``, ``float64`` or both (default both).

Save and compare runs with pytest-benchmark's own options, e.g.
``--benchmark-autosave`` then ``--benchmark-compare``; the JSON lands in
``.benchmarks/``. Each result's ``extra_info`` holds the work of one call
(flop or bytes), its model, and the rate (GFLOP/s or GB/s) at the median.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from nnfast import bench
from nnfast.backends import BACKEND_NAMES, available_backends, backend_for
from nnfast.op_spec import Shape

HERE = Path(__file__).resolve().parent

#: Every implementation a benchmark is parametrised over.
IMPLS = (*BACKEND_NAMES, "torch", "torch-cuda")


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    return tuple(v.strip() for v in raw.split(",") if v.strip())


SIZES = _env_list("NNFAST_BENCH_SIZES", ("small", "medium", "mlp", "large", "epoch"))
DTYPES = _env_list("NNFAST_BENCH_DTYPES", bench.DTYPES)


# ---------------------------------------------------------------- collection
def _asked_for_here(config: pytest.Config) -> bool:
    """True when the command line names this folder or something in it."""
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (base / arg.split("::", 1)[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collect ``bench_*.py`` here (pytest's own pattern is ``test_*.py``).

    Only when the run was asked for benchmarks: ``pytest benchmarks/`` or a
    file in it (``pytest .`` runs the tests, not the benchmarks). A file
    named on the command line is collected by pytest itself already.
    """
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if HERE not in file_path.resolve().parents or parent.session.isinitpath(file_path):
        return None
    if not _asked_for_here(parent.config):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _ascii(label: str) -> str:
    for old, new in (("×", "x"), ("→", "-"), (" ", "-"), (",", "_"), ("[", ""), ("]", "")):
        label = label.replace(old, new)
    return label


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``test_<op>(impl, dtype, case)`` over implementations, dtypes and shapes."""
    if "case" not in metafunc.fixturenames:
        return
    op = metafunc.function.__name__.removeprefix("test_")
    spec = bench.OPS[op]
    cases = [(variant, shape) for variant in spec.variants for shape in spec.shapes if shape.size in SIZES]
    metafunc.parametrize("case", cases, ids=[
        "-".join(p for p in (shape.size, _ascii(shape.label), variant) if p) for variant, shape in cases])
    metafunc.parametrize("dtype", DTYPES)
    metafunc.parametrize("impl", IMPLS)


# ---------------------------------------------------------------- running
def _build(impl: str, spec: bench.OpSpec, variant: str, shape: Shape,
           dtype: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """The callable of one case and the function that waits for its device."""
    if impl.startswith("torch"):
        torch = pytest.importorskip("torch")
        device = "cuda" if impl == "torch-cuda" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("torch-cuda: PyTorch sees no CUDA device")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        return bench.make_torch(torch, device, spec, variant, shape, dtype), sync
    if impl not in available_backends():
        pytest.skip(f"backend {impl!r} cannot run here")
    backend = backend_for(impl)
    try:
        fn = bench.make_nnfast(backend, spec, variant, shape, dtype)
    except bench.LayerAPIMissing as err:
        pytest.skip(str(err))
    return fn, backend.synchronize


@pytest.fixture
def run_case(benchmark: Any) -> Callable[[str, str, str, Any], None]:
    """``run_case(op, impl, dtype, case)``: benchmark one case with pytest-benchmark."""

    def run(op: str, impl: str, dtype: str, case: tuple[str, Shape]) -> None:
        spec = bench.OPS[op]
        variant, shape = case
        fn, sync = _build(impl, spec, variant, shape, dtype)
        try:
            fn()  # first call: compilation and allocation are not measured
            sync()
        except NotImplementedError as err:
            pytest.skip(f"{impl} does not implement {op}: {err}")
        amount = bench.work(spec, shape, np.dtype(dtype).itemsize)
        benchmark.group = f"{op}{' ' + variant if variant else ''} {shape.label} {dtype}"
        benchmark.extra_info.update({"op": op, "variant": variant, "size": shape.size, "shape": shape.label,
                                     "dtype": dtype, "impl": impl, "metric": spec.metric,
                                     "work": amount, "model": spec.model})

        def call() -> None:
            fn()
            sync()

        benchmark(call)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
            benchmark.extra_info["rate"] = amount / stats.stats.median / 1e9

    return run
