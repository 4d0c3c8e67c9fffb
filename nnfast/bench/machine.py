"""The machine: what it is (CPU, GPU, threads, versions) and its limits (GEMM and memory-copy rates)."""

from __future__ import annotations

import math
import os
import platform
import sys
from typing import Any, Callable, Sequence

import numpy as np

from .cases import GEMM_REF
from .timing import Clock, CupyClock, Settings, Timed, figures, measure

#: Bytes copied by the memory-copy limit on each device.
CPU_COPY_BYTES = 64 * 2**20
GPU_COPY_BYTES = 256 * 2**20


def make_gemm(xp: Any, dims: tuple[int, int, int], dtype: str, seed: int = 1) -> Callable[[], Any]:
    """``A @ B`` with A (M, K), B (K, N) in the array module ``xp`` (NumPy/BLAS or CuPy/cuBLAS)."""
    m, k, n = dims
    rng = xp.random.default_rng(seed)  # on the device for CuPy: GPU-sized operands never pass through the host
    a = xp.asarray(rng.standard_normal((m, k)).astype(dtype))
    b = xp.asarray(rng.standard_normal((k, n)).astype(dtype))
    out = xp.empty((m, n), dtype=dtype)
    return lambda: xp.matmul(a, b, out=out)


def make_copy(xp: Any, nbytes: int) -> Callable[[], Any]:
    """A large copy between two preallocated arrays (host memory, or device memory on a GPU)."""
    src = xp.ones(nbytes // 4, dtype=np.float32)
    dst = xp.empty_like(src)
    return lambda: xp.copyto(dst, src)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        cores = set()
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            phys = core = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
            if core is not None:
                cores.add((phys, core))
        return len(cores) or None
    except OSError:
        return None


def load_average() -> float | None:
    """The 1-minute load average, where the OS reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info(torch: Any = None, gpu: bool = False) -> dict[str, Any]:
    """CPU, cores, threads, GPU and library versions of this run."""
    import nnfast

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"nnfast": getattr(nnfast, "__version__", None), "numpy": np.__version__},
        "threads": {},
        "env": {k: os.environ[k] for k in ("NNFAST_NUM_THREADS", "NNFAST_BACKEND", "OMP_NUM_THREADS",
                                            "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
                if k in os.environ},
        "gpu": None,
    }
    load = load_average()
    if load is not None:
        info["load_average_1min"] = round(load, 2)
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}".strip()
    except Exception:
        info["blas"] = None
    try:
        from threadpoolctl import threadpool_info

        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            info["threads"]["blas"] = pools[0].get("num_threads")
    except Exception:
        pass
    if "numba" in sys.modules:
        import numba

        info["versions"]["numba"] = numba.__version__
        info["threads"]["numba"] = numba.get_num_threads()
    elif _version("numba"):
        info["versions"]["numba"] = _version("numba")
    if torch is not None:
        info["versions"]["torch"] = torch.__version__
        info["threads"]["torch"] = torch.get_num_threads()
    if "cupy" in sys.modules:
        import cupy

        info["versions"]["cupy"] = cupy.__version__
        if gpu:
            try:
                props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
                name = props["name"]
                info["gpu"] = {
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                    "multiprocessors": props.get("multiProcessorCount"),
                    "compute_capability": f"{props.get('major')}.{props.get('minor')}",
                    "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                    "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
                }
            except Exception as err:  # pragma: no cover - GPU only
                info["gpu"] = {"name": f"unknown ({err})"}
    return info


class ThreadLimits:
    """``--threads N``: cap BLAS (threadpoolctl), Numba and PyTorch at N threads; ``undo`` restores."""

    def __init__(self, n: int, torch: Any, notes: list[str]) -> None:
        self._undo: list[Callable[[], None]] = []
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=n, user_api="blas")
            self._undo.append(limiter.restore_original_limits)
        except ImportError:
            notes.append("--threads: threadpoolctl is not installed, BLAS threads left as they are")
        if "numba" in sys.modules or _version("numba"):
            try:
                import numba

                before = numba.get_num_threads()
                numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
                self._undo.append(lambda: numba.set_num_threads(before))
            except Exception as err:  # pragma: no cover - a broken Numba install
                notes.append(f"--threads: Numba threads left as they are ({err})")
        if torch is not None:
            before_torch = torch.get_num_threads()
            torch.set_num_threads(n)
            self._undo.append(lambda: torch.set_num_threads(before_torch))

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()


def measure_limits(dtypes: Sequence[str], gpu: bool, settings: Settings) -> dict[str, Any]:
    """The machine's GEMM (1024³, per dtype) and memory-copy rates, measured now."""
    limits: dict[str, Any] = {}
    devices = [("cpu", np, Clock(), CPU_COPY_BYTES)]
    if gpu:
        import cupy

        devices.append(("gpu", cupy, CupyClock(), GPU_COPY_BYTES))
    for device, xp, clock, nbytes in devices:
        copy = Timed("copy", make_copy(xp, nbytes), clock)
        ref = GEMM_REF[device]
        gemms = {dt: Timed(f"gemm {dt}", make_gemm(xp, ref, dt), clock) for dt in dtypes}
        measure([copy, *gemms.values()], settings)
        what = "numpy.copyto" if device == "cpu" else "cupy.copyto (device to device)"
        limits[device] = {
            "copy": {"what": f"{what}, {nbytes // 2**20} MiB, read + write", "bytes": 2 * nbytes,
                     **figures(copy, 2.0 * nbytes)},
            "gemm": {dt: {"what": f"{'numpy' if device == 'cpu' else 'cupy'}.matmul "
                                  f"{'×'.join(map(str, ref))} {dt}",
                          "flop": 2.0 * math.prod(ref), **figures(t, 2.0 * math.prod(ref))}
                     for dt, t in gemms.items()},
        }
    return limits
