"""The communicator contract shared by the MPI and NCCL engines.

An engine owns one communicator over every rank of the job and offers the
few collectives data-parallel training needs:

* ``allreduce(array)`` — an in-place sum, started at once and completed by
  :meth:`Work.wait`, so that a caller can overlap it with other work;
* ``broadcast(array, root)`` — in place, from ``root`` to every rank;
* ``host_allreduce(array)`` — the same sum for a small NumPy array on the
  host (flags that the host must read without synchronising a GPU);
* ``bcast_object(obj)`` — a small Python object from rank 0 (set-up only);
* ``abort(code)`` — end every process of the job now.

No collective waits forever: every wait has a deadline (``NNFAST_DIST_TIMEOUT``
seconds, :data:`DEFAULT_TIMEOUT` when unset) after which it raises
:class:`CollectiveTimeout`, naming the rank and the collective, so that a
peer that died, hangs or left training early ends the job with an error
instead of a hang.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterator

from ..errors import BackendError

#: Seconds a collective may wait for the other ranks before the job is declared broken.
DEFAULT_TIMEOUT = 300.0


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: another rank died, hangs or left early."""


def timeout_from_env() -> float:
    """``NNFAST_DIST_TIMEOUT`` in seconds (a positive number), else :data:`DEFAULT_TIMEOUT`."""
    raw = os.environ.get("NNFAST_DIST_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise BackendError(f"NNFAST_DIST_TIMEOUT: expected a positive number of seconds, got {raw!r}")
    return value


class Work:
    """A started collective; :meth:`wait` completes it, :meth:`test` polls it."""

    def test(self) -> bool:
        """True once the collective has completed (never blocks; drives progress)."""
        raise NotImplementedError

    def wait(self) -> None:
        """Complete the collective: its result may be read once this returns.

        For a device engine "read" means by later work on the current stream:
        the host is not blocked.
        """
        raise NotImplementedError


class DoneWork(Work):
    """A collective that completed when it was started (world size 1, fakes)."""

    def test(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class Engine:
    """Base of the engines: rank, size, the collectives listed in the module docstring."""

    #: ``"mpi"`` or ``"nccl"``.
    name = "base"
    #: Whether ``allreduce`` works on host (NumPy) arrays; False: device (CuPy) arrays.
    host_memory = True

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    timeout: float = DEFAULT_TIMEOUT

    def allreduce(self, array: Any, what: str = "all-reduce") -> Work:
        raise NotImplementedError

    def broadcast(self, array: Any, root: int = 0, what: str = "broadcast") -> Work:
        raise NotImplementedError

    def host_allreduce(self, array: Any, what: str = "all-reduce") -> Work:
        raise NotImplementedError

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the communicator (after the last collective)."""

    def where(self) -> str:
        """``"rank R of N"``, the prefix of every message about this process."""
        return f"rank {self.rank} of {self.size}"

    def timed_out(self, what: str, waited: float) -> CollectiveTimeout:
        """The error for a collective that waited ``waited`` seconds in vain."""
        return CollectiveTimeout(
            f"{self.where()}: {what} did not complete within {waited:.3g} s: another rank has died, "
            f"hangs or left training early (the limit is NNFAST_DIST_TIMEOUT={self.timeout:g} s)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.where()}>"


def wait_until(done: Callable[[], bool], timeout: float, on_timeout: Callable[[float], BaseException]) -> None:
    """Poll ``done()`` until it is true; raise ``on_timeout(waited)`` after ``timeout`` seconds.

    The first millisecond spins (a collective between ranks that arrive
    together completes in microseconds); after that the poll sleeps a tenth
    of the time already waited, at most 5 ms, so a long wait for a slower rank
    costs little CPU (the cores are shared with the ranks still computing)
    and adds at most ~10 % to it.
    """
    start = time.monotonic()
    while not done():
        waited = time.monotonic() - start
        if waited > timeout:
            raise on_timeout(waited)
        if waited > 1e-3:
            time.sleep(min(waited / 10, 5e-3))


# Errors reported as a one-line message rather than a traceback (as the CLI does).
_USER_ERRORS = (BackendError, ValueError, TypeError, OSError)


@contextlib.contextmanager
def abort_on_error(engine: Engine, passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """End the whole job when this rank fails inside the block.

    The other ranks would otherwise wait for this one in their next
    collective (MPI does not notice a rank that raised, or that exited
    without finalising). Exceptions in ``passthrough`` -- ones every rank
    raises at the same step, such as an agreed stop -- propagate normally.
    Others print ``nnfast: error: rank R of N: ...`` (a traceback for
    unexpected ones) and abort the job: exit status 2 for bad input, 130 for
    Ctrl-C, 1 otherwise.
    """
    try:
        yield
    except passthrough:
        raise
    except BaseException as err:  # every failure must end the job
        where = f"{engine.where()}: "
        if isinstance(err, KeyboardInterrupt):
            detail, code = "interrupted", 130
        elif isinstance(err, _USER_ERRORS):
            detail, code = str(err), 2
        elif isinstance(err, CollectiveTimeout):  # names the rank and says all there is to say
            where, detail, code = "", str(err), 1
        else:
            detail, code = "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip(), 1
        sys.stdout.flush()
        sys.stderr.write(f"nnfast: error: {where}{detail}\nnnfast: aborting the job\n")
        sys.stderr.flush()
        engine.abort(code)
        raise  # reached only when abort returns (engines of tests)
