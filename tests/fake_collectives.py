"""Stand-ins for the distributed tests that need no MPI and no GPU.

* :class:`ThreadWorld` runs N ranks as N threads of this process; a
  collective meets at a barrier and sums in rank order, so every rank gets
  the same bits. A barrier that is not reached within its timeout breaks
  instead of hanging the suite.
* :class:`FakeEngine` is one rank of such a world behind the engine contract.
* :class:`FakeCuda` / :class:`FakeNccl` stand in for ``cupy.cuda`` and
  ``cupy.cuda.nccl`` so that the NCCL engine's code runs on NumPy arrays and
  records the stream, event and NCCL calls it makes.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from nnfast.distributed.engine import DoneWork, Engine


class ThreadWorld:
    def __init__(self, size: int, timeout: float = 60.0) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list[Any] = [None] * size

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values

    def allreduce(self, rank: int, array: np.ndarray) -> None:
        values = self.exchange(rank, array.copy())
        total = values[0].copy()
        for v in values[1:]:
            total += v
        array[...] = total

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """``fn(rank)`` in one thread per rank; the results in rank order, or the first error."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as err:
                errors.append(err)
                self._barrier.abort()  # release the others instead of leaving them waiting

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class FakeEngine(Engine):
    """Rank ``rank`` of a :class:`ThreadWorld`; records what it was asked, in order."""

    name = "fake"

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self.rank, self.size = world, rank, world.size
        self.calls: list[tuple[str, str]] = []
        self.aborted: int | None = None

    def allreduce(self, array: Any, what: str = "all-reduce") -> DoneWork:
        self.calls.append(("allreduce", what))
        self.world.allreduce(self.rank, array)
        return DoneWork()

    host_allreduce = allreduce

    def broadcast(self, array: Any, root: int = 0, what: str = "broadcast") -> DoneWork:
        self.calls.append(("broadcast", what))
        array[...] = self.world.exchange(self.rank, array.copy())[root]
        return DoneWork()

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.world.exchange(self.rank, obj)[root]

    def abort(self, code: int = 1) -> None:
        self.aborted = code


class FakeEvent:
    """``cupy.cuda.Event``: ``record(stream)`` and the ``done`` property."""

    def __init__(self, log: list, disable_timing: bool = False) -> None:
        self.log, self.done = log, True
        self.stream: Any = None

    def record(self, stream: Any) -> None:
        self.stream = stream
        self.log.append(("record", stream.name, self))


class FakeStream:
    def __init__(self, log: list, name: str, ptr: int) -> None:
        self.log, self.name, self.ptr = log, name, ptr

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait", self.name, event))


class FakeCuda:
    """``cupy.cuda`` for one rank: a compute stream, new streams, events, devices."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.compute = FakeStream(self.log, "compute", 1)
        self.devices_used: list[int] = []
        self.never_complete = False  # events recorded from now on stay pending
        cuda = self

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            def use(self) -> None:
                cuda.devices_used.append(self.index)

        class Event(FakeEvent):
            def __init__(self, disable_timing: bool = False) -> None:
                super().__init__(cuda.log, disable_timing)
                self.done = not cuda.never_complete

        def stream(non_blocking: bool = False) -> FakeStream:
            return FakeStream(cuda.log, "nccl", 2)

        self.Device, self.Event, self.Stream = Device, Event, stream

    def get_current_stream(self) -> FakeStream:
        return self.compute


class FakeNccl:
    """``cupy.cuda.nccl`` over a :class:`ThreadWorld`; ``arrays`` maps device pointers to arrays."""

    NCCL_SUM = 0
    NCCL_FLOAT32 = 7
    NCCL_FLOAT64 = 8

    def __init__(self, world: ThreadWorld, arrays: dict[int, np.ndarray]) -> None:
        self.world, self.arrays = world, arrays
        self.unique_ids_made = 0
        self.async_error: Exception | None = None
        nccl = self

        class NcclCommunicator:
            def __init__(self, ndev: int, unique_id: Any, rank: int) -> None:
                self.ndev, self.unique_id, self.rank = ndev, unique_id, rank
                self.calls: list[tuple] = []
                self.aborted = self.destroyed = False

            def allReduce(self, send: int, recv: int, count: int, dtype: int, op: int, stream: int) -> None:
                self.calls.append(("allReduce", send, recv, count, dtype, op, stream))
                array = nccl.arrays[recv]
                assert send == recv and array.size == count and op == nccl.NCCL_SUM
                assert dtype == {np.dtype(np.float32): 7, np.dtype(np.float64): 8}[array.dtype]
                nccl.world.allreduce(self.rank, array)

            def bcast(self, buff: int, count: int, dtype: int, root: int, stream: int) -> None:
                self.calls.append(("bcast", buff, count, dtype, root, stream))
                array = nccl.arrays[buff]
                array[...] = nccl.world.exchange(self.rank, array.copy())[root]

            def check_async_error(self) -> None:
                if nccl.async_error is not None:
                    raise nccl.async_error

            def abort(self) -> None:
                self.aborted = True

            def destroy(self) -> None:
                self.destroyed = True

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self) -> bytes:
        self.unique_ids_made += 1
        return bytes(range(128))
