"""The activations of the reference: the textbook formula of every row of the activation table.

Each activation ``name`` of :mod:`nnfast.activations` has two functions here,
``<name>_forward(xp, x, alpha)`` and ``<name>_derivative(xp, saved, alpha)``,
written against the array module ``xp`` (NumPy, or CuPy for a backend that
runs the reference on the GPU), PyTorch's definitions, stable and exact in
float64: the oracle every kernel is tested against, itself tested against
finite differences. ``saved`` is the input or the output, as the row's
``derivative_from`` says.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..activations import formulas

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_SOFTPLUS_THRESHOLD = 20.0

# NumPy has no vectorised erf; the C library's, applied element-wise, is exact.
_erf_object = np.frompyfunc(math.erf, 1, 1)


def erf(xp: Any, x: Any) -> Any:
    """The error function, element-wise, in the dtype of ``x``."""
    if xp is np:
        return _erf_object(x.astype(np.float64)).astype(x.dtype)
    from cupyx.scipy.special import erf as device_erf

    return device_erf(x)


def sigmoid(xp: Any, x: Any) -> Any:
    """Logistic sigmoid without overflow: exp is only taken of -|x|."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def softplus(xp: Any, x: Any) -> Any:
    """log(1 + e^x), linear above the threshold like PyTorch."""
    return xp.where(x > _SOFTPLUS_THRESHOLD, x, xp.log1p(xp.exp(xp.minimum(x, _SOFTPLUS_THRESHOLD))))


def _one(saved: Any) -> Any:
    return saved.dtype.type(1)


# ------------------------------------------------------------------ the formulas
def identity_forward(xp, x, alpha):
    return x.copy()


def identity_derivative(xp, y, alpha):
    return xp.ones_like(y)


def relu_forward(xp, x, alpha):
    return xp.maximum(x, 0)


def relu_derivative(xp, y, alpha):  # y > 0 exactly where x > 0
    return (y > 0).astype(y.dtype)


def leaky_relu_forward(xp, x, alpha):
    return xp.where(x > 0, x, alpha * x).astype(x.dtype)


def leaky_relu_derivative(xp, y, alpha):  # a slope >= 0 keeps the sign of x
    return xp.where(y > 0, _one(y), y.dtype.type(alpha))


def sigmoid_forward(xp, x, alpha):
    return sigmoid(xp, x)


def sigmoid_derivative(xp, y, alpha):
    return y * (_one(y) - y)


def tanh_forward(xp, x, alpha):
    return xp.tanh(x)


def tanh_derivative(xp, y, alpha):
    return _one(y) - y * y


def gelu_forward(xp, x, alpha):  # x * Phi(x), Phi the standard normal CDF
    return (0.5 * x * (1.0 + erf(xp, x / _SQRT_2))).astype(x.dtype)


def gelu_derivative(xp, x, alpha):  # Phi(x) + x * phi(x)
    cdf = 0.5 * (1.0 + erf(xp, x / _SQRT_2))
    pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return (cdf + x * pdf).astype(x.dtype)


def _gelu_tanh_inner(x: Any) -> Any:
    """u = sqrt(2 / pi) * (x + 0.044715 x^3), the argument of tanh in the tanh GELU."""
    with np.errstate(over="ignore"):  # x^3 overflows to +-inf for huge |x|: sigmoid(+-inf) is exact
        return _SQRT_2_OVER_PI * (x + _GELU_TANH_C * x**3)


def gelu_tanh_forward(xp, x, alpha):  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), without cancellation
    return (x * sigmoid(xp, 2.0 * _gelu_tanh_inner(x))).astype(x.dtype)


def gelu_tanh_derivative(xp, x, alpha):
    # With s = sigmoid(2u) = (1 + tanh u) / 2 and sech^2 u = 4 s (1 - s):
    # d/dx = s + x * 2 s (1 - s) * du/dx, free of the cancellation in 1 + tanh u.
    # Beyond |x| = 10 the derivative is exactly 1 or 0 in both dtypes; clipping
    # keeps x * x from overflowing into inf * 0 = NaN.
    x = xp.clip(x, -10.0, 10.0)
    s = sigmoid(xp, 2.0 * _gelu_tanh_inner(x))
    d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)
    return (s + 2.0 * x * s * (1.0 - s) * d_inner).astype(x.dtype)


def silu_forward(xp, x, alpha):
    return x * sigmoid(xp, x)


def silu_derivative(xp, x, alpha):  # s(x) * (1 + x * (1 - s(x)))
    s = sigmoid(xp, x)
    return s * (_one(x) + x * (_one(x) - s))


def softplus_forward(xp, x, alpha):
    return softplus(xp, x)


def softplus_derivative(xp, x, alpha):  # sigmoid(x), 1 above the threshold
    return xp.where(x > _SOFTPLUS_THRESHOLD, _one(x), sigmoid(xp, x))


def elu_forward(xp, x, alpha):
    return xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0))).astype(x.dtype)


def elu_derivative(xp, y, alpha):  # for x <= 0, alpha * e^x = y + alpha
    return xp.where(y > 0, _one(y), y + y.dtype.type(alpha))


def mish_forward(xp, x, alpha):
    return x * xp.tanh(softplus(xp, x))


def mish_derivative(xp, x, alpha):  # t + x * sigmoid(x) * (1 - t^2), t = tanh(softplus(x))
    t = xp.tanh(softplus(xp, x))
    return t + x * sigmoid(xp, x) * (_one(x) - t * t)


def hardswish_forward(xp, x, alpha):  # x * relu6(x + 3) / 6, divided first: no overflow near the float maximum
    return x * (xp.clip(x + 3, 0, 6) / 6)


def hardswish_derivative(xp, x, alpha):  # PyTorch's: 0 up to -3, x / 3 + 1/2 strictly between, 1 from 3 on
    return xp.where(x <= -3, 0, xp.where(x < 3, x / 3 + 0.5, 1)).astype(x.dtype)


# ------------------------------------------------------------------ lookup
#: ``name -> forward(xp, x, alpha)`` for every activation of the table.
FORWARD = formulas(globals(), "forward", __name__)
#: ``name -> derivative(xp, saved, alpha)`` for every activation of the table.
DERIVATIVE = formulas(globals(), "derivative", __name__)
