"""Bad labels of the GPU cross-entropy, reported without a host-device synchronisation per call.

``ce_prepare`` writes, on the device, the first row whose label is out of
range and that label (``kernels/cross_entropy.cu``). Right after the
cross-entropy's launches, on the same stream, those values are copied
asynchronously into a slot of pinned host memory and an event is recorded
behind the copy (:meth:`LabelChecks.track`). The host looks at the slot only
once the event has completed:

* without waiting, at the next cross-entropy call (:meth:`LabelChecks.poll`:
  the checks whose events are done, oldest first);
* waiting for the events, when a value is read: the loss converted to a host
  value (:func:`checked_array_class`), ``to_numpy``, ``synchronize``
  (:meth:`LabelChecks.check_all`) -- once per epoch in a loop that reads the
  summed loss once per epoch.

Because each check waits on its own event, it is right whatever stream the
call ran on and whatever stream is current when the host looks. Nothing is
drained on a count of pending checks: a check leaves the queue when it is
read. Slots come from blocks of pinned memory that are reused, so a call
costs one small copy and one event, no allocation.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from .base import bad_label_error

#: int64 values per slot: ce_prepare's info (first bad row, counted rows, the bad label).
INFO_SIZE = 3
_SLOTS_PER_BLOCK = 512


class _Pending:
    __slots__ = ("slot", "event", "rows", "classes", "ignore_index")

    def __init__(self, slot: np.ndarray, event: Any, rows: int, classes: int, ignore_index: int) -> None:
        self.slot, self.event, self.rows, self.classes, self.ignore_index = slot, event, rows, classes, ignore_index


class LabelChecks:
    """The label checks of the cross-entropy calls on one backend that the host has not looked at yet."""

    def __init__(self, cupy: Any) -> None:
        self._cupy = cupy
        self._pending: collections.deque[_Pending] = collections.deque()
        self._free: list[np.ndarray] = []
        self._blocks: list[Any] = []  # the pinned allocations the free slots live in
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def _slot(self) -> np.ndarray:
        if not self._free:
            nbytes = _SLOTS_PER_BLOCK * INFO_SIZE * 8
            memory = self._cupy.cuda.alloc_pinned_memory(nbytes)
            self._blocks.append(memory)
            block = np.ndarray((_SLOTS_PER_BLOCK, INFO_SIZE), dtype=np.int64, buffer=memory)
            self._free.extend(block)
        return self._free.pop()

    def track(self, info: Any, rows: int, classes: int, ignore_index: int, stream: Any = None) -> Any:
        """Copy ``info`` (ce_prepare's, on the device) to the host behind the work queued so far on
        ``stream`` (default: the current one); returns the event recorded after the copy."""
        cuda = self._cupy.cuda
        stream = cuda.get_current_stream() if stream is None else stream
        with self._lock:
            slot = self._slot()
        cuda.runtime.memcpyAsync(slot.ctypes.data, info.data.ptr, INFO_SIZE * 8, cuda.runtime.memcpyDeviceToHost,
                                 stream.ptr)
        event = cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        with self._lock:
            self._pending.append(_Pending(slot, event, rows, classes, ignore_index))
        return event

    def poll(self) -> None:
        """Look at the checks whose copies have landed, oldest first, without waiting for the others."""
        while True:
            with self._lock:
                if not self._pending or not self._pending[0].event.done:
                    return
                check = self._pending.popleft()
            self._consume(check)

    def check_all(self) -> None:
        """Wait for every pending copy and look at each, oldest first (raises at the first bad label)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                check = self._pending.popleft()
            check.event.synchronize()
            self._consume(check)

    def _consume(self, check: _Pending) -> None:
        first_bad, label = int(check.slot[0]), int(check.slot[2])
        with self._lock:
            self._free.append(check.slot)
        if first_bad < check.rows:
            raise bad_label_error(label, first_bad, check.classes, check.ignore_index)


_checked_classes: dict[type, type] = {}


def checked_array_class(cupy: Any) -> type:
    """A ``cupy.ndarray`` subclass whose host reads first raise a pending bad-label error
    (``_nnfast_backend._check_pending()``); one per array module."""
    found = _checked_classes.get(cupy.ndarray)
    if found is not None:
        return found

    def checked(name: str) -> Any:
        plain = getattr(cupy.ndarray, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            backend = getattr(self, "_nnfast_backend", None)
            if backend is not None:
                backend._check_pending()
            return plain(self, *args, **kwargs)

        method.__name__ = name
        return method

    def __array_finalize__(self: Any, obj: Any) -> None:
        self._nnfast_backend = getattr(obj, "_nnfast_backend", None)

    body = {name: checked(name) for name in ("get", "item", "tolist", "__float__", "__int__", "__bool__",
                                             "__array__", "__repr__", "__str__", "__format__")}
    body.update(__array_finalize__=__array_finalize__,
                __doc__="Loss array of the cross-entropy: reading it first checks the labels were valid.",
                # nnfast recognises CuPy arrays by the module of their type (checks.is_cupy_array).
                __module__=cupy.ndarray.__module__)
    cls = type("CheckedArray", (cupy.ndarray,), body)
    _checked_classes[cupy.ndarray] = cls
    return cls


__all__ = ["INFO_SIZE", "LabelChecks", "checked_array_class"]
