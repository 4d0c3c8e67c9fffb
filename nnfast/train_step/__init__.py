"""``TrainStep``: one whole training step -- forward, loss, backward, update -- as one call.

::

    step = nf.TrainStep(model, nf.SoftmaxCrossEntropy(), nf.SGD(model.parameters(), lr=0.1))
    for x, labels in batches:
        loss = step(x, labels)          # a 0-d array of the backend; it stays on the device

A call does what these lines do::

    optimizer.zero_grad()
    loss, dlogits = loss_fn(model.forward(x), labels)
    model.backward(dlogits, need_input_grad=False)
    optimizer.step()
    optimizer.zero_grad()

with two guarantees more: a step whose loss is not finite (NaN or +-inf) changes
nothing -- no parameter, no optimizer state, not the step count -- and returns
that loss; and a bad label raises ``ValueError`` (on the GPU when the loss is
read) and changes nothing either.

How a step runs is the backend's choice, made once per input shape: a *plan*
(:mod:`.plan`). The plain sequence above (:mod:`.eager`) serves every backend
and every model. A backend may register a faster plan for the models it
understands (an MLP: ``Sequential`` of ``Linear`` layers with fused
activations): on the GPU a step captured once as a CUDA graph and replayed
(:mod:`.cuda_graph`), on the CPU one fused call. Plans are made on the first
call with a given batch size and kept (the last batch of an epoch is often
smaller); they are made anew when the parameters' or the optimizer's arrays
are replaced (``nf.load``), a hyperparameter changes, the matmul precision
does, or the backend's launch settings do (``Backend.launch_settings``: the
device, a pinned kernel path).
"""

from __future__ import annotations

import collections
import importlib
from typing import Any, Callable

from .. import checks
from ..layers import Linear, Sequential
from ..losses import SoftmaxCrossEntropy
from ..module import Module
from ..optim import Optimizer
from ..precision import get_matmul_precision
from .eager import EagerPlan
from .plan import Plan, PlanKey

#: Faster plans per backend name: ``"module:function"``, the function taking
#: ``(model, loss_fn, optimizer, key)`` and returning a :class:`Plan`, or None
#: for a model it does not handle (the eager plan then runs).
PLAN_BUILDERS: dict[str, str] = {"cupy": "nnfast.train_step.cuda_graph:build",
                                  "numba": "nnfast.train_step.numba_fused:build"}

#: Plans kept per ``TrainStep`` (one per batch size), least recently used dropped first.
MAX_PLANS = 4


class TrainStep:
    """Forward, loss, backward and update of ``model`` in one call, for inputs of fixed shapes.

    Parameters
    ----------
    model : Module
        The model; its first layer must be a ``Linear`` (or a ``Sequential``
        starting with one), which fixes the input's width and dtype.
    loss_fn : SoftmaxCrossEntropy
    optimizer : Optimizer
        An optimizer over exactly ``model.parameters()``.

    All three must live on one backend. Calling the step with ``(x, labels)``
    returns the loss (see the module documentation for what a call does).
    """

    def __init__(self, model: Module, loss_fn: SoftmaxCrossEntropy, optimizer: Optimizer) -> None:
        if not isinstance(model, Module):
            raise TypeError(f"model: expected an nnfast Module, got {checks.type_name(model)}")
        if not isinstance(loss_fn, SoftmaxCrossEntropy):
            raise TypeError(f"loss_fn: expected an nnfast SoftmaxCrossEntropy, got {checks.type_name(loss_fn)}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected an nnfast Optimizer, got {checks.type_name(optimizer)}")
        params = model.parameters()
        if not params:
            raise ValueError("model: has no parameters to train")
        if {id(p) for p in optimizer.params} != {id(p) for p in params} or len(optimizer.params) != len(params):
            raise ValueError("optimizer: must update exactly model.parameters() (build it with "
                             "optimizer(model.parameters(), ...))")
        for what, owner in (("loss_fn", loss_fn), ("optimizer", optimizer)):
            if owner.backend is not model.backend:
                raise ValueError(f"{what}: lives on backend {owner.backend.name!r}, the model on "
                                 f"{model.backend.name!r}; build all three under one backend")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.backend = model.backend
        self._input = _first_linear(model)
        self._plans: collections.OrderedDict[PlanKey, Plan] = collections.OrderedDict()
        self._signature: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        return f"TrainStep({type(self.model).__name__}, {self.loss_fn!r}, {self.optimizer!r})"

    def __call__(self, x: Any, labels: Any) -> Any:
        """One training step on a batch; returns the loss (a 0-d array of the backend)."""
        x = self._input._as_input(x, "x", self._input.dtype)
        if x.ndim != 2 or x.shape[1] != self._input.in_features:
            raise ValueError(f"x: expected shape (batch, {self._input.in_features}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x: expected a non-empty batch, got 0 rows")
        labels = self.loss_fn.as_labels(labels, x.shape[0])
        return self._plan(PlanKey(int(x.shape[0]), x.dtype))(x, labels)

    def prepare(self, *batch_sizes: int) -> None:
        """Make the plans for these batch sizes now, so that the first steps do not pay for it.

        A plan that has a ``prepare()`` (the Numba plan: compiling its kernels,
        or loading them from the disk cache) has it called. Training loops call
        this before timing the first epoch, with the batch size and the size of
        the last, partial batch.
        """
        dtype = self._input.dtype
        for batch in dict.fromkeys(batch_sizes):
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise ValueError(f"batch_sizes: expected positive integers, got {batch!r}")
            plan = self._plan(PlanKey(batch, dtype))
            prepare = getattr(plan, "prepare", None)
            if prepare is not None:
                prepare()

    def _plan(self, key: PlanKey) -> Plan:
        signature = self._current_signature()
        if signature != self._signature:  # arrays replaced or settings changed: every plan is stale
            opt = self.optimizer  # a plan updates in place: no two of these arrays may share memory
            checks.refuse_shared_memory(self.backend, {"params": [p.data for p in opt.params],
                                                       **{name: opt.state[name] for name in opt.state_names}})
            self._plans.clear()
            self._signature = signature
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build(key)
            self._plans[key] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _build(self, key: PlanKey) -> Plan:
        spec = PLAN_BUILDERS.get(self.backend.name)
        if spec is not None:
            module, _, function = spec.partition(":")
            build: Callable[..., Plan | None] = getattr(importlib.import_module(module), function)
            plan = build(self.model, self.loss_fn, self.optimizer, key)
            if plan is not None:
                return plan
        return EagerPlan(self.model, self.loss_fn, self.optimizer, key)

    def _current_signature(self) -> tuple[Any, ...]:
        """What a plan may have captured: the arrays' identities, the optimizer's settings, the
        matmul precision (which GEMM kernels run) and the backend's launch settings (the device, a
        pinned kernel path)."""
        opt = self.optimizer
        return (tuple(id(p.data) for p in opt.params),
                tuple(id(a) for name in opt.state_names for a in opt.state[name]),
                tuple(sorted(opt.hyperparameters().items())), get_matmul_precision(),
                self.backend.launch_settings())

    @property
    def plan_names(self) -> list[str]:
        """The kind of plan kept for each batch size, e.g. ``["eager (batch 32)"]`` (for logs and tests)."""
        return [f"{plan.name} (batch {key.batch})" for key, plan in self._plans.items()]


def _first_linear(model: Module) -> Linear:
    layer = model
    while isinstance(layer, Sequential) and len(layer):
        layer = layer[0]
    if not isinstance(layer, Linear):
        raise TypeError(f"model: a TrainStep needs a model whose first layer is a Linear, got "
                        f"{type(layer).__name__}")
    return layer


__all__ = ["MAX_PLANS", "PLAN_BUILDERS", "Plan", "PlanKey", "TrainStep"]
