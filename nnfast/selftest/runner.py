"""Running the self-test: the list of checks, one line each, the summary and the JSON report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Sequence

import numpy as np

from .check import Check, CheckFailed, Context
from .compare import Measure, compare, tolerance
from .gemm import gemm_checks
from .layers import activation_checks, linear_checks
from .rows import cross_entropy_checks, softmax_checks
from .training import optimizer_checks, train_checks

#: Schema tag of the JSON report.
SCHEMA = "nnfast-selftest/1"
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Precision:
    """A matrix-multiply precision the GEMM checks run under: how to enter it, its tolerance factor, and
    where it changes anything (elsewhere its run would repeat the default's to the bit).

    Under ``"high"`` (:mod:`nnfast.precision`) float32 GEMMs on a GPU with TF32 tensor cores round their
    operands to 10 mantissa bits (unit roundoff 2^-11): the error of a dot product of length n, relative
    to the output's scale, is about 1e-3 sqrt(n) at worst, so the float32 tolerance (4e-6 sqrt(n)) is
    widened 250 times.
    """

    name: str
    enter: Callable[[], ContextManager[Any]]
    factor: float = 1.0
    applies: Callable[[Any, np.dtype, Check], bool] = lambda backend, dtype, check: True


def _matmul_precision(name: str) -> ContextManager[Any]:
    from ..precision import matmul_precision

    return matmul_precision(name)


def _has_tf32_gemms(backend: Any, dtype: np.dtype, check: Check) -> bool:
    """float32 on the CuPy backend, the one place "high" can change a result (the CPU backends ignore it; a
    GPU without TF32 runs float32 again); the layer and training checks, not the ``gemm`` family, which pins
    the float32 kernel's tiles."""
    return np.dtype(dtype) == np.float32 and getattr(backend, "name", None) == "cupy" and check.family != "gemm"


#: Every precision the GEMM checks run under; the first is the default and adds no suffix to the names.
PRECISIONS: tuple[Precision, ...] = (
    Precision("highest", contextlib.nullcontext),
    Precision("high", lambda: _matmul_precision("high"), factor=250.0, applies=_has_tf32_gemms),
)


def checks(dtype: Any) -> list[Check]:
    """Every check of one dtype, in report order."""
    dtype = np.dtype(dtype)
    return [*activation_checks(), *linear_checks(), *gemm_checks(dtype), *softmax_checks(),
            *cross_entropy_checks(), *optimizer_checks(), *train_checks()]


@dataclass
class Result:
    """The outcome of one check (one line of the report)."""

    name: str
    family: str
    shape: str
    dtype: str
    precision: str
    passed: bool
    max_abs: float
    max_rel: float
    tolerance: float
    seconds: float
    problems: list[str] = field(default_factory=list)
    #: What ran (on the CUDA backend: the GEMM instantiations of a forced path).
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return (f"{status}  {self.name:<66} {self.shape:<22} abs {self.max_abs:8.1e}  rel {self.max_rel:8.1e}  "
                f"tol {self.tolerance:7.1e}")


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def run_check(check: Check, backend: Any, reference: Any, dtype: Any, precision: Precision = PRECISIONS[0],
              ) -> Result:
    """Run one check on ``backend`` (under ``precision`` if it runs GEMMs) and judge it."""
    dtype = np.dtype(dtype)
    name = check.name + ("" if precision is PRECISIONS[0] else f" [{precision.name}]")
    ctx = Context(backend, reference, dtype, np.random.default_rng(_seed(f"{name} {dtype.name}")))
    factor = check.factor * (precision.factor if check.gemm else 1.0)
    tol = tolerance(dtype, check.length, factor)
    began = time.perf_counter()
    try:
        with precision.enter():
            pairs = check.run(ctx)
        backend.synchronize()
        measure = compare(pairs, dtype, tol)
    except CheckFailed as err:
        measure = Measure(tolerance=tol, problems=[str(err)])
    except Exception as err:  # anything a backend raises is a failure of this check, not of the run
        measure = Measure(tolerance=tol, problems=[f"raised {type(err).__name__}: {err}"])
    seconds = time.perf_counter() - began
    return Result(name, check.family, check.shape, dtype.name, precision.name, measure.passed, measure.max_abs,
                  measure.max_rel, measure.tolerance, seconds, list(measure.problems or []), ctx.notes)


def describe_backend(backend: Any) -> dict[str, Any]:
    """The backend and the machine it runs on, for the report's header."""
    import nnfast

    info: dict[str, Any] = {"backend": backend.name, "nnfast": nnfast.__version__, "numpy": np.__version__,
                            "python": platform.python_version(), "machine": platform.machine(),
                            "cpus": os.cpu_count()}
    xp = getattr(backend, "xp", np)
    if xp is not np and hasattr(xp, "cuda") and hasattr(xp.cuda, "runtime"):
        try:
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            name = props["name"]
            info["gpu"] = {"name": name.decode() if isinstance(name, bytes) else str(name),
                           "compute_capability": f"{props['major']}.{props['minor']}",
                           "multiprocessors": props["multiProcessorCount"],
                           "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                           "cuda_runtime": xp.cuda.runtime.runtimeGetVersion(),
                           "cuda_driver": xp.cuda.runtime.driverGetVersion(), "cupy": xp.__version__}
        except Exception as err:  # the report says what it could not learn
            info["gpu"] = {"error": f"{type(err).__name__}: {err}"}
    elif backend.name == "numba":
        import numba

        info["numba"] = numba.__version__
        info["threads"] = numba.get_num_threads()
    return info


def header(info: dict[str, Any], dtypes: Sequence[str]) -> str:
    gpu = info.get("gpu")
    where = (f"{gpu.get('name')}, sm {gpu.get('compute_capability')}, {gpu.get('multiprocessors')} SMs"
             if gpu and "name" in gpu else f"{info['machine']}, {info['cpus']} CPUs")
    return (f"nnfast selftest: backend {info['backend']} on {where}; {', '.join(dtypes)}; "
            f"nnfast {info['nnfast']}, numpy {info['numpy']}")


@dataclass
class Report:
    """Every result of a run, and where the JSON goes."""

    info: dict[str, Any]
    dtypes: list[str]
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.failed

    def summary(self) -> str:
        failed = self.failed
        if not self.results:
            return f"selftest FAILED: backend {self.info['backend']}: no check ran (none matches)"
        text = (f"selftest {'passed' if not failed else 'FAILED'}: backend {self.info['backend']}, "
                f"{', '.join(self.dtypes)}: {len(self.results)} checks, {len(self.results) - len(failed)} passed, "
                f"{len(failed)} failed ({self.seconds:.1f} s)")
        if failed:
            text += "\nfailed: " + "; ".join(f"{r.name} ({r.dtype})" for r in failed)
        return text

    def as_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA,
                "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                "info": self.info, "dtypes": self.dtypes, "precisions": [p.name for p in PRECISIONS],
                "passed": self.ok, "checks": len(self.results), "failed": [r.name for r in self.failed],
                "seconds": round(self.seconds, 3),
                "results": [_finite(asdict(r)) for r in self.results]}


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: such an error is written as a string."""
    return {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v)) for k, v in record.items()}


def _write_json(path: str, report: Report) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report.as_json(), f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def run(backend: Any = None, dtypes: Iterable[Any] = ("float32",), *, match: str | Sequence[str] | None = None,
        select: Callable[[Check], bool] | None = None, json_path: str | None = None,
        log: Callable[[str], None] = print) -> Report:
    """Run the checks on ``backend``; log a line per check and the summary.

    ``backend``: a backend name or instance (default: the current backend).
    ``match``: run only the checks whose name contains it (or one of them);
    ``select``: only those it returns true for. The JSON report, if asked for, is rewritten after every check, so a run
    that is killed still leaves what it had done.
    """
    from ..backends import backend_for, get_backend
    from ..backends.numpy_backend import NumpyBackend

    backend = get_backend() if backend is None else backend_for(backend)
    reference = NumpyBackend()  # an instance of its own: the backend under test may be the registry's "numpy"
    dtypes = [np.dtype(d).name for d in dtypes]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"dtype: expected float32 or float64, got {', '.join(bad) or 'none'}")
    wanted = [match] if isinstance(match, str) else list(match or [])
    report = Report(describe_backend(backend), dtypes)
    log(header(report.info, dtypes))
    began = time.perf_counter()
    for dtype in dtypes:
        for check in checks(dtype):
            precisions = [p for p in PRECISIONS if p is PRECISIONS[0] or check.gemm and p.applies(backend, dtype, check)]
            for precision in precisions:
                if wanted and not any(text in check.name for text in wanted) or select and not select(check):
                    continue
                result = run_check(check, backend, reference, dtype, precision)
                report.results.append(result)
                report.seconds = time.perf_counter() - began
                log(result.line())
                for problem in result.problems:
                    log(f"      {problem}")
                if json_path:
                    _write_json(json_path, report)
    report.seconds = time.perf_counter() - began
    if json_path:
        _write_json(json_path, report)
    log(report.summary())
    return report


__all__ = ["DTYPES", "PRECISIONS", "Precision", "Report", "Result", "SCHEMA", "checks", "describe_backend",
           "run", "run_check"]
