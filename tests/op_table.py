"""The tests' op driver, derived from the library's op table and activation table.

Every op of :data:`nnfast.ops.OPS` is covered by an :class:`OpInfo` here, and
every activation of :data:`nnfast.activations.TABLE` by two (its element-wise
forward/backward pair and the fused linear layer with it in the epilogue).
Each :class:`OpInfo` makes sample inputs (odd shapes, batch 1, extreme
values, every choice an op declares), runs the ops on a backend (returning
NumPy arrays), and, for ops with a backward, turns them into a scalar
function whose gradient the backward computes. The sample shapes can be
replaced, so a backend's own tests run the same driver at the sizes that
matter to its kernels (tile edges, parallel thresholds).

* ``test_op_table.py``: the NumPy reference's backward against central finite
  differences (float64), every other available backend against the
  reference (float32/float64);
* ``test_numba_backend.py``, ``test_cupy_backend.py``,
  ``test_cuda_emulation.py``: the same comparison (:func:`assert_matches_reference`)
  at their backends' sizes.

A new activation gets its entries from its table row (parameter values,
kinks to keep finite differences away from); a new op must be given one
here, or ``test_every_op_of_the_table_is_driven`` fails.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from nnfast.activations import BY_NAME, TABLE, Activation
from nnfast.backends import available_backends
from nnfast.backends.base import Backend
from nnfast.ops import OPS as LIBRARY_OPS
from nnfast.selftest.training import OPTIMIZER_SETTINGS

#: Every backend that can run here.
AVAILABLE = available_backends()
#: The fast backends, each checked against the NumPy reference.
FAST_BACKENDS = [name for name in AVAILABLE if name != "numpy"]

# (batch, in, out) shapes: batch 1, odd and prime sizes, a long reduction.
LINEAR_SHAPES = [(1, 1, 1), (1, 7, 3), (5, 3, 11), (13, 17, 7), (4, 67, 5), (33, 9, 65)]
# (batch, classes): one class, one row, odd sizes, a long row.
ROW_SHAPES = [(1, 1), (1, 5), (7, 1), (6, 10), (17, 33), (3, 1029)]
ELEMENTWISE_SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (257,)]
PARAM_SHAPES = [(3, 5), (5,), (1, 1), (17, 4)]


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
    #: The library ops (rows of nnfast.ops.OPS) it runs.
    ops: tuple[str, ...]
    #: ``samples(rng, dtype, shapes=None)``: shapes None means the driver's own.
    samples: Callable[..., Iterator[Sample]]
    # Runs the ops; returns every output as NumPy arrays.
    run: Callable[[Backend, Sample], tuple[np.ndarray, ...]]
    # For ops with a backward: (scalar value, {input name: analytic gradient}).
    value_and_grad: Callable[[Backend, Sample], tuple[float, dict[str, np.ndarray]]] | None = None
    # Reduction length that scales float32 tolerances.
    reduction_length: Callable[[Sample], int] = lambda s: 1
    #: The activation it runs (the entries of the activation pair and the linear layer).
    activation: str | None = None


def _to_backend(backend: Backend, sample: Sample) -> dict[str, Any]:
    # Copies: in-place ops (the optimizers) must not change the sample that the next backend reads.
    return {k: backend.asarray(v.copy()) for k, v in sample.arrays.items()}


def _np(backend: Backend, a: Any) -> np.ndarray | None:
    return None if a is None else np.asarray(backend.to_numpy(a))


def away_from_kinks(x: np.ndarray, row: Activation, margin: float = 0.05) -> np.ndarray:
    """``x`` with values near the row's kinks moved off them (finite differences are invalid there)."""
    for kink in row.kinks:
        near = np.abs(x - kink) < margin
        x = np.where(near, kink + np.where(x >= kink, 2, -2) * margin, x)
    return x


def _weights(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _alphas(row: Activation) -> list[float | None]:
    """The ``alpha`` values a row is sampled at: its default, and a second one if it has a parameter."""
    return [None] if row.parameter is None else [None, row.parameter.default * 3 + 0.3]


def activation_layer_factories() -> list[Callable[[], Any]]:
    """One function per activation row making its layer (with a non-default parameter, if any),
    named after the row (pytest's test ids)."""
    import nnfast as nf

    def make(row: Activation) -> Callable[[], Any]:
        kwargs = dict([row.layer_option]) if row.layer_option else {}
        if row.parameter is not None:
            kwargs[row.parameter.name] = _alphas(row)[-1]

        def layer() -> Any:
            return getattr(nf, row.layer)(**kwargs)

        layer.__name__ = row.name
        return layer

    return [make(row) for row in TABLE]


# ---------------------------------------------------------------- activations: forward and backward
def _activation_samples(row: Activation):
    def samples(rng: np.random.Generator, dtype: np.dtype, shapes: Sequence[tuple] | None = None) -> Iterator[Sample]:
        for alpha in _alphas(row):
            options = {"activation": row.name, "alpha": alpha}
            for shape in shapes or ELEMENTWISE_SHAPES:
                x = away_from_kinks(rng.standard_normal(shape) * 3, row).astype(dtype)
                yield Sample({"x": x, "dy": _weights(rng, shape, dtype)}, options, ("x",))
        if shapes is None:
            # Large magnitudes: saturation, softplus's linear branch, sigmoid tails.
            big = np.array([-60.0, -25.0, -19.5, 19.5, 25.0, 60.0], dtype=dtype)
            yield Sample({"x": big, "dy": np.ones_like(big)}, {"activation": row.name}, ("x",))
    return samples


def _activation_call(backend: Backend, s: Sample) -> tuple[Any, Any]:
    a = _to_backend(backend, s)
    act, alpha = s.options["activation"], s.options.get("alpha")
    y = backend.activation_forward(a["x"], act, alpha)
    saved = a["x"] if BY_NAME[act].saves_input else y
    return y, backend.activation_backward(a["dy"], saved, act, alpha)


def _run_activation(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
    y, dx = _activation_call(backend, s)
    return _np(backend, y), _np(backend, dx)


def _activation_value_and_grad(backend: Backend, s: Sample):
    y, dx = _activation_call(backend, s)
    return float(np.sum(_np(backend, y) * s.arrays["dy"])), {"x": _np(backend, dx)}


# ---------------------------------------------------------------- linear: forward and backward
def _linear_samples(row: Activation):
    def samples(rng: np.random.Generator, dtype: np.dtype, shapes: Sequence[tuple] | None = None) -> Iterator[Sample]:
        for i, (batch, n_in, n_out) in enumerate(shapes or LINEAR_SHAPES):
            x = rng.standard_normal((batch, n_in)).astype(dtype)
            W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(dtype)
            b = rng.standard_normal(n_out).astype(dtype)
            has_bias = i % 3 != 2
            z = x.astype(np.float64) @ W + (b if has_bias else 0)
            if shapes is None and any(np.abs(z - k).min() < 1e-3 for k in row.kinks):
                continue  # finite differences are invalid across a kink
            arrays = {"x": x, "W": W, "dy": _weights(rng, (batch, n_out), dtype)}
            if has_bias:
                arrays["b"] = b
            options = {"activation": row.name, "alpha": _alphas(row)[i % len(_alphas(row))],
                       "need_dx": shapes is None or i % 4 != 3}
            yield Sample(arrays, options, ("x", "W", "b") if has_bias else ("x", "W"))
    return samples


def _linear_call(backend: Backend, s: Sample) -> tuple[Any, ...]:
    a = _to_backend(backend, s)
    act, alpha = s.options["activation"], s.options.get("alpha")
    y, saved = backend.linear_forward(a["x"], a["W"], a.get("b"), act, alpha)
    dx, dW, db = backend.linear_backward(a["dy"], a["x"], a["W"], saved, act, alpha, has_bias="b" in a,
                                         need_dx=s.options.get("need_dx", True))
    return y, saved, dx, dW, db


def _run_linear(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
    return tuple(_np(backend, t) for t in _linear_call(backend, s) if t is not None)


def _linear_value_and_grad(backend: Backend, s: Sample):
    y, _, dx, dW, db = _linear_call(backend, s)
    grads = {"x": _np(backend, dx), "W": _np(backend, dW)}
    if db is not None:
        grads["b"] = _np(backend, db)
    return float(np.sum(_np(backend, y) * s.arrays["dy"])), grads


# ---------------------------------------------------------------- softmax cross-entropy
_CE_ROW = LIBRARY_OPS["softmax_cross_entropy"]
_SMOOTHING = _CE_ROW.arg("label_smoothing").check  # Real(0, 1)


def _ce_samples(rng: np.random.Generator, dtype: np.dtype, shapes: Sequence[tuple] | None = None) -> Iterator[Sample]:
    # Every reduction the row declares, smoothing at both ends of its range and inside.
    smoothings = [_SMOOTHING.low, 0.1, 0.25, _SMOOTHING.high]
    variants = [{"label_smoothing": s, "reduction": r}
                for s in smoothings for r in _CE_ROW.arg("reduction").check.options][::2]
    for i, (batch, classes) in enumerate(shapes or ROW_SHAPES):
        for j, options in enumerate(variants):
            logits = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
            labels = rng.integers(0, classes, size=batch)
            if batch > 2 and j % 2 == 0:
                labels[1] = -100  # an ignored row
            arrays = {"logits": logits, "labels": labels}
            if options["reduction"] == "none":
                arrays["dloss"] = _weights(rng, (batch,), dtype)
            yield Sample(arrays, dict(options), ("logits",))
    if shapes is not None:
        return
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
def _row_samples(rng: np.random.Generator, dtype: np.dtype, shapes: Sequence[tuple] | None = None) -> Iterator[Sample]:
    for batch, classes in shapes or ROW_SHAPES:
        yield Sample({"x": (rng.standard_normal((batch, classes)) * 4).astype(dtype)})
    if shapes is None:
        yield Sample({"x": np.array([[1e4, -1e4, 0.0], [-3e3, -3e3, -3e3]], dtype=dtype)})


def _run_rows(op: str):
    def run(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
        return (_np(backend, getattr(backend, op)(backend.asarray(s.arrays["x"]))),)
    return run


# ---------------------------------------------------------------- optimizers
# The settings the optimizers are run with (every flag of the rows both ways): nnfast selftest's.


def _optim_samples(op: str):
    def samples(rng: np.random.Generator, dtype: np.dtype, shapes: Sequence[tuple] | None = None) -> Iterator[Sample]:
        shapes = shapes or PARAM_SHAPES
        for options in OPTIMIZER_SETTINGS[op]:
            arrays = {}
            for i, shape in enumerate(shapes):
                arrays[f"p{i}"] = _weights(rng, shape, dtype)
                arrays[f"g{i}"] = _weights(rng, shape, dtype)
                arrays[f"m{i}"] = _weights(rng, shape, dtype) * dtype.type(0.1)
                arrays[f"v{i}"] = np.abs(_weights(rng, shape, dtype)) * dtype.type(0.01)
            yield Sample(arrays, dict(options, count=len(shapes)))
    return samples


def _run_optim(op: str):
    def run(backend: Backend, s: Sample) -> tuple[np.ndarray, ...]:
        a = _to_backend(backend, s)
        opts = dict(s.options)
        n = opts.pop("count")
        params, grads = [a[f"p{i}"] for i in range(n)], [a[f"g{i}"] for i in range(n)]
        ms, vs = [a[f"m{i}"] for i in range(n)], [a[f"v{i}"] for i in range(n)]
        if op == "sgd_update":
            velocities = ms if opts.get("momentum") else []
            for _ in range(3):
                backend.sgd_update(params, grads, velocities, **opts)
            return tuple(_np(backend, t) for t in params + velocities)
        for step in (1, 2, 3):
            backend.adam_update(params, grads, ms, vs, step=step, **opts)
        return tuple(_np(backend, t) for t in params + ms + vs)
    return run


# ---------------------------------------------------------------- the driver
def _length_of(name: str, axis: int | None = None):
    return lambda s: max(s.arrays[name].shape) if axis is None else s.arrays[name].shape[axis]


OPS: list[OpInfo] = (
    [OpInfo(f"activation_{row.name}", ("activation_forward", "activation_backward"), _activation_samples(row),
            _run_activation, _activation_value_and_grad, activation=row.name) for row in TABLE]
    + [OpInfo(f"linear_{row.name}", ("linear_forward", "linear_backward"), _linear_samples(row), _run_linear,
              _linear_value_and_grad, reduction_length=_length_of("x"), activation=row.name) for row in TABLE]
    + [OpInfo("softmax_cross_entropy", ("softmax_cross_entropy",), _ce_samples, _run_ce, _ce_value_and_grad,
              reduction_length=_length_of("logits", 1))]
    + [OpInfo(op, (op,), _row_samples, _run_rows(op), reduction_length=_length_of("x", 1))
       for op in ("softmax", "log_softmax")]
    + [OpInfo(op, (op,), _optim_samples(op), _run_optim(op)) for op in OPTIMIZER_SETTINGS]
)

OPS_BY_NAME = {op.name: op for op in OPS}


def tolerances(op: OpInfo, sample: Sample, dtype: np.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of a backend against the reference; atol is scaled by the output's magnitude."""
    length = max(op.reduction_length(sample), 1)
    if np.dtype(dtype) == np.float64:
        return 1e-9, 1e-12 * length
    return 1e-4, 1e-5 * np.sqrt(length)


def assert_matches_reference(op: OpInfo, backend: Backend, reference: Backend, sample: Sample, dtype: Any,
                             what: str = "") -> None:
    """Run ``op`` on both backends (each on its own copy of ``sample``) and compare every output."""
    expected = op.run(reference, copy.deepcopy(sample))
    got = op.run(backend, copy.deepcopy(sample))
    assert len(got) == len(expected), f"{what} {op.name}: {len(got)} outputs, reference {len(expected)}"
    rtol, atol = tolerances(op, sample, dtype)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype, f"{what} {op.name} output {i}: dtype {g.dtype}, reference {e.dtype}"
        scale = max(float(np.abs(e).max()) if e.size else 0.0, 1.0)
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol * scale, err_msg=f"{what} {op.name} output {i} {sample}")
