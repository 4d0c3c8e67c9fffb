"""Optimizers: ``SGD`` and ``Adam`` (AdamW with ``decoupled=True``).

Each ``step()`` is one fused backend call over all parameters that have a
gradient (parameters whose ``grad`` is None are skipped, as in PyTorch).
The update rules are PyTorch's; see ``Backend.sgd_update`` and
``Backend.adam_update``.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from . import checks
from .module import Parameter, first_repeat
from .ops import OPS

# Settings are checked once, when the optimizer is made, as the ops check them.
_SGD = OPS["sgd_update"]
_ADAM = OPS["adam_update"]


#: The op argument each optimizer state is passed as.
_STATE_ARG = {"velocity": "velocities", "exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs"}


class Optimizer:
    """Base class: holds the parameters, their per-parameter state and the step count.

    ``step_count`` (the updates applied so far, which drive Adam's bias
    corrections) normally lives on the host. A training step that runs
    without the host -- the captured CUDA step of :class:`nnfast.TrainStep`,
    whose guard may skip an update on the device -- keeps it in device memory
    instead and attaches it here: reading ``step_count`` (and
    :meth:`state_dict`, so ``nf.save``) then waits for the queued steps and
    reads the device's count, and setting it (``nf.load``,
    :meth:`load_state_dict`) writes the device's count.
    """

    #: Names of the per-parameter state arrays, in order.
    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        if isinstance(params, Parameter) or not isinstance(params, Iterable) or isinstance(params, (str, bytes)):
            hint = "; pass model.parameters()" if hasattr(params, "parameters") else ""
            raise TypeError(f"params: expected an iterable of nnfast Parameters, got {type(params).__name__}{hint}")
        params = list(params)
        if not params:
            raise ValueError("params: expected at least one Parameter, got an empty list")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}]: expected an nnfast Parameter, got {type(p).__name__}")
        repeat = first_repeat(params)
        if repeat is not None:
            raise ValueError(f"params[{repeat[1]}]: the same Parameter as params[{repeat[0]}] "
                             "(it would be updated twice per step)")
        self.params = params
        self.lr = _SGD.check("lr", lr)
        self._device_steps: Any = None
        self.step_count = 0
        backend = _backend_of(params)
        self.backend = backend
        checks.refuse_shared_memory(backend, {"params": [p.data for p in params]})
        self.state: dict[str, list[Any]] = {
            name: [backend.xp.zeros_like(p.data) for p in params] for name in self.state_names
        }

    @property
    def step_count(self) -> int:
        """Updates applied so far (see the class documentation for a count kept on the device)."""
        counter = self._device_steps
        return self._steps if counter is None else counter.read()

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._steps = int(value)
        if self._device_steps is not None:
            self._device_steps.write(self._steps)

    def _keep_step_count(self, counter: Any) -> None:
        """From now on the step count lives in ``counter`` (``read() -> int``, ``write(int)``),
        which starts from the current count."""
        if counter is not self._device_steps:
            counter.write(self.step_count)
            self._device_steps = counter

    def zero_grad(self) -> None:
        """Clear every parameter's gradient (sets it to None)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient."""
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not active:
            return
        self._update(active)
        self.step_count += 1

    def _update(self, active: list[int], control: Any = None) -> None:  # pragma: no cover - abstract
        """Update the parameters ``active`` (indices). ``control``: the device control block of a
        guarded step (the CuPy backend's), whose kernels then take the step count and the
        decision to skip from the device."""
        raise NotImplementedError

    def _gather(self, active: list[int]) -> tuple[list[list[Any]], Any]:
        """The arrays of the active parameters: params, grads, then each state, checked for the kernels.

        ``Parameter.data`` and ``grad`` may have been replaced from outside
        since the last step, so they are checked here, at every step
        (:func:`nnfast.checks.param_lists`); the second value writes the
        update back into parameters that are strided views.
        """
        lists = {"params": [self.params[i].data for i in active], "grads": [self.params[i].grad for i in active]}
        for name in self.state_names:
            lists[_STATE_ARG[name]] = [self.state[name][i] for i in active]
        return checks.param_lists(self.backend, lists, read_only=("grads",))

    def hyperparameters(self) -> dict[str, float]:
        """The scalar settings saved with a checkpoint."""
        return {"lr": self.lr}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as host arrays: ``"step"`` and ``"<state>.<index>"``."""
        out = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for name in self.state_names:
            for i, a in enumerate(self.state[name]):
                out[f"{name}.{i}"] = self.backend.to_numpy(a)
        return out

    def check_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Raise ``ValueError`` unless ``state`` fits this optimizer's parameters."""
        expected = {"step"} | {f"{n}.{i}" for n in self.state_names for i in range(len(self.params))}
        if set(state) != expected:
            missing = sorted(expected - set(state))
            extra = sorted(set(state) - expected)
            raise ValueError(f"optimizer state: does not match this optimizer "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        step = np.asarray(state["step"])
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise ValueError(f"optimizer state: step must be an integer >= 0, got {step!r}")
        for name in self.state_names:
            for i, p in enumerate(self.params):
                a = state[f"{name}.{i}"]
                if a.shape != p.shape or a.dtype != p.data.dtype:
                    raise ValueError(f"optimizer state: {name}.{i} has shape {a.shape} {a.dtype}, "
                                     f"expected {p.shape} {p.data.dtype}")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (all or nothing)."""
        self.check_state_dict(state)
        for name in self.state_names:
            self.state[name] = [self.backend.asarray(state[f"{name}.{i}"]) for i in range(len(self.params))]
        self.step_count = int(state["step"])


def _backend_of(params: list[Parameter]) -> Any:
    from .backends import get_backend

    backend = get_backend()
    for i, p in enumerate(params):
        if not backend.is_native(p.data):
            raise TypeError(f"params[{i}]: lives on another backend than the current one "
                            f"({backend.name!r}); build the optimizer where the model was built")
    return backend


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and weight decay."""

    def __init__(self, params: Iterable[Parameter], lr: float = 0.01, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        self.momentum = _SGD.check("momentum", momentum)
        self.nesterov = _SGD.check("nesterov", nesterov)
        self.weight_decay = _SGD.check("weight_decay", weight_decay)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        self.state_names = ("velocity",) if self.momentum else ()
        super().__init__(params, lr)

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": float(self.nesterov),
                "weight_decay": self.weight_decay}

    def _update(self, active: list[int], control: Any = None) -> None:
        (params, grads, *states), finish = self._gather(active)
        velocities = states[0] if states else [None] * len(params)
        guarded = {} if control is None else {"control": control}
        self.backend._sgd_update(params, grads, velocities, self.lr, self.momentum, self.nesterov,
                                 self.weight_decay, **guarded)
        finish()


class Adam(Optimizer):
    """Adam; with ``weight_decay > 0`` and ``decoupled=True`` (the default) it is AdamW."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = True) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        self.beta1 = _ADAM.check("beta1", betas[0], "betas[0]")
        self.beta2 = _ADAM.check("beta2", betas[1], "betas[1]")
        self.eps = _ADAM.check("eps", eps)
        self.weight_decay = _ADAM.check("weight_decay", weight_decay)
        self.decoupled = _ADAM.check("decoupled", decoupled)
        super().__init__(params, lr)

    def __repr__(self) -> str:
        return (f"Adam(lr={self.lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps}, "
                f"weight_decay={self.weight_decay}, decoupled={self.decoupled})")

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay, "decoupled": float(self.decoupled)}

    def _update(self, active: list[int], control: Any = None) -> None:
        (params, grads, exp_avgs, exp_avg_sqs), finish = self._gather(active)
        guarded = {} if control is None else {"control": control}
        # With a control block the device's count drives the bias corrections: the host's is not read.
        step = self.step_count + 1 if control is None else 1
        self.backend._adam_update(params, grads, exp_avgs, exp_avg_sqs, step, self.lr, self.beta1, self.beta2,
                                  self.eps, self.weight_decay, self.decoupled, **guarded)
        finish()
