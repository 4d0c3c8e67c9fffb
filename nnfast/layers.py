"""Layers: ``Linear``, the activation layers, ``Sequential`` and ``MLP``.

Every layer keeps the backend that was current when it was built
(``layer.backend``) and runs all its ops there, like Thinc's ``model.ops``.
Inputs are converted to that backend once, at the layer boundary: NumPy
arrays and lists go to the device for the CuPy backend, float arrays are
cast to the layer's dtype; non-float data raises ``TypeError``.

Gradients accumulate into ``Parameter.grad`` across ``backward`` calls, as in
PyTorch; ``Optimizer.zero_grad`` (or ``Module.zero_grad``) clears them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backends import get_backend
from .backends.base import ACTIVATIONS, check_allocation, resolve_activation, saves_input

# Initialised with He/Kaiming (gain for the ReLU family); the rest with Glorot.
_KAIMING_ACTIVATIONS = frozenset({"relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu"})


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
        elif x.dtype not in (np.float32, np.float64):  # float16 and friends
            x = x.astype(np.float32)
        return x

    def _grad_input(self, dy: Any, arg: str, like: Any) -> Any:
        """Check an incoming gradient against the forward output it belongs to."""
        dy = self._as_input(dy, arg, dtype=like.dtype)
        if tuple(dy.shape) != tuple(like.shape):
            raise ValueError(f"{arg}: expected shape {tuple(like.shape)} (the forward output), "
                             f"got {tuple(dy.shape)}")
        return dy


def _rng(seed: Any) -> np.random.Generator:
    """The generator for ``seed``: None, a non-negative int, or a ``numpy.random.Generator``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed: expected None, a non-negative int or a numpy.random.Generator, got {seed!r}")
    return np.random.default_rng(seed)


def _check_weights_fit(sizes: Sequence[tuple[int, int]], dtype: np.dtype, what: str) -> None:
    """Refuse, before allocating, weights that could not fit in memory."""
    # Initialisation draws float64 values, then casts: count both copies.
    per_element = 8 + dtype.itemsize
    check_allocation(sum(n_in * n_out + n_out for n_in, n_out in sizes) * per_element, what,
                     get_backend().memory_limit())


def _check_positive_int(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    return int(value)


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt not in (np.dtype(np.float32), np.dtype(np.float64)):  # None == float64 in NumPy
        raise TypeError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    return dt


class Linear(Module):
    """``y = act(x @ W + b)`` with ``W`` of shape ``(in_features, out_features)``.

    Weights are drawn from a uniform distribution: He/Kaiming
    (``bound = gain * sqrt(3 / in_features)``, gain ``sqrt(2)``, or
    ``sqrt(2 / (1 + slope**2))`` for leaky ReLU) when ``activation`` is in the
    ReLU family (relu, leaky_relu, elu, gelu, gelu_tanh, silu), Glorot
    (``bound = sqrt(6 / (in_features + out_features))``) otherwise. Biases
    start at zero. ``seed`` (an int or a ``numpy.random.Generator``) makes the
    initialisation reproducible.
    """

    def __init__(self, in_features: int, out_features: int, activation: str | None = None,
                 bias: bool = True, dtype: Any = "float32", seed: int | np.random.Generator | None = None,
                 alpha: float | None = None) -> None:
        super().__init__()
        self.in_features = _check_positive_int(in_features, "in_features")
        self.out_features = _check_positive_int(out_features, "out_features")
        self.activation, self.alpha = resolve_activation(activation, alpha)
        self.dtype = _check_dtype(dtype)
        rng = _rng(seed)
        _check_weights_fit([(self.in_features, self.out_features)], self.dtype,
                           f"in_features, out_features: Linear({self.in_features}, {self.out_features})")
        if self.activation in _KAIMING_ACTIVATIONS:
            slope = self.alpha if self.activation == "leaky_relu" else 0.0
            bound = math.sqrt(2.0 / (1.0 + slope**2)) * math.sqrt(3.0 / self.in_features)
        else:
            bound = math.sqrt(6.0 / (self.in_features + self.out_features))
        W = rng.uniform(-bound, bound, size=(self.in_features, self.out_features))
        self.W = Parameter(self.backend.asarray(W, dtype=self.dtype), "W")
        self.b = Parameter(self.backend.zeros(self.out_features, dtype=self.dtype), "b") if bias else None
        self._cache: tuple[Any, Any, Any] | None = None

    def __repr__(self) -> str:
        act = "" if self.activation == "identity" else f", activation={self.activation!r}"
        return f"Linear({self.in_features}, {self.out_features}{act}, bias={self.b is not None})"

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        return [("W", self.W)] + ([("b", self.b)] if self.b is not None else [])

    def forward(self, x: Any) -> Any:
        return self.forward_with(x, self.activation, self.alpha)

    def backward(self, dy: Any, need_input_grad: bool = True) -> Any:
        return self.backward_with(dy, need_input_grad)

    def forward_with(self, x: Any, activation: str, alpha: float) -> Any:
        """Forward with ``activation`` fused in the epilogue (used by :class:`Sequential`)."""
        x = self._as_input(x, "x", self.dtype)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected shape (batch, {self.in_features}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x: expected a non-empty batch, got 0 rows")
        b = self.b.data if self.b is not None else None
        y, saved = self.backend.linear_forward(x, self.W.data, b, activation, alpha)
        self._cache = (x, saved, y, activation, alpha)
        return y

    def backward_with(self, dy: Any, need_input_grad: bool = True) -> Any:
        """Backward of the last :meth:`forward_with`; accumulates ``W.grad`` and ``b.grad``."""
        if self._cache is None:
            raise RuntimeError("Linear.backward: call forward first")
        x, saved, y, activation, alpha = self._cache
        dy = self._grad_input(dy, "dy", y)
        for p in self.parameters():  # before anything is accumulated: all or nothing
            _check_grad_slot(p, self.backend)
        dx, dW, db = self.backend.linear_backward(
            dy, x, self.W.data, saved, activation, alpha,
            has_bias=self.b is not None, need_dx=need_input_grad)
        _accumulate(self.W, dW)
        if self.b is not None:
            _accumulate(self.b, db)
        return dx


def _check_grad_slot(p: Parameter, backend: Any) -> None:
    """Refuse a ``grad`` (set from outside) that a gradient cannot be added to in place."""
    g = p.grad
    if g is None:
        return
    if not backend.is_native(g) or g.dtype != p.data.dtype or tuple(g.shape) != p.shape \
            or not g.flags.writeable:
        what = (f"a {type(g).__name__}" if not backend.is_native(g)
                else f"shape {tuple(g.shape)} {g.dtype}{'' if g.flags.writeable else ', read-only'}")
        raise ValueError(f"{p.name}.grad: expected None or a writeable array of shape {p.shape} and dtype "
                         f"{p.data.dtype} to accumulate into, got {what}")


def first_repeat(items: Sequence[Any]) -> tuple[int, int] | None:
    """``(i, j)`` for the first object that stands twice in ``items`` (at ``i < j``), else None."""
    seen: dict[int, int] = {}
    for j, item in enumerate(items):
        if id(item) in seen:
            return seen[id(item)], j
        seen[id(item)] = j
    return None


def _accumulate(p: Parameter, grad: Any) -> None:
    if p.grad is None:
        p.grad = grad
    else:
        p.grad += grad


class _Activation(Module):
    """An element-wise activation layer; subclasses name the activation."""

    activation = "identity"

    def __init__(self, alpha: float | None = None) -> None:
        super().__init__()
        self.activation, self.alpha = resolve_activation(self.activation, alpha)
        self._cache: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def forward(self, x: Any) -> Any:
        x = self._as_input(x, "x")
        if x.size == 0:
            raise ValueError(f"x: expected a non-empty array, got shape {tuple(x.shape)}")
        y = self.backend.activation_forward(x, self.activation, self.alpha)
        self._cache = (x if saves_input(self.activation) else y, y)
        return y

    def backward(self, dy: Any) -> Any:
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first")
        saved, y = self._cache
        dy = self._grad_input(dy, "dy", y)
        return self.backend.activation_backward(dy, saved, self.activation, self.alpha)


class Identity(_Activation):
    """``y = x``."""

    activation = "identity"


class ReLU(_Activation):
    """``y = max(x, 0)``."""

    activation = "relu"


class LeakyReLU(_Activation):
    """``y = x if x > 0 else negative_slope * x`` (``negative_slope >= 0``)."""

    activation = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__(negative_slope)

    def __repr__(self) -> str:
        return f"LeakyReLU({self.alpha})"


class Sigmoid(_Activation):
    """``y = 1 / (1 + exp(-x))``."""

    activation = "sigmoid"


class Tanh(_Activation):
    """``y = tanh(x)``."""

    activation = "tanh"


class GELU(_Activation):
    """``y = x * Phi(x)``; ``approximate="tanh"`` uses PyTorch's tanh formula."""

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        self.activation = "gelu" if approximate == "none" else "gelu_tanh"
        super().__init__()

    def __repr__(self) -> str:
        return "GELU()" if self.activation == "gelu" else "GELU(approximate='tanh')"


class SiLU(_Activation):
    """``y = x * sigmoid(x)`` (swish)."""

    activation = "silu"


class Softplus(_Activation):
    """``y = log(1 + exp(x))``, and ``x`` above 20 (PyTorch's beta 1, threshold 20)."""

    activation = "softplus"


class ELU(_Activation):
    """``y = x if x > 0 else alpha * (exp(x) - 1)`` (``alpha >= 0``)."""

    activation = "elu"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    def __repr__(self) -> str:
        return f"ELU({self.alpha})"


_LAYER_OF = {
    "identity": Identity,
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "gelu": lambda: GELU("none"),
    "gelu_tanh": lambda: GELU("tanh"),
    "silu": SiLU,
    "softplus": Softplus,
    "elu": ELU,
}
assert set(_LAYER_OF) == set(ACTIVATIONS)


def activation_layer(name: str | None) -> Module:
    """The activation layer for an activation name (``"relu"``, ``"gelu_tanh"``, ...)."""
    name, _ = resolve_activation(name)
    return _LAYER_OF[name]()


class Sequential(Module):
    """Layers applied in order; ``Linear`` followed by an activation runs fused.

    A ``Linear`` without activation of its own that is directly followed by an
    activation layer is executed as a single ``linear_forward`` call with that
    activation in the epilogue (and a single fused backward); the result is
    the same as running the two layers one after the other.
    """

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"layers[{i}]: expected an nnfast Module, got {type(layer).__name__}")
        repeat = first_repeat(layers)
        if repeat is not None:
            # Each layer keeps the cache of its last forward: a second use
            # would overwrite the first one's and corrupt the backward.
            raise ValueError(f"layers[{repeat[1]}]: the same layer object as layers[{repeat[0]}]; "
                             "use a new layer instance for each position")
        self.layers = list(layers)
        self._plan = self._fuse(self.layers)

    @staticmethod
    def _fuse(layers: Sequence[Module]) -> list[tuple[Module, _Activation | None]]:
        plan: list[tuple[Module, _Activation | None]] = []
        i = 0
        while i < len(layers):
            layer, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, Linear) and layer.activation == "identity" and isinstance(nxt, _Activation):
                plan.append((layer, nxt))
                i += 2
            else:
                plan.append((layer, None))
                i += 1
        return plan

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"{type(self).__name__}(\n  {inner}\n)"

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers)
                for name, p in layer.named_parameters()]

    def forward(self, x: Any) -> Any:
        # A failure in a later layer must not leave the earlier layers holding
        # caches of an input whose backward will never come: restore them all.
        caches = _caches(self)
        try:
            for layer, act in self._plan:
                x = layer.forward_with(x, act.activation, act.alpha) if act is not None else layer.forward(x)
        except BaseException:
            _restore_caches(caches)
            raise
        return x

    def backward(self, dy: Any, need_input_grad: bool = True,
                 after_layer: Callable[[Module], None] | None = None) -> Any:
        """Backward through every layer; ``need_input_grad=False`` skips the
        first layer's ``dx`` (returns None) when nobody needs it.

        ``after_layer(layer)``, when given, is called right after each
        layer's backward, once that layer's parameter gradients are final
        (data-parallel training starts reducing them there, while the layers
        before it are still being differentiated).
        """
        for k in range(len(self._plan) - 1, -1, -1):
            layer, act = self._plan[k]
            first = k == 0
            if isinstance(layer, Linear):
                dy = layer.backward_with(dy, need_input_grad or not first)
            else:
                dy = layer.backward(dy)
            if after_layer is not None:
                after_layer(layer)
        return dy


def _caches(module: Module) -> list[tuple[Module, Any]]:
    """``(layer, its forward cache)`` for ``module`` and every layer inside it."""
    out = [(module, module.__dict__["_cache"])] if "_cache" in module.__dict__ else []
    for layer in getattr(module, "layers", ()):
        out.extend(_caches(layer))
    return out


def _restore_caches(caches: list[tuple[Module, Any]]) -> None:
    for layer, cache in caches:
        layer._cache = cache


class MLP(Sequential):
    """A multilayer perceptron: ``Linear`` layers of the given sizes.

    ``MLP([784, 256, 10], activation="relu")`` is
    ``Sequential(Linear(784, 256, activation="relu"), Linear(256, 10))``: every
    hidden layer carries ``activation`` fused, the last one is linear
    (logits). ``seed`` makes the whole initialisation reproducible.
    """

    def __init__(self, sizes: Sequence[int], activation: str | None = "relu", bias: bool = True,
                 dtype: Any = "float32", seed: int | None = None) -> None:
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else sizes
        if not isinstance(sizes, list) or len(sizes) < 2:
            raise ValueError(f"sizes: expected a list of at least 2 layer sizes, got {sizes!r}")
        for i, s in enumerate(sizes):
            _check_positive_int(s, f"sizes[{i}]")
        resolve_activation(activation)  # checked even when no hidden layer uses it
        rng = _rng(seed)
        _check_weights_fit(list(zip(sizes[:-1], sizes[1:])), _check_dtype(dtype), f"sizes: MLP({sizes})")
        last = len(sizes) - 2
        super().__init__(*[
            Linear(sizes[i], sizes[i + 1], activation=activation if i < last else None, bias=bias,
                   dtype=dtype, seed=rng)
            for i in range(len(sizes) - 1)
        ])
        self.sizes = sizes
