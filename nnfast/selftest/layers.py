"""Self-test checks of the activations and of the linear layer, one or more per row of the activation table.

* ``activation[<name>]``: forward and backward of every activation (and of
  the two with a parameter, at a second value of it) on a buffer whose length
  is not a multiple of a 16-byte vector, with the saturating inputs
  (+-19.5, 25, 60) among ordinary ones; then the same on a view one element
  into its buffer (the scalar path of the CUDA kernels).
* ``linear[<name>]``: forward and backward of a linear layer with every
  activation, fused in the GEMM's epilogue (``linear_forward(activation=...)``)
  and unfused (an identity layer, then the element-wise activation), with and
  without a bias.

The backward ops are given the backend's own saved tensor (the
pre-activation or the output); the reference computes the derivative from
the same values, so a pre-activation that rounds to the other side of a kink
(ReLU's 0) cannot make a correct backend fail.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..activations import TABLE, Activation, saves_input
from .check import Check, Context, dims
from .compare import Pair

#: Inputs where activations saturate or switch formula (softplus's threshold 20, the float32 exp range).
EXTREMES = (-60.0, -25.0, -19.5, 19.5, 25.0, 60.0)
#: Elements of the activation checks: not a multiple of a 16-byte vector (a scalar tail after the vectors).
ACTIVATION_SHAPE = (7, 1031)
#: (batch, in, out) of the linear checks with a bias (in and out multiples of 4: the vector path) and without.
LINEAR_SHAPES = {True: (50, 68, 36), False: (45, 67, 39)}


def alphas(row: Activation) -> list[float | None]:
    """The parameter values a row is checked at: its default, and another one if it has a parameter."""
    return [None] if row.parameter is None else [None, row.parameter.default * 3 + 0.3]


def _label(row: Activation, alpha: float | None) -> str:
    return row.name if alpha is None else f"{row.name} {row.parameter.name}={alpha:g}"


# ------------------------------------------------------------------ activations
def _activation_run(row: Activation, alpha: float | None, offset: int):
    def run(ctx: Context) -> list[Pair]:
        be, ref = ctx.backend, ctx.reference
        x = ctx.normal(*ACTIVATION_SHAPE, scale=3.0)
        x.ravel()[:len(EXTREMES)] = EXTREMES
        dy = ctx.normal(*ACTIVATION_SHAPE)
        xb = ctx.put(x, offset)
        y = be.activation_forward(xb, row.name, alpha)
        saved = xb if row.saves_input else y
        dx = be.activation_backward(ctx.put(dy, offset), saved, row.name, alpha)
        saved_ref = ctx.wide(x) if row.saves_input else ctx.wide(ctx.get(y))
        return [Pair("y", ctx.get(y), ref.activation_forward(ctx.wide(x), row.name, alpha)),
                Pair("dx", ctx.get(dx), ref.activation_backward(ctx.wide(dy), saved_ref, row.name, alpha))]
    return run


def activation_checks() -> Iterator[Check]:
    for row in TABLE:
        for alpha in alphas(row):
            for offset, where in ((0, "aligned"), (1, "misaligned")):
                yield Check("activation", f"activation[{_label(row, alpha)}] {where}",
                            dims(*ACTIVATION_SHAPE) + ("+1" if offset else ""),
                            ("activation_forward", "activation_backward"), _activation_run(row, alpha, offset),
                            activations=(row.name,))


# ------------------------------------------------------------------ linear
def layer_inputs(ctx: Context, shape: tuple[int, int, int], bias: bool) -> tuple[np.ndarray, ...]:
    """``(x, W, b, dy)`` of a (batch, in, out) layer: pre-activations of order 1, never zeros."""
    m, k, n = shape
    x = ctx.normal(m, k)
    W = ctx.normal(k, n, scale=1 / np.sqrt(k))
    b = ctx.normal(n, scale=0.5) if bias else None
    return x, W, b, ctx.normal(m, n)


def linear_reference(ctx: Context, x: np.ndarray, W: np.ndarray, b: np.ndarray | None, dy: np.ndarray,
                     activation: str, alpha: float | None, saved: np.ndarray,
                     need_dx: bool = True) -> dict[str, Any]:
    """The reference outputs of a layer; the backward from the backend's ``saved`` (see the module doc)."""
    ref, w = ctx.reference, ctx.wide
    y, z = ref.linear_forward(w(x), w(W), w(b), activation, alpha)
    dx, dW, db = ref.linear_backward(w(dy), w(x), w(W), w(saved), activation, alpha, has_bias=b is not None,
                                     need_dx=need_dx)
    out = {"y": y, "dW": dW}
    if saves_input(activation):
        out["z"] = z
    if need_dx:
        out["dx"] = dx
    if b is not None:
        out["db"] = db
    return out


def run_layer(ctx: Context, x: Any, W: Any, b: Any, dy: Any, activation: str, alpha: float | None = None,
              *, fused: bool = True, need_dx: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Forward and backward of one layer on the backend (arrays already there, views allowed).

    Returns the outputs as NumPy arrays by name (as :func:`linear_reference`
    names them) and the tensor the activation's derivative was computed from.
    """
    be = ctx.backend
    has_bias = b is not None
    if fused:
        y, saved = be.linear_forward(x, W, b, activation, alpha)
        z = saved
        dx, dW, db = be.linear_backward(dy, x, W, saved, activation, alpha, has_bias=has_bias, need_dx=need_dx)
    else:
        z, _ = be.linear_forward(x, W, b, "identity")
        y = be.activation_forward(z, activation, alpha)
        saved = z if saves_input(activation) else y
        dz = be.activation_backward(dy, saved, activation, alpha)
        dx, dW, db = be.linear_backward(dz, x, W, z, "identity", has_bias=has_bias, need_dx=need_dx)
    out = {"y": ctx.get(y), "dW": ctx.get(dW)}
    if saves_input(activation):
        out["z"] = ctx.get(z)
    if need_dx:
        out["dx"] = ctx.get(dx)
    if has_bias:
        out["db"] = ctx.get(db)
    return out, (out["z"] if saves_input(activation) else out["y"])


def pairs(got: dict[str, np.ndarray], expected: dict[str, Any]) -> list[Pair]:
    """The outputs of a layer side by side (every name the reference has)."""
    return [Pair(name, got.get(name, np.full((), np.nan)), value) for name, value in expected.items()]


def _linear_run(row: Activation, fused: bool, bias: bool):
    def run(ctx: Context) -> list[Pair]:
        x, W, b, dy = layer_inputs(ctx, LINEAR_SHAPES[bias], bias)
        got, saved = run_layer(ctx, ctx.put(x), ctx.put(W), None if b is None else ctx.put(b), ctx.put(dy),
                               row.name, fused=fused)
        return pairs(got, linear_reference(ctx, x, W, b, dy, row.name, None, saved))
    return run


def linear_checks() -> Iterator[Check]:
    for row in TABLE:
        for fused in (True, False):
            for bias in (True, False):
                shape = LINEAR_SHAPES[bias]
                ops = ("linear_forward", "linear_backward") + (() if fused else ("activation_forward",
                                                                                 "activation_backward"))
                yield Check("linear", f"linear[{row.name}] {'fused' if fused else 'unfused'}, "
                                      f"{'bias' if bias else 'no bias'}",
                            dims(*shape, arrow=True), ops, _linear_run(row, fused, bias), length=max(shape),
                            gemm=True, activations=(row.name,))


__all__ = ["ACTIVATION_SHAPE", "EXTREMES", "LINEAR_SHAPES", "activation_checks", "alphas", "layer_inputs",
           "linear_checks", "linear_reference", "pairs", "run_layer"]
