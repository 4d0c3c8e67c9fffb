"""The MPI engine (mpi4py), for the CPU backends: collectives on host arrays.

Every collective is non-blocking (``Iallreduce``, ``Ibcast``) on a private
duplicate of ``COMM_WORLD`` and completed by polling ``Test`` against a
deadline (:func:`~nnfast.distributed.engine.wait_until`), never by a bare
``Wait`` that could block forever.

Progress: MPI libraries advance a non-blocking collective only inside MPI
calls (MPICH and Open MPI run no progress thread unless asked, e.g. with
``MPIR_CVAR_ASYNC_PROGRESS=1``). :meth:`_MpiWork.test` is such a call; the
data-parallel trainer makes it for every pending bucket each time a layer's
backward finishes, so a bucket's reduction advances between layers and
completes in the final wait — it is not a reduction running alongside the
arithmetic on its own.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from typing import Any

import numpy as np

from .engine import Engine, Work, timeout_from_env, wait_until


#: Pause before MPI_Abort that lets the launcher forward this rank's last output.
ABORT_GRACE_SECONDS = 0.5


class _MpiWork(Work):
    __slots__ = ("engine", "request", "buffer", "what", "done")

    def __init__(self, engine: "MpiEngine", request: Any, buffer: Any, what: str) -> None:
        self.engine, self.request, self.buffer, self.what = engine, request, buffer, what
        self.done = False

    def test(self) -> bool:
        if not self.done:
            self.done = bool(self.request.Test())
        return self.done

    def wait(self) -> None:
        wait_until(self.test, self.engine.timeout, lambda waited: self.engine.timed_out(self.what, waited))
        self.buffer = None  # the buffer was kept alive only while MPI could still write it


class MpiEngine(Engine):
    """Collectives over ``MPI.COMM_WORLD`` (duplicated) through mpi4py.

    ``comm``: another mpi4py communicator to duplicate instead of
    ``COMM_WORLD``; ``timeout``: seconds per collective (default:
    ``NNFAST_DIST_TIMEOUT`` or 300).
    """

    name = "mpi"
    host_memory = True

    def __init__(self, comm: Any = None, timeout: float | None = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.timeout = timeout_from_env() if timeout is None else float(timeout)

    def allreduce(self, array: np.ndarray, what: str = "all-reduce") -> Work:
        _check_host_buffer(array, what)
        request = self.comm.Iallreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        return _MpiWork(self, request, array, what)

    host_allreduce = allreduce

    def broadcast(self, array: np.ndarray, root: int = 0, what: str = "broadcast") -> Work:
        _check_host_buffer(array, what)
        return _MpiWork(self, self.comm.Ibcast(array, root=root), array, what)

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        # Pickle between the processes of one job, as mpi4py's own bcast does;
        # sent as a length, then the bytes, so that both waits have deadlines.
        payload = pickle.dumps(obj) if self.rank == root else b""
        length = np.array([len(payload)], dtype=np.int64)
        self.broadcast(length, root, "broadcast of the set-up from rank 0").wait()
        data = np.frombuffer(payload, dtype=np.uint8).copy() if self.rank == root \
            else np.empty(int(length[0]), dtype=np.uint8)
        self.broadcast(data, root, "broadcast of the set-up from rank 0").wait()
        return obj if self.rank == root else pickle.loads(data.tobytes())

    def abort(self, code: int = 1) -> None:
        # MPI_Abort asks the launcher to end every process of the job, but
        # MPICH returns to the caller meanwhile: this process must not go on.
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards a rank's output through a pipe, and MPI_Abort
        # tears the job down without draining it: without this pause the
        # error message just written is sometimes lost.
        time.sleep(ABORT_GRACE_SECONDS)
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)

    def close(self) -> None:
        if self.comm is not None and self.comm != self._MPI.COMM_NULL:
            self.comm.Free()
        self.comm = None


def _check_host_buffer(array: Any, what: str) -> None:
    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or not array.flags.writeable:
        raise TypeError(f"{what}: the MPI engine needs a writeable C-contiguous numpy array, got "
                        f"{type(array).__name__}" + (f" (flags {array.flags})" if isinstance(array, np.ndarray) else ""))
