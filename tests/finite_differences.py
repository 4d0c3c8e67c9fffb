"""Central finite differences of the reference ops, and the error bound they are checked against.

The check compares an analytic derivative ``g`` with the central difference

    D = (f^(x+) - f^(x-)) / (x+ - x-),    x+ = fl(x + h),  x- = fl(x - h),

where ``f^`` is ``f`` evaluated in float64. Dividing by the step actually taken
(``x+ - x-`` is exact by Sterbenz's lemma once ``|x| >= 3h``, and within one
rounding, a relative ``eps``, nearer 0) removes the error of representing
``x +- h``; what is left of it moves the expansion point by at most
``eps |x| / 2``, an error of ``|f''| eps |x| / 2``, far below the terms below.

* Truncation. Taylor's theorem with ``x+ - x = x - x- = h``:
  ``(f(x+h) - f(x-h)) / 2h = f'(x) + f'''(xi) h^2 / 6`` for some ``xi`` in
  ``[x - h, x + h]``, so the truncation error is at most ``M3 h^2 / 6`` with
  ``M3`` a bound on ``|f'''|`` over that interval along the perturbed
  coordinate (derived per op below).
* Rounding. ``f^`` differs from ``f`` by at most ``gamma eps F``, where ``F``
  is the sum of the magnitudes that the evaluation of ``f`` adds and subtracts
  (*not* ``|f|``: the loss of a confidently right row is the difference of two
  numbers of the logits' size, and a sum weighted by random signs cancels),
  and ``gamma`` counts the roundings: a few ulps per element-wise function
  (exp, log1p, erf, tanh: <= 4 each, two in a row: 8) plus ``log2 N`` for
  NumPy's pairwise summation of ``N`` terms. The two evaluations are
  independent, so the difference quotient carries at most
  ``2 gamma eps F / 2h = gamma eps F / h``.
* The analytic gradient's own rounding is ``gamma eps`` times its terms, which
  are no larger than ``F / h`` here (``1 / h >= 1e5``): it fits in the slack of
  the rounding term, and a small relative term ``RTOL |g|`` covers the rest.

Hence ``|D - g| <= M3 h^2 / 6 + gamma eps F / h + RTOL |g|``. The rounding term
is an absolute floor tied to the value scale ``F``: with a relative tolerance
alone, a tiny gradient (logits of 1e-3 under full label smoothing give
gradients of 1e-4 while the loss is log C) is compared against a noise of
``eps F / h`` that does not shrink with it. The bound is a worst case
(typical errors are ``sqrt``-smaller), yet tight enough to catch a wrong
gradient: ``gamma eps / h`` is about 4e-9 for ``h = 1e-6`` (4e-10 for
``h = 1e-5``), while a missing term or a wrong factor is off by a fraction of
the gradient itself (``tests/test_properties.py`` checks that it is caught).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from nnfast.backends import backend_for

EPS = float(np.finfo(np.float64).eps)
RTOL = 1e-8
_REF = backend_for("numpy")

# max |sigma'''| of the activations with alpha <= 1: tanh reaches 2 at 0; sigmoid 1/8, softplus
# 1/(6 sqrt 3), GELU 0.78, SiLU 0.31, ELU alpha (x < 0); ReLU-like ones 0 away from the kink.
_ACT_THIRD = 2.0
# max |sigma'| likewise: GELU 1.13, SiLU 1.10, the rest 1 (leaky ReLU and ELU: max(1, alpha)).
_ACT_FIRST = 1.2
# max over p of |d^3 logsumexp / dz_k^3| = |p (1 - p) (1 - 2p)|, reached at p = (3 -+ sqrt 3) / 6.
_LSE_THIRD = 1.0 / (6.0 * math.sqrt(3.0))


def central_difference(f: Callable[[dict[str, np.ndarray]], float], arrays: dict[str, np.ndarray],
                       name: str, index: tuple[int, ...], h: float) -> float:
    """``d f / d arrays[name][index]`` by a central difference over the step actually taken."""
    x = float(arrays[name][index])
    values, points = [], []
    for sign in (1.0, -1.0):
        moved = dict(arrays)
        moved[name] = arrays[name].copy()
        moved[name][index] = x + sign * h
        points.append(float(moved[name][index]))
        values.append(f(moved))
    return (values[0] - values[1]) / (points[0] - points[1])


def tolerance(analytic: float, value_scale: float, third: float, h: float, terms: int) -> float:
    """The module docstring's bound: truncation + rounding floor + relative slack."""
    gamma = 8.0 + math.log2(max(terms, 2))
    return third * h * h / 6.0 + gamma * EPS * value_scale / h + RTOL * abs(analytic)


def value_bounds(kind: str, arrays: dict[str, np.ndarray], options: dict[str, Any]
                 ) -> tuple[float, dict[str, np.ndarray]]:
    """``(F, {input: M3 per element})`` for the scalar the op table differentiates.

    ``kind`` is ``"activation"`` (``sum(act(x) * dy)``), ``"linear"``
    (``sum(act(x @ W + b) * dy)``) or ``"softmax_cross_entropy"`` (the loss;
    with ``reduction="none"``, ``sum(loss * dloss)``).
    """
    alpha = options.get("alpha")
    slope = max(1.0, alpha or 0.0)  # leaky ReLU's slope, ELU's alpha scale sigma' and sigma'''
    if kind == "activation":
        x, dy = arrays["x"], np.abs(arrays["dy"])
        y = _REF.activation_forward(x, options["activation"], alpha)
        return float(np.sum(dy * (np.abs(x) + np.abs(y)))), {"x": _ACT_THIRD * slope * dy}
    if kind == "linear":
        x, W, b, dy = arrays["x"], arrays["W"], arrays.get("b"), np.abs(arrays["dy"])
        y, _ = _REF.linear_forward(x, W, b, options["activation"], alpha)
        pre = np.abs(x) @ np.abs(W) + (0.0 if b is None else np.abs(b))
        scale = float(np.sum(dy * (np.abs(y) + _ACT_FIRST * slope * pre)))
        # d^3 f / dx_bk^3 = sum_j dy_bj sigma'''(z_bj) W_kj^3, and likewise for W and b.
        k3 = _ACT_THIRD * slope
        thirds = {"x": k3 * dy @ np.abs(W).T ** 3, "W": k3 * (np.abs(x) ** 3).T @ dy}
        if b is not None:
            thirds["b"] = k3 * dy.sum(axis=0)
        return scale, thirds
    if kind == "softmax_cross_entropy":
        logits, labels = arrays["logits"], arrays["labels"]
        kept = labels != options.get("ignore_index", -100)
        per_row = {k: v for k, v in options.items() if k != "reduction"}
        loss_rows, _ = _REF.softmax_cross_entropy(logits, labels, reduction="none", **per_row)
        reduction = options.get("reduction", "mean")
        if reduction == "none":
            weights = np.abs(arrays["dloss"])
        else:
            weights = np.full(len(labels), 1.0 / max(int(kept.sum()), 1) if reduction == "mean" else 1.0)
        weights = np.where(kept, weights, 0.0)
        # Intermediates per row: the logits, logsumexp <= max|z| + log C, log-probabilities, the loss.
        magnitude = 2 * np.abs(logits).max(axis=1) + math.log(logits.shape[1]) + np.abs(loss_rows)
        return float(np.sum(weights * magnitude)), {
            "logits": np.broadcast_to((_LSE_THIRD * weights)[:, None], logits.shape)}
    raise ValueError(f"kind: expected 'activation', 'linear' or 'softmax_cross_entropy', got {kind!r}")


def check_element(f: Callable[[dict[str, np.ndarray]], float], arrays: dict[str, np.ndarray], name: str,
                  index: tuple[int, ...], analytic: float, bounds: tuple[float, dict[str, np.ndarray]],
                  h: float) -> None:
    """Assert that ``analytic`` is ``d f / d arrays[name][index]`` within :func:`tolerance`."""
    value_scale, thirds = bounds
    numeric = central_difference(f, arrays, name, index, h)
    terms = sum(a.size for a in arrays.values())
    tol = tolerance(analytic, value_scale, float(thirds[name][index]), h, terms)
    assert abs(numeric - analytic) <= tol, (
        f"d/d{name}{tuple(int(i) for i in index)}: analytic {analytic!r}, numeric {numeric!r}, "
        f"|difference| {abs(numeric - analytic):.3g} > bound {tol:.3g} (value scale {value_scale:.3g}, h {h})")
