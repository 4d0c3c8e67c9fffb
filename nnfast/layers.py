"""Layers: ``Linear``, ``Sequential`` and ``MLP`` (and, re-exported, the activation layers).

See :mod:`nnfast.module` for how layers hold their backend and check their
inputs, and :mod:`nnfast.activation_layers` for the activation layers, made
from the activation table.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import checks
from .activation_layers import ActivationLayer
from .activations import BY_NAME, resolve
from .backends import get_backend
from .module import Module, Parameter, first_repeat


def _rng(seed: Any) -> np.random.Generator:
    """The generator for ``seed``: None, a non-negative int, or a ``numpy.random.Generator``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None:
        what = "None, a non-negative int or a numpy.random.Generator"
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed: expected {what}, got {seed!r}")
        if seed < 0:
            raise ValueError(f"seed: expected {what}, got {seed!r}")
    return np.random.default_rng(seed)


def _check_weights_fit(sizes: Sequence[tuple[int, int]], dtype: np.dtype, what: str) -> None:
    """Refuse, before allocating, weights that could not fit in memory."""
    # Initialisation draws float64 values, then casts: count both copies.
    per_element = 8 + dtype.itemsize
    checks.fits_in_memory(sum(n_in * n_out + n_out for n_in, n_out in sizes) * per_element, what,
                          get_backend().memory_limit())


class Linear(Module):
    """``y = act(x @ W + b)`` with ``W`` of shape ``(in_features, out_features)``.

    Weights are drawn from a uniform distribution: He/Kaiming
    (``bound = gain * sqrt(3 / in_features)``, gain ``sqrt(2)``, or
    ``sqrt(2 / (1 + slope**2))`` for leaky ReLU) when ``activation`` is in the
    ReLU family (the activation table's ``init="kaiming"`` rows: relu,
    leaky_relu, elu, gelu, silu, ...), Glorot
    (``bound = sqrt(6 / (in_features + out_features))``) otherwise. Biases
    start at zero. ``seed`` (an int or a ``numpy.random.Generator``) makes the
    initialisation reproducible.
    """

    def __init__(self, in_features: int, out_features: int, activation: str | None = None,
                 bias: bool = True, dtype: Any = "float32", seed: int | np.random.Generator | None = None,
                 alpha: float | None = None) -> None:
        super().__init__()
        self.in_features = checks.integer(in_features, "in_features", low=1)
        self.out_features = checks.integer(out_features, "out_features", low=1)
        self.activation, self.alpha = resolve(activation, alpha)
        self.dtype = checks.float_dtype(dtype)
        rng = _rng(seed)
        _check_weights_fit([(self.in_features, self.out_features)], self.dtype,
                           f"in_features, out_features: Linear({self.in_features}, {self.out_features})")
        bound = BY_NAME[self.activation].init_bound(self.in_features, self.out_features, self.alpha)
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

    def _weights(self) -> tuple[Any, Any]:
        """``W`` and ``b`` as the kernels take them (``W.data`` may have been replaced from outside)."""
        backend, dtype = self.backend, self.dtype
        W = checks.array(backend, self.W.data, "W", ndim=2, dtype=dtype, shape=(self.in_features, self.out_features))
        if self.b is None:
            return W, None
        return W, checks.array(backend, self.b.data, "b", ndim=1, dtype=dtype, shape=(self.out_features,))

    def forward_with(self, x: Any, activation: str, alpha: float) -> Any:
        """Forward with ``activation`` fused in the epilogue (used by :class:`Sequential`)."""
        x = self._as_input(x, "x", self.dtype)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected shape (batch, {self.in_features}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x: expected a non-empty batch, got 0 rows")
        W, b = self._weights()
        checks.fits_in_memory(x.shape[0] * self.out_features * x.dtype.itemsize,
                              f"x: a batch of {x.shape[0]} rows times W's {self.out_features} outputs",
                              self.backend.memory_limit())
        y, saved = self.backend._linear_forward(x, W, b, activation, alpha)
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
        W, _ = self._weights()
        dx, dW, db = self.backend._linear_backward(dy, x, W, saved, activation, alpha, self.b is not None,
                                                   bool(need_input_grad))
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


def _accumulate(p: Parameter, grad: Any) -> None:
    if p.grad is None:
        p.grad = grad
    else:
        p.grad += grad


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
    def _fuse(layers: Sequence[Module]) -> list[tuple[Module, ActivationLayer | None]]:
        plan: list[tuple[Module, ActivationLayer | None]] = []
        i = 0
        while i < len(layers):
            layer, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, Linear) and layer.activation == "identity" and isinstance(nxt, ActivationLayer):
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
            checks.integer(s, f"sizes[{i}]", low=1)
        resolve(activation)  # checked even when no hidden layer uses it
        rng = _rng(seed)
        _check_weights_fit(list(zip(sizes[:-1], sizes[1:])), checks.float_dtype(dtype), f"sizes: MLP({sizes})")
        last = len(sizes) - 2
        super().__init__(*[
            Linear(sizes[i], sizes[i + 1], activation=activation if i < last else None, bias=bias,
                   dtype=dtype, seed=rng)
            for i in range(len(sizes) - 1)
        ])
        self.sizes = sizes


__all__ = ["Linear", "MLP", "Module", "Parameter", "Sequential"]
