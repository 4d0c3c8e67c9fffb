"""The machine: what it is (CPU, GPU, threads, versions) and its limits (GEMM and memory-copy rates)."""

from __future__ import annotations

import math
import os
import platform
import sys
from typing import Any, Callable, Sequence

import numpy as np

from .cases import GEMM_REF, OpSpec, gemm_dims, work
from .stream import bytes_per_element, describe, make_stream
from .timing import Clock, CupyClock, Settings, Timed, figures, measure

#: Bytes copied by the run-level memory-copy limit on each device (beyond every cache).
CPU_COPY_BYTES = 64 * 2**20
GPU_COPY_BYTES = 256 * 2**20


def make_gemm(xp: Any, dims: tuple[int, int, int], dtype: str, tf32: bool = False,
              seed: int = 1) -> Callable[[], Any]:
    """``A @ B`` with A (M, K), B (K, N) in the array module ``xp`` (NumPy/BLAS or CuPy/cuBLAS).

    ``tf32``: a float32 product on the tensor cores in TF32 (CuPy's compute type for float32 set to
    TF32 for the call, then put back): the measured tensor-core rate the TF32 kernels are compared with.
    """
    m, k, n = dims
    rng = xp.random.default_rng(seed)  # on the device for CuPy: GPU-sized operands never pass through the host
    a = xp.asarray(rng.standard_normal((m, k)).astype(dtype))
    b = xp.asarray(rng.standard_normal((k, n)).astype(dtype))
    out = xp.empty((m, n), dtype=dtype)
    if not tf32:
        return lambda: xp.matmul(a, b, out=out)
    from cupy._core import _routines_linalg as linalg

    def matmul_tf32() -> Any:
        before = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
        try:
            return xp.matmul(a, b, out=out)
        finally:
            linalg.set_compute_type(np.float32, before)

    return matmul_tf32


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
        try:
            info["numba_threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel kernel has run
            pass
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
    """The machine's GEMM (:data:`GEMM_REF` per device and dtype; on a GPU float32 in TF32 too, as
    ``"float32 TF32"``) and memory-copy rates, measured now."""
    limits: dict[str, Any] = {}
    devices = [("cpu", np, Clock(), CPU_COPY_BYTES)]
    if gpu:
        import cupy

        devices.append(("gpu", cupy, CupyClock(), GPU_COPY_BYTES))
    for device, xp, clock, nbytes in devices:
        if device == "cpu":
            copy = Timed("copy", make_stream((1, 1, 0), nbytes // 4, "float32", "all"), clock)
            what = "memory copy (stream 1R 1W) on every thread"
        else:
            copy = Timed("copy", make_copy(xp, nbytes), clock)
            what = "cupy.copyto (device to device)"
        ref = GEMM_REF[device]
        gemms = {dt: Timed(f"gemm {dt}", make_gemm(xp, ref, dt), clock) for dt in dtypes}
        if device == "gpu" and "float32" in dtypes:  # the tensor cores' TF32 rate (matmul precision "high")
            gemms["float32 TF32"] = Timed("gemm float32 TF32", make_gemm(xp, ref, "float32", tf32=True), clock)
        measure([copy, *gemms.values()], settings)
        limits[device] = {
            "copy": {"what": f"{what}, {nbytes // 2**20} MiB, read + write", "bytes": 2 * nbytes,
                     **figures(copy, 2.0 * nbytes)},
            "gemm": {dt: {"what": f"{'numpy' if device == 'cpu' else 'cupy'}.matmul "
                                  f"{'×'.join(map(str, ref))} {dt}",
                          "flop": 2.0 * math.prod(ref), **figures(t, 2.0 * math.prod(ref))}
                     for dt, t in gemms.items()},
        }
    return limits


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.3g} KiB"


def limit_candidates(spec: OpSpec, shape: Any, dtype: str, device: str
                     ) -> list[tuple[str, str, float, Callable[[int], Callable[[], Any]]]]:
    """The ways of measuring a case's machine limit on ``device``: ``(key, what, work, build)``.

    ``build(seed)`` makes the callable (``seed`` picks the operands). The
    row's limit is the fastest of them. GFLOP/s kernels: the BLAS (or
    cuBLAS) GEMM at the kernel's shape (at the reference shape for the
    training step). GB/s kernels on the CPU: the op's memory traffic
    (:mod:`.stream`) at the case's size, on every thread and on one; on a
    GPU, a device-to-device copy; ``gpu-tf32``: cuBLAS with TF32 tensor cores.
    """
    if spec.metric == "GFLOP/s":
        m, k, n = gemm_dims(spec, shape, "cpu" if device == "cpu" else "gpu")
        lib = "numpy" if device == "cpu" else "cupy"
        xp: Any = np
        if device != "cpu":
            import cupy as xp
        tf32 = device == "gpu-tf32"  # the tensor-core rate that matmul precision "high" is compared with
        return [(f"limit-{device}", f"{lib}.matmul {m}×{k}×{n} {dtype}{' TF32' if tf32 else ''}", 2.0 * m * k * n,
                 lambda seed: make_gemm(xp, (m, k, n), dtype, tf32, seed + 1))]
    if device != "cpu":
        import cupy

        return [(f"limit-{device}", f"cupy.copyto {GPU_COPY_BYTES // 2**20} MiB, device to device, read + write",
                 2.0 * GPU_COPY_BYTES, lambda seed: make_copy(cupy, GPU_COPY_BYTES))]
    itemsize = np.dtype(dtype).itemsize
    per_element = bytes_per_element(spec.streams) * itemsize
    n = max(1, round(work(spec, shape, itemsize) / per_element))
    arrays = spec.streams[0] + spec.streams[1] + spec.streams[2]
    what = f"stream {describe(spec.streams)}, {arrays} × {n} {dtype} ({_mib(arrays * n * itemsize)})"
    return [(f"limit-cpu-{threads}", f"{what}, {label}", float(n * per_element),
             lambda seed, threads=threads: make_stream(spec.streams, n, dtype, threads))
            for threads, label in (("all", "every thread"), ("one", "one thread"))]
