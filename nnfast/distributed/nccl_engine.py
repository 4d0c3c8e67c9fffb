"""The NCCL engine (``cupy.cuda.nccl``), for the CuPy backend: one GPU per rank.

Gradients are summed on the device by NCCL, with no host copies. The NCCL
unique id is made on rank 0 and handed to the others over MPI (the host
engine, which also carries the host-side flags and aborts the job).

Streams: every collective runs on the engine's own non-blocking stream. It
starts after an event recorded on the caller's current (compute) stream, so
it sees the gradients written there, and :meth:`_NcclWork.wait` makes the
compute stream wait for the collective's completion event — the host never
blocks, and the backward kernels of the next layers run on the compute
stream while NCCL reduces the buckets already handed to it.

Faults: a NCCL collective whose peer has died spins on the device forever.
A watchdog thread therefore polls the completion events of the collectives
in flight (and ``check_async_error``); when the oldest has not completed
``timeout`` seconds after it was queued, it prints which rank and collective
hung, aborts the NCCL communicator (which ends its kernels) and aborts the
job through MPI.

CuPy is imported only when an engine is built: importing this module works
without CuPy, NCCL or a GPU.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from ..errors import BackendError
from .engine import Engine, Work

# dtype -> the name of its NCCL data type constant in cupy.cuda.nccl.
_NCCL_TYPES = {np.dtype(np.float32): "NCCL_FLOAT32", np.dtype(np.float64): "NCCL_FLOAT64"}


def _device_pointer(array: Any) -> int:
    return int(array.data.ptr)


def _load_cupy_nccl() -> tuple[Any, Any]:
    """``(cupy.cuda, cupy.cuda.nccl)``, or BackendError saying what to install."""
    import warnings

    try:
        import cupy
    except ImportError as err:
        raise BackendError(f"the NCCL engine needs CuPy ({err}); install nnfast[cuda12] or nnfast[cuda13]") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CuPy warns when libnccl is missing; we raise instead
        from cupy.cuda import nccl
    if not getattr(nccl, "available", False):
        raise BackendError("CuPy cannot load NCCL (libnccl.so.2); install the NCCL wheel of your CUDA version: "
                           "pip install nvidia-nccl-cu12 (or -cu13), which nnfast[cuda12] / nnfast[cuda13] pull")
    return cupy.cuda, nccl


class _NcclWork(Work):
    __slots__ = ("engine", "done", "buffer")

    def __init__(self, engine: "NcclEngine", done: Any, buffer: Any) -> None:
        self.engine, self.done, self.buffer = engine, done, buffer

    def test(self) -> bool:
        return bool(self.done.done)

    def wait(self) -> None:
        # Stream-ordered: later work on the compute stream starts after the
        # collective; the watchdog, not this call, bounds how long that takes.
        self.engine.cuda.get_current_stream().wait_event(self.done)


class NcclEngine(Engine):
    """Collectives on CuPy arrays through a NCCL communicator of every rank.

    ``host``: the MPI engine of the same job (unique-id exchange, host
    flags, abort). ``device``: this rank's GPU. ``cuda`` and ``nccl`` default
    to ``cupy.cuda`` and ``cupy.cuda.nccl``; tests pass stand-ins.
    ``on_failure(message)`` is what the watchdog calls for a hung collective
    (default: print the message, abort the NCCL communicator and the job).
    """

    name = "nccl"
    host_memory = False

    def __init__(self, host: Engine, device: int, *, cuda: Any = None, nccl: Any = None,
                 timeout: float | None = None, on_failure: Callable[[str], None] | None = None,
                 poll_interval: float | None = None) -> None:
        if cuda is None or nccl is None:
            cuda, nccl = _load_cupy_nccl()
        self.cuda, self.nccl, self.host = cuda, nccl, host
        self.rank, self.size = host.rank, host.size
        self.local_rank, self.local_size = host.local_rank, host.local_size
        self.timeout = host.timeout if timeout is None else float(timeout)
        self.device = int(device)
        cuda.Device(self.device).use()
        # get_unique_id() returns bytes (CuPy >= 14) or a tuple of ints (13); both pickle.
        unique_id = host.bcast_object(nccl.get_unique_id() if self.rank == 0 else None)
        self.comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.stream = cuda.Stream(non_blocking=True)
        self._on_failure = on_failure or self._fail
        self._in_flight: collections.deque[tuple[Any, str, float]] = collections.deque()
        self._closing = threading.Event()
        interval = poll_interval if poll_interval is not None else min(1.0, self.timeout / 10)
        self._watchdog = threading.Thread(target=self._watch, args=(interval,), name="nnfast-nccl-watchdog",
                                          daemon=True)
        self._watchdog.start()

    # ---------------------------------------------------------------- collectives
    def _nccl_type(self, array: Any, what: str) -> int:
        name = _NCCL_TYPES.get(np.dtype(array.dtype))
        if name is None:
            raise TypeError(f"{what}: the NCCL engine reduces float32 or float64 arrays, got {array.dtype}")
        if not array.flags.c_contiguous:
            raise TypeError(f"{what}: the NCCL engine needs a C-contiguous array")
        return getattr(self.nccl, name)

    def _launch(self, array: Any, what: str, call: Callable[[int, int, int, int], None]) -> Work:
        dtype = self._nccl_type(array, what)
        ready = self.cuda.Event(disable_timing=True)
        ready.record(self.cuda.get_current_stream())
        self.stream.wait_event(ready)
        call(_device_pointer(array), int(array.size), dtype, int(self.stream.ptr))
        done = self.cuda.Event(disable_timing=True)
        done.record(self.stream)
        self._in_flight.append((done, what, time.monotonic()))
        return _NcclWork(self, done, array)

    def allreduce(self, array: Any, what: str = "all-reduce") -> Work:
        sum_op = self.nccl.NCCL_SUM
        return self._launch(array, what, lambda ptr, n, dtype, stream:
                            self.comm.allReduce(ptr, ptr, n, dtype, sum_op, stream))

    def broadcast(self, array: Any, root: int = 0, what: str = "broadcast") -> Work:
        return self._launch(array, what, lambda ptr, n, dtype, stream: self.comm.bcast(ptr, n, dtype, root, stream))

    def host_allreduce(self, array: Any, what: str = "all-reduce") -> Work:
        return self.host.host_allreduce(array, what)

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.host.bcast_object(obj, root)

    def abort(self, code: int = 1) -> None:
        self._abort_comm()
        self.host.abort(code)

    def close(self) -> None:
        self._closing.set()
        self._watchdog.join()
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None

    # ---------------------------------------------------------------- watchdog
    def _watch(self, interval: float) -> None:
        self.cuda.Device(self.device).use()  # the current device is per thread
        while not self._closing.wait(interval):
            problem = self._check()
            if problem is not None:
                self._on_failure(problem)
                return

    def _check(self) -> str | None:
        """A message when a collective hung or NCCL reported an error, else None."""
        try:
            if self.comm is not None:
                self.comm.check_async_error()
        except Exception as err:  # NcclError: a peer vanished, a network failure
            return f"{self.where()}: NCCL reported an error: {err}"
        while self._in_flight and self._in_flight[0][0].done:
            self._in_flight.popleft()
        if self._in_flight:
            _, what, queued = self._in_flight[0]
            waited = time.monotonic() - queued
            if waited > self.timeout:
                return str(self.timed_out(f"{what} (NCCL)", waited))
        return None

    def _fail(self, message: str) -> None:
        sys.stderr.write(f"nnfast: error: {message}; aborting the job\n")
        sys.stderr.flush()
        self.abort(1)

    def _abort_comm(self) -> None:
        comm, self.comm = self.comm, None
        if comm is not None:
            comm.abort()
