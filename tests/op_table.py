"""The op table: one entry per backend op, driving every correctness test.

Each :class:`OpInfo` knows how to make sample inputs, how to run the op on a
backend (returning a tuple of NumPy arrays), and, for ops with a backward,
how to turn the op into a scalar function whose gradient the backend's
backward computes. ``test_op_table.py`` uses it to check

* the NumPy reference's backward against central finite differences (float64);
* every other available backend against the NumPy reference (float32/float64).

Adding an op to the contract means adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from nnfast.backends import available_backends
from nnfast.activations import ACTIVATIONS, BY_NAME, saves_input
from nnfast.backends.base import Backend

#: Every backend that can run here.
AVAILABLE = available_backends()
#: The fast backends, each checked against the NumPy reference.
FAST_BACKENDS = [name for name in AVAILABLE if name != "numpy"]

# (batch, in, out) shapes: batch 1, odd and prime sizes, a long reduction.
LINEAR_SHAPES = [(1, 1, 1), (1, 7, 3), (5, 3, 11), (13, 17, 7), (4, 67, 5), (33, 9, 65)]
# (batch, classes): one class, one row, odd sizes, a long row.
CE_SHAPES = [(1, 1), (1, 5), (7, 1), (6, 10), (17, 33), (3, 1029)]
ELEMENTWISE_SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (257,)]


@dataclass
class Sample:
    """Inputs of one op call: arrays (differentiable ones listed in ``wrt``) and options."""

    arrays: dict[str, np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)
    wrt: tuple[str, ...] = ()

    def __repr__(self) -> str:
        shapes = {k: v.shape for k, v in self.arrays.items()}
        return f"Sample({shapes}, {self.options})"


@dataclass
class OpInfo:
    name: str
    samples: Callable[[np.random.Generator, np.dtype], Iterator[Sample]]
    # Runs the op; returns every output as NumPy arrays.
    run: Callable[[Backend, Sample], tuple[np.ndarray, ...]]
    # For ops with a backward: (scalar value, {input name: analytic gradient}).
    value_and_grad: Callable[[Backend, Sample], tuple[float, dict[str, np.ndarray]]] | None = None
    # Reduction length that scales float32 tolerances.
    reduction_length: Callable[[Sample], int] = lambda s: 1


def _to_backend(backend: Backend, sample: Sample) -> dict[str, Any]:
    # Copies: in-place ops (the optimizers) must not change the sample that the next backend reads.
    return {k: backend.asarray(v.copy()) for k, v in sample.arrays.items()}


def _np(backend: Backend, a: Any) -> np.ndarray | None:
    return None if a is None else np.asarray(backend.to_numpy(a))


def _away_from_kinks(x: np.ndarray, activation: str) -> np.ndarray:
    """Move samples off points where the derivative jumps (0 for ReLU-like, 20 for softplus)."""
    if 0.0 in BY_NAME[activation].kinks:
        x = np.where(np.abs(x) < 0.05, x + np.sign(x + 1e-300) * 0.1, x)
    return x


def _weights(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- activations
def _activation_samples(activation: str):
    def samples(rng: np.random.Generator, dtype: np.dtype) -> Iterator[Sample]:
        for shape in ELEMENTWISE_SHAPES:
            x = _away_from_kinks(rng.standard_normal(shape) * 3, activation).astype(dtype)
            yield Sample({"x": x, "dy": _weights(rng, shape, dtype)}, {"activation": activation}, ("x",))
        # Large magnitudes: saturation, softplus's linear branch, sigmoid tails.
        big = np.array([-60.0, -25.0, -19.5, 19.5, 25.0, 60.0], dtype=dtype)
        yield Sample({"x": big, "dy": np.ones_like(big)}, {"activation": activation}, ("x",))
        if BY_NAME[activation].parameter is not None:
            x = _away_from_kinks(rng.standard_normal(9) * 2, activation).astype(dtype)
            yield Sample({"x": x, "dy": _weights(rng, (9,), dtype)},
                         {"activation": activation, "alpha": 0.3}, ("x",))
    return samples


def _run_activation(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
    a = _to_backend(backend, s)
    act, alpha = s.options["activation"], s.options.get("alpha")
    y = backend.activation_forward(a["x"], act, alpha)
    saved = a["x"] if saves_input(act) else y
    dx = backend.activation_backward(a["dy"], saved, act, alpha)
    return _np(backend, y), _np(backend, dx)


def _activation_value_and_grad(backend: Backend, s: Sample):
    a = _to_backend(backend, s)
    act, alpha = s.options["activation"], s.options.get("alpha")
    y = backend.activation_forward(a["x"], act, alpha)
    value = float(np.sum(_np(backend, y) * s.arrays["dy"]))
    saved = a["x"] if saves_input(act) else y
    return value, {"x": _np(backend, backend.activation_backward(a["dy"], saved, act, alpha))}


# ---------------------------------------------------------------- linear
def _linear_samples(activation: str):
    def samples(rng: np.random.Generator, dtype: np.dtype) -> Iterator[Sample]:
        for i, (batch, n_in, n_out) in enumerate(LINEAR_SHAPES):
            x = rng.standard_normal((batch, n_in)).astype(dtype)
            W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(dtype)
            b = rng.standard_normal(n_out).astype(dtype)
            has_bias = i % 3 != 2
            z = x.astype(np.float64) @ W + (b if has_bias else 0)
            if 0.0 in BY_NAME[activation].kinks and np.abs(z).min() < 1e-3:
                continue  # finite differences are invalid across the kink at 0
            arrays = {"x": x, "W": W, "dy": _weights(rng, (batch, n_out), dtype)}
            if has_bias:
                arrays["b"] = b
            yield Sample(arrays, {"activation": activation}, ("x", "W", "b") if has_bias else ("x", "W"))
    return samples


def _run_linear(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
    a = _to_backend(backend, s)
    act = s.options["activation"]
    y, saved = backend.linear_forward(a["x"], a["W"], a.get("b"), act)
    dx, dW, db = backend.linear_backward(a["dy"], a["x"], a["W"], saved, act, has_bias="b" in a)
    outs = [_np(backend, y), _np(backend, dx), _np(backend, dW)]
    if db is not None:
        outs.append(_np(backend, db))
    return tuple(outs)


def _linear_value_and_grad(backend: Backend, s: Sample):
    a = _to_backend(backend, s)
    act = s.options["activation"]
    y, saved = backend.linear_forward(a["x"], a["W"], a.get("b"), act)
    value = float(np.sum(_np(backend, y) * s.arrays["dy"]))
    dx, dW, db = backend.linear_backward(a["dy"], a["x"], a["W"], saved, act, has_bias="b" in a)
    grads = {"x": _np(backend, dx), "W": _np(backend, dW)}
    if db is not None:
        grads["b"] = _np(backend, db)
    return value, grads


# ---------------------------------------------------------------- softmax cross-entropy
def _ce_samples(rng: np.random.Generator, dtype: np.dtype) -> Iterator[Sample]:
    variants = [
        {"label_smoothing": 0.0, "reduction": "mean"},
        {"label_smoothing": 0.1, "reduction": "mean"},
        {"label_smoothing": 0.0, "reduction": "sum"},
        {"label_smoothing": 0.25, "reduction": "none"},
        {"label_smoothing": 1.0, "reduction": "mean"},
    ]
    for i, (batch, classes) in enumerate(CE_SHAPES):
        for j, options in enumerate(variants):
            logits = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
            labels = rng.integers(0, classes, size=batch)
            if batch > 2 and j % 2 == 0:
                labels[1] = -100  # an ignored row
            arrays = {"logits": logits, "labels": labels}
            if options["reduction"] == "none":
                arrays["dloss"] = _weights(rng, (batch,), dtype)
            yield Sample(arrays, dict(options), ("logits",))
    # Large logits (+-1e4): no overflow, exact gradients.
    big = np.array([[1e4, -1e4, 0.0, 9999.0], [-1e4, -1e4, -1e4, -1e4 + 1]], dtype=dtype)
    yield Sample({"logits": big, "labels": np.array([3, 0])}, {"label_smoothing": 0.1, "reduction": "mean"},
                 ("logits",))
    # Every row ignored: loss 0, gradient 0.
    yield Sample({"logits": rng.standard_normal((3, 4)).astype(dtype), "labels": np.full(3, -100)},
                 {"label_smoothing": 0.0, "reduction": "mean"}, ("logits",))
    # A custom ignore_index that is also a valid class.
    yield Sample({"logits": rng.standard_normal((5, 4)).astype(dtype), "labels": np.array([0, 2, 2, 3, 1])},
                 {"label_smoothing": 0.2, "reduction": "mean", "ignore_index": 2}, ("logits",))


def _ce_call(backend: Backend, s: Sample):
    a = _to_backend(backend, s)
    return backend.softmax_cross_entropy(a["logits"], a["labels"], **s.options)


def _run_ce(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
    loss, grad = _ce_call(backend, s)
    return _np(backend, loss), _np(backend, grad)


def _ce_value_and_grad(backend: Backend, s: Sample):
    loss, grad = _ce_call(backend, s)
    loss, grad = _np(backend, loss), _np(backend, grad)
    if s.options["reduction"] == "none":
        # d(sum_i w_i loss_i)/d logits_i = w_i * dlogits_i (dlogits is the gradient of the sum).
        w = s.arrays["dloss"]
        return float(np.sum(loss * w)), {"logits": grad * w[:, None]}
    return float(loss), {"logits": grad}


# ---------------------------------------------------------------- softmax / log-softmax
def _row_samples(rng: np.random.Generator, dtype: np.dtype) -> Iterator[Sample]:
    for batch, classes in CE_SHAPES:
        yield Sample({"x": (rng.standard_normal((batch, classes)) * 4).astype(dtype)})
    yield Sample({"x": np.array([[1e4, -1e4, 0.0], [-3e3, -3e3, -3e3]], dtype=dtype)})


def _run_softmax(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
    return (_np(backend, backend.softmax(backend.asarray(s.arrays["x"]))),)


def _run_log_softmax(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
    return (_np(backend, backend.log_softmax(backend.asarray(s.arrays["x"]))),)


# ---------------------------------------------------------------- optimizers
_PARAM_SHAPES = [(3, 5), (5,), (1, 1), (17, 4)]


def _optim_samples(kind: str):
    def samples(rng: np.random.Generator, dtype: np.dtype) -> Iterator[Sample]:
        if kind == "sgd":
            settings = [dict(lr=0.1, momentum=0.0), dict(lr=0.05, momentum=0.9),
                        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                        dict(lr=0.2, momentum=0.5, weight_decay=0.1)]
        else:
            settings = [dict(lr=1e-3), dict(lr=1e-2, weight_decay=0.1, decoupled=True),
                        dict(lr=1e-2, weight_decay=0.1, decoupled=False, beta1=0.5, beta2=0.9, eps=1e-6)]
        for options in settings:
            arrays = {}
            for i, shape in enumerate(_PARAM_SHAPES):
                arrays[f"p{i}"] = _weights(rng, shape, dtype)
                arrays[f"g{i}"] = _weights(rng, shape, dtype)
                arrays[f"m{i}"] = _weights(rng, shape, dtype) * dtype.type(0.1)
                arrays[f"v{i}"] = np.abs(_weights(rng, shape, dtype)) * dtype.type(0.01)
            yield Sample(arrays, options)
    return samples


def _run_optim(kind: str):
    def run(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
        a = _to_backend(backend, s)
        n = len(_PARAM_SHAPES)
        params = [a[f"p{i}"] for i in range(n)]
        grads = [a[f"g{i}"] for i in range(n)]
        ms = [a[f"m{i}"] for i in range(n)]
        vs = [a[f"v{i}"] for i in range(n)]
        opts = dict(s.options)
        if kind == "sgd":
            velocities = ms if opts.get("momentum") else []
            for _ in range(3):
                backend.sgd_update(params, grads, velocities, **opts)
            return tuple(_np(backend, t) for t in params + velocities)
        for step in (1, 2, 3):
            backend.adam_update(params, grads, ms, vs, step=step, **opts)
        return tuple(_np(backend, t) for t in params + ms + vs)
    return run


OPS: list[OpInfo] = (
    [OpInfo(f"activation_{a}", _activation_samples(a), _run_activation, _activation_value_and_grad)
     for a in ACTIVATIONS]
    + [OpInfo(f"linear_{a}", _linear_samples(a), _run_linear, _linear_value_and_grad,
              reduction_length=lambda s: max(s.arrays["x"].shape))
       for a in ACTIVATIONS]
    + [OpInfo("softmax_cross_entropy", _ce_samples, _run_ce, _ce_value_and_grad,
              reduction_length=lambda s: s.arrays["logits"].shape[1]),
       OpInfo("softmax", _row_samples, _run_softmax, reduction_length=lambda s: s.arrays["x"].shape[1]),
       OpInfo("log_softmax", _row_samples, _run_log_softmax, reduction_length=lambda s: s.arrays["x"].shape[1]),
       OpInfo("sgd_update", _optim_samples("sgd"), _run_optim("sgd")),
       OpInfo("adam_update", _optim_samples("adam"), _run_optim("adam"))]
)

OPS_BY_NAME = {op.name: op for op in OPS}
