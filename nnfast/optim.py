"""Optimizers: ``SGD`` and ``Adam`` (AdamW with ``decoupled=True``).

Each ``step()`` is one fused backend call over all parameters that have a
gradient (parameters whose ``grad`` is None are skipped, as in PyTorch).
The update rules are PyTorch's; see ``Backend.sgd_update`` and
``Backend.adam_update``.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import numpy as np

from .layers import Parameter, first_repeat


def _check_number(value: Any, arg: str, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{arg}: expected a finite real number, got {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{arg}: expected a value {bound}, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: holds the parameters, their per-parameter state and the step count."""

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
        self.lr = _check_number(lr, "lr")
        self.step_count = 0
        backend = _backend_of(params)
        self.backend = backend
        self.state: dict[str, list[Any]] = {
            name: [backend.xp.zeros_like(p.data) for p in params] for name in self.state_names
        }

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

    def _update(self, active: list[int]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _gather(self, active: list[int]) -> tuple[list[Any], list[Any], list[list[Any]]]:
        params = [self.params[i].data for i in active]
        grads = [self.params[i].grad for i in active]
        states = [[self.state[name][i] for i in active] for name in self.state_names]
        return params, grads, states

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
        self.momentum = _check_number(momentum, "momentum")
        self.nesterov = bool(nesterov)
        self.weight_decay = _check_number(weight_decay, "weight_decay")
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

    def _update(self, active: list[int]) -> None:
        params, grads, states = self._gather(active)
        velocities = states[0] if states else []
        self.backend.sgd_update(params, grads, velocities, lr=self.lr, momentum=self.momentum,
                                nesterov=self.nesterov, weight_decay=self.weight_decay)


class Adam(Optimizer):
    """Adam; with ``weight_decay > 0`` and ``decoupled=True`` (the default) it is AdamW."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = True) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        self.beta1 = _check_number(betas[0], "betas[0]", 0.0, 1.0)
        self.beta2 = _check_number(betas[1], "betas[1]", 0.0, 1.0)
        self.eps = _check_number(eps, "eps")
        self.weight_decay = _check_number(weight_decay, "weight_decay")
        self.decoupled = bool(decoupled)
        super().__init__(params, lr)

    def __repr__(self) -> str:
        return (f"Adam(lr={self.lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps}, "
                f"weight_decay={self.weight_decay}, decoupled={self.decoupled})")

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay, "decoupled": float(self.decoupled)}

    def _update(self, active: list[int]) -> None:
        params, grads, (exp_avgs, exp_avg_sqs) = self._gather(active)
        self.backend.adam_update(params, grads, exp_avgs, exp_avg_sqs, step=self.step_count + 1,
                                 lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                 weight_decay=self.weight_decay, decoupled=self.decoupled)
