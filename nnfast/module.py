"""``Parameter`` and ``Module``, the base of every layer.

Every layer keeps the backend that was current when it was built
(``layer.backend``) and runs all its ops there, like Thinc's ``model.ops``.
Inputs are converted to that backend once, at the layer boundary: NumPy
arrays and lists go to the device for the CuPy backend, float arrays are
cast to the layer's dtype; non-float data raises ``TypeError``. A layer
checks its inputs there and then calls the backend's kernel entries (the
``_op`` methods), which check nothing again.

Gradients accumulate into ``Parameter.grad`` across ``backward`` calls, as in
PyTorch; ``Optimizer.zero_grad`` (or ``Module.zero_grad``) clears them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import checks
from .backends import get_backend


class Parameter:
    """A trainable array and its gradient (``None`` until a backward pass)."""

    __slots__ = ("data", "grad", "name")

    def __init__(self, data: Any, name: str = "") -> None:
        self.data = data
        self.grad: Any = None
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.data.dtype})"


class Module:
    """Base of every layer: ``forward``, ``backward``, ``parameters``."""

    def __init__(self) -> None:
        self.backend = get_backend()

    def forward(self, x: Any) -> Any:
        raise NotImplementedError

    def backward(self, dy: Any) -> Any:
        raise NotImplementedError

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        """``(name, parameter)`` pairs, names like ``"0.W"``, in a stable order."""
        return []

    def parameters(self) -> list[Parameter]:
        """Every trainable parameter, in the order of :meth:`named_parameters`."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        """Forget accumulated gradients."""
        for p in self.parameters():
            p.grad = None

    def _as_input(self, x: Any, arg: str, dtype: Any = None) -> Any:
        """Convert ``x`` to this layer's backend and float dtype, or raise naming ``arg``."""
        backend = self.backend
        if not backend.is_native(x):
            x = backend.asarray(x, arg=arg)
        kind = x.dtype.kind
        if kind != "f":
            raise TypeError(f"{arg}: expected floating-point data, got dtype {x.dtype}")
        if dtype is not None and x.dtype != dtype:
            x = x.astype(dtype)
        elif x.dtype not in checks.FLOAT_DTYPES:  # float16 and friends
            x = x.astype(np.float32)
        return checks.contiguous(backend.xp, x)

    def _grad_input(self, dy: Any, arg: str, like: Any) -> Any:
        """Check an incoming gradient against the forward output it belongs to."""
        dy = self._as_input(dy, arg, dtype=like.dtype)
        if tuple(dy.shape) != tuple(like.shape):
            raise ValueError(f"{arg}: expected shape {tuple(like.shape)} (the forward output), "
                             f"got {tuple(dy.shape)}")
        return dy


def first_repeat(items: Sequence[Any]) -> tuple[int, int] | None:
    """``(i, j)`` for the first object that stands twice in ``items`` (at ``i < j``), else None."""
    seen: dict[int, int] = {}
    for j, item in enumerate(items):
        if id(item) in seen:
            return seen[id(item)], j
        seen[id(item)] = j
    return None
