"""Joining the job an MPI launcher started: ``mpiexec -n N nnfast train --distributed``.

:func:`init` checks that this process was started by a launcher, that
mpi4py is installed and that mpi4py's MPI library sees the world the
launcher announced (a launcher of one MPI starting programs linked to
another gives N worlds of one rank each), installs an exception hook that
aborts the job, picks the engine for the backend (NCCL for ``cupy``, one
GPU per rank chosen by the rank on the node; MPI otherwise) and returns the
:class:`~nnfast.distributed.DataParallel` hook.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from ..errors import BackendError
from .buckets import DEFAULT_BUCKET_BYTES
from .data_parallel import DataParallel
from .engine import Engine, abort_on_error

# Variables launchers set in every process they start: MPICH/Intel MPI (Hydra), Open MPI, PMIx, MVAPICH.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCHER_VARIABLES = _SIZE_VARIABLES + ("PMI_RANK", "PMIX_RANK")

_INSTALL_MPI = "install the MPI extra: pip install 'nnfast[mpi]' (mpi4py and the mpich wheel, which brings mpiexec)"


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an MPI launcher (mpiexec, mpirun, srun with PMI) started this process."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in _LAUNCHER_VARIABLES)


def announced_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The number of processes the launcher says it started, when it says so."""
    environ = os.environ if environ is None else environ
    for name in _SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def mpiexec_path() -> str:
    """The ``mpiexec`` to launch with: the one beside this Python (the mpich wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise BackendError(f"no mpiexec beside {sys.executable} or on PATH; {_INSTALL_MPI}")
    return found


def init(backend: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
         timeout: float | None = None) -> DataParallel:
    """The data-parallel hook of this rank of the job (see the module docstring).

    ``backend``: the backend training will use (default ``NNFAST_BACKEND``,
    else ``auto``); it decides the engine. Call this before the backend is
    first used: for ``cupy`` it selects this rank's GPU, for ``numba``
    without ``NNFAST_NUM_THREADS`` it gives each of the k ranks on a node
    ``cpu_count // k`` threads. ``timeout``: seconds a collective may wait
    (default ``NNFAST_DIST_TIMEOUT`` or 300). Raises :class:`BackendError`
    saying what to do when the process was not launched by MPI, mpi4py is
    missing, or the launcher and mpi4py disagree.
    """
    if not launched_by_mpi():
        raise BackendError("--distributed: this process was not started by an MPI launcher (none of "
                           f"{', '.join(_LAUNCHER_VARIABLES)} is set); start every rank with: "
                           "mpiexec -n N nnfast train --distributed ...")
    try:
        import mpi4py  # noqa: F401
    except ImportError as err:
        raise BackendError(f"--distributed needs mpi4py ({err}); {_INSTALL_MPI}") from None
    from .mpi_engine import MpiEngine

    host = MpiEngine(timeout=timeout)
    announced = announced_world_size()
    if announced is not None and announced != host.size:
        from mpi4py import MPI

        raise BackendError(
            f"--distributed: the launcher started {announced} processes but mpi4py's MPI sees a world of "
            f"{host.size}: the mpiexec used and the MPI library of mpi4py "
            f"({MPI.Get_library_version().splitlines()[0].strip()}) do not belong together; "
            f"launch with {_mpiexec_hint()}")
    install_excepthook(host)
    with abort_on_error(host):  # a rank failing here (one GPU short, NCCL) must not strand the others
        name = (backend or os.environ.get("NNFAST_BACKEND") or "auto").strip().lower()
        if name == "auto":
            from ..backends import _unavailable_reason

            name = "cupy" if _unavailable_reason("cupy") is None else "cpu"
        engine: Engine = host
        if name == "cupy":
            engine = _nccl_engine(host)
        elif host.local_size > 1 and "NNFAST_NUM_THREADS" not in os.environ:
            os.environ["NNFAST_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // host.local_size))
        return DataParallel(engine, bucket_bytes=bucket_bytes)


def _nccl_engine(host: Any) -> Engine:
    from .nccl_engine import NcclEngine, _load_cupy_nccl

    cuda, _ = _load_cupy_nccl()
    devices = cuda.runtime.getDeviceCount()
    if host.local_size > devices:
        raise BackendError(f"--distributed: {host.local_size} ranks on this node but {devices} GPU(s); "
                           "the NCCL engine needs one GPU per rank")
    return NcclEngine(host, device=host.local_rank)


def _mpiexec_hint() -> str:
    try:
        return mpiexec_path()
    except BackendError:
        return "the mpiexec of the MPI library mpi4py was built for"


def install_excepthook(engine: Engine) -> None:
    """Make an uncaught exception in this process abort the whole job.

    Without it the failed rank would sit in ``MPI_Finalize`` and the others
    in their next collective until the timeout.
    """
    previous = sys.excepthook

    def abort_job(kind: Any, value: Any, tb: Any) -> None:
        previous(kind, value, tb)
        sys.stderr.write(f"nnfast: {engine.where()} failed; aborting the job\n")
        sys.stderr.flush()
        engine.abort(1)

    sys.excepthook = abort_job
