"""What the training loop asks of a (possibly) distributed run, and its single-process answer.

``nnfast.train`` calls a hook object at these points of every step, and
nowhere else:

1. ``rows = hook.shard(idx)`` — the rows of the global batch ``idx`` that
   this rank computes;
2. ``loss, dlogits = hook.global_loss(loss, dlogits)`` — the loss of the
   whole global batch, and this rank's gradient weighted for the sum;
   ``model.backward(..., after_layer=hook.after_layer)`` and
   ``hook.reduce_gradients()`` between the backward pass and the optimizer
   step — the gradient all-reduce;
3. ``hook.is_main`` — whether this process logs and writes checkpoints, and
   ``hook.stop_requested()`` — whether every rank stops after this step.

Plus ``hook.attach(model, optimizer, stop)`` once before the first step
(``stop``: the event a Ctrl-C handler sets).
:class:`SingleProcess` is the hook of an ordinary run: every call is a no-op.
:class:`~nnfast.distributed.DataParallel` is the distributed one.

How a global batch is split (:func:`shard_bounds`): rank ``r`` of ``N``
takes a contiguous slice of ``B // N`` rows, one more for the first
``B % N`` ranks. Its loss is the mean over its ``b_r`` rows, so the
global-batch mean is ``sum_r (b_r / B) * loss_r`` and the gradient likewise:
each rank weights its loss and its ``dlogits`` by ``b_r / B`` and the
gradients are summed. In exact arithmetic that is the single-process
gradient of the same global batch for any ``B`` and ``N``; in floating point
it differs by the order of the additions. (Every row counts in the training
loop's mean; a loss that ignores some targets would need the counted targets
of each slice, not its rows, as weights.) A rank whose slice is empty (a
last batch with fewer rows than ranks) computes one row of the batch with
weight 0, which adds exact zeros, so that every rank still takes part in
every collective.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


def shard_bounds(rows: int, rank: int, size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous slice of ``rows`` rows split ``size`` ways."""
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SingleProcess:
    """The hook of a run in one process: no sharding, no reduction, logs and saves."""

    rank = 0
    world_size = 1
    is_main = True
    #: ``Sequential.backward``'s per-layer callback; None: nothing to do per layer.
    after_layer: Callable[[Any], None] | None = None

    def __init__(self) -> None:
        self._stop: threading.Event | None = None

    def attach(self, model: Any, optimizer: Any, stop: threading.Event) -> None:
        """Called once, after the model and optimizer are built (and resumed)."""
        self._stop = stop

    def shard(self, idx: Any) -> Any:
        """The rows of the global batch ``idx`` this process computes: all of them."""
        return idx

    def global_loss(self, loss: Any, dlogits: Any) -> tuple[Any, Any]:
        """The loss of the global batch and this process's share of its gradient."""
        return loss, dlogits

    def reduce_gradients(self) -> None:
        """Make every parameter's ``grad`` the gradient of the global batch."""

    def stop_requested(self) -> bool:
        """Whether training stops after this step (the same answer on every rank)."""
        return self._stop is not None and self._stop.is_set()

    def describe(self) -> str:
        return "a single process"
