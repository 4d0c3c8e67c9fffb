"""What a backend provides to run :class:`~nnfast.train_step.TrainStep` calls: a plan.

A plan is made for one input shape (:class:`PlanKey`) of one ``(model,
loss_fn, optimizer)`` and called with inputs that are already checked and
converted: ``x`` a C-contiguous ``(batch, in_features)`` array of the backend
in the model's dtype, ``labels`` a contiguous int64 array of ``batch`` rows
(their range is not checked yet). It returns the loss as a 0-d array of the
backend (shape ``(batch,)`` for ``reduction="none"``) and keeps the contract
of ``TrainStep``:

* the parameters, the optimizer state and ``optimizer.step_count`` change as
  the eager sequence would change them -- bit for bit when the plan performs
  the same operations in the same order, else within float rounding;
* a step whose loss is not finite, or whose labels are out of range, changes
  none of them (a bad label raises ``ValueError``, on the GPU when the loss is
  read);
* every ``Parameter.grad`` is None after the call.

A plan may also have a ``prepare()`` method, which ``TrainStep.prepare``
calls when the plan is made ahead of the first step: there it does the
one-time work of its first call (compiling, capturing) without changing
anything.

A plan may keep buffers and captured pointers: ``TrainStep`` makes a new one
when a parameter's or state's array is replaced or a hyperparameter changes.
``optimizer.step_count`` may still change between calls (``nf.load``, an
``optimizer.step()`` by hand): a plan that keeps its own copy of the step
count reads it again on every call.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class PlanKey(NamedTuple):
    """The input shape a plan is made for."""

    batch: int
    dtype: Any


class Plan(Protocol):
    """One way of running a training step for one input shape."""

    #: A short name for logs and tests: ``"eager"``, ``"cuda graph"``, ``"fused"``.
    name: str

    def __call__(self, x: Any, labels: Any) -> Any:  # pragma: no cover - protocol
        ...


__all__ = ["Plan", "PlanKey"]
