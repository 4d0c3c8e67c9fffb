"""Launches of the CuPy backend held instead of made, or listed as they are made.

Two ways of watching the kernel launches of :mod:`nnfast.backends.cupy_backend`:

* :func:`recording` (``CupyBackend.recording``): in this thread, every launch
  is *held* -- its function, configuration and arguments kept, not run -- so a
  guarded training step (:mod:`nnfast.train_step.cuda_graph`) can replay them
  directly or capture them in a CUDA graph. Device work that is not a launch
  would not be replayed: the backend refuses it inside a recording
  (:func:`refuse_inside`).
* :func:`recorded_launches`: every launch is *listed* as it is made (and still
  made); ``nnfast selftest`` checks with it that a forced GEMM path is the one
  that ran.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, NamedTuple


class RecordedLaunch(NamedTuple):
    """One launch as :meth:`CupyBackend.recording` saw it: ``function(grid, block, args, shared_mem=...)``."""

    function: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[Any, ...]
    shared_mem: int

    def __call__(self) -> None:
        self.function(self.grid, self.block, self.args, shared_mem=self.shared_mem)


class Recording:
    """What :meth:`CupyBackend.recording` saw: the launches, and the label checks of the
    cross-entropy calls (``(info, rows, classes, ignore_index)``, for :meth:`LabelChecks.track`)."""

    def __init__(self) -> None:
        self.launches: list[RecordedLaunch] = []
        self.label_checks: list[tuple[Any, int, int, int]] = []


_recording = threading.local()


def current() -> Recording | None:
    """The recording open in this thread, if any."""
    return getattr(_recording, "current", None)


#: The lists of the :func:`recorded_launches` blocks now open (a launch is appended to each).
listeners: list[list[Any]] = []


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Any]]:
    """Inside the block, every kernel launch of this backend is appended to the list it yields.

    Each entry is the :class:`~nnfast.backends.cuda_launch.Launch` (a
    ``GemmPlan`` for a GEMM) as launched: its instantiation, grid and block.
    ``nnfast selftest`` uses it to see that a forced GEMM path is the one
    that ran.
    """
    seen: list[Any] = []
    listeners.append(seen)
    try:
        yield seen
    finally:
        listeners.remove(seen)


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Hold, in this thread, the launches the backend's ops would make, instead of making them.

    Outputs are allocated as usual and stay alive in the held arguments, so
    replaying :attr:`Recording.launches` in order (each ``launch()``)
    recomputes them from whatever the inputs hold then: a step with fixed
    buffers, replayed directly or captured in a CUDA graph. Cross-entropy
    label checks are listed instead of tracked. Device work that is not a
    launch (a copy of a misaligned row view, an identity activation) raises
    ``RuntimeError``.
    """
    if current() is not None:
        raise RuntimeError("recordings do not nest")
    held = _recording.current = Recording()
    try:
        yield held
    finally:
        _recording.current = None


def refuse_inside(what: str) -> None:
    """Refuse, inside a recording, device work that is not a kernel launch (it would not be replayed)."""
    if current() is not None:
        raise RuntimeError(f"a recorded step cannot hold {what}: it is not a kernel launch")


__all__ = ["RecordedLaunch", "Recording", "current", "listeners", "recorded_launches", "recording", "refuse_inside"]
