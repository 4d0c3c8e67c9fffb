"""The activations of the Numba kernels: one scalar formula pair per row of the activation table.

Each activation ``name`` of :mod:`nnfast.activations` has two functions here,
``<name>_forward(x, alpha)`` and ``<name>_derivative(saved, alpha)`` (the
derivative from the input or the output, as the row says). They are small
``@njit`` scalar functions: the kernels of :mod:`.activations` call them
from a loop compiled for one activation and dtype, where LLVM inlines them
and vectorises the loop. (Numba's own ``inline="always"`` would inline them
before typing instead, and lose their ``fastmath={"contract"}``: multiply-adds
fused into FMAs, one rounding instead of two.)

float32 uses the polynomial exp / erf / tanh of :mod:`._math`, which LLVM can
vectorise; float64 the C library. Constants go through :func:`._math.like`
so that float32 stays float32. The formulas match the NumPy reference
(``backends/reference_activations.py``) within the float32 tolerance
(rtol 1e-4, atol 1e-5) and to rounding in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ...activations import CODES, formulas
from ._math import _HALF32, _ONE32, _ZERO32, _exp32, fexp, ferf, ftanh, like, sigmoid

_f = np.float32
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_SOFTPLUS_THRESHOLD = 20.0

_jit = njit(cache=True, error_model="numpy", fastmath={"contract"})


# ------------------------------------------------------------ identity
@_jit
def identity_forward(x, alpha):
    return x


@_jit
def identity_derivative(y, alpha):
    return like(y, 1.0)


# ------------------------------------------------------------ relu (derivative from the output)
@_jit
def relu_forward(x, alpha):
    z = like(x, 0.0)
    return z if x < z else x  # NaN passes through, as with numpy.maximum


@_jit
def relu_derivative(y, alpha):
    return like(y, 1.0) if y > like(y, 0.0) else like(y, 0.0)


# ------------------------------------------------------------ leaky_relu (from the output)
@_jit
def leaky_relu_forward(x, alpha):
    return x if x > like(x, 0.0) else alpha * x


@_jit
def leaky_relu_derivative(y, alpha):  # a slope >= 0 keeps the sign of x
    return like(y, 1.0) if y > like(y, 0.0) else alpha


# ------------------------------------------------------------ sigmoid (from the output)
@_jit
def sigmoid_forward(x, alpha):
    return sigmoid(x)


@_jit
def sigmoid_derivative(y, alpha):
    return y * (like(y, 1.0) - y)


# ------------------------------------------------------------ tanh (from the output)
@_jit
def tanh_forward(x, alpha):
    return ftanh(x)


@_jit
def tanh_derivative(y, alpha):
    return like(y, 1.0) - y * y


# ------------------------------------------------------------ gelu (from the input)
@_jit
def gelu_forward(x, alpha):
    return like(x, 0.5) * x * (like(x, 1.0) + ferf(x * like(x, _SQRT1_2)))


@_jit
def _gelu_derivative_exact(x):
    cdf = like(x, 0.5) * (like(x, 1.0) + ferf(x * like(x, _SQRT1_2)))
    pdf = like(x, _INV_SQRT_2PI) * fexp(like(x, -0.5) * x * x)
    return cdf + x * pdf


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t P(t) e^{-z^2}, t = 1 / (1 + p z),
# |error| < 1.5e-7. With z = x / sqrt(2), e^{-z^2} is the exp the normal pdf
# needs anyway, so the float32 GELU derivative costs one exp, not exp + erf.
_AS_P = _f(0.3275911)
_AS_A1, _AS_A2, _AS_A3 = _f(0.254829592), _f(-0.284496736), _f(1.421413741)
_AS_A4, _AS_A5 = _f(-1.453152027), _f(1.061405429)
_F_SQRT1_2 = _f(1.0 / math.sqrt(2.0))
_F_INV_SQRT_2PI = _f(1.0 / math.sqrt(2.0 * math.pi))
_F_MHALF = _f(-0.5)


@_jit
def _gelu_derivative32(x):
    e = _exp32(_F_MHALF * x * x)
    t = _ONE32 / (_ONE32 + _AS_P * _F_SQRT1_2 * abs(x))
    p = _AS_A5 * t + _AS_A4
    p = p * t + _AS_A3
    p = p * t + _AS_A2
    p = p * t + _AS_A1
    tail = _HALF32 * (t * p) * e  # Phi(-|x|) = erfc(|x| / sqrt 2) / 2
    cdf = _ONE32 - tail if x >= _ZERO32 else tail
    return cdf + x * (_F_INV_SQRT_2PI * e)


def gelu_derivative(x, alpha):
    """Phi(x) + x phi(x) (the one-exp A&S form for float32, libm for float64)."""
    return _gelu_derivative_exact(x)


@overload(gelu_derivative)
def _gelu_derivative_impl(x, alpha):
    if x == types.float32:
        return lambda x, alpha: _gelu_derivative32(x)
    return lambda x, alpha: _gelu_derivative_exact(x)


# ------------------------------------------------------------ gelu_tanh (from the input)
@_jit
def gelu_tanh_forward(x, alpha):
    inner = like(x, _SQRT_2_OVER_PI) * (x + like(x, _GELU_TANH_C) * x * x * x)
    return like(x, 0.5) * x * (like(x, 1.0) + ftanh(inner))


@_jit
def gelu_tanh_derivative(x, alpha):
    # As the reference: beyond |x| = 10 the derivative is exactly 0 or 1;
    # clipping keeps x * (1 - t * t) from becoming inf * 0 = NaN.
    x = min(max(x, like(x, -10.0)), like(x, 10.0))
    one = like(x, 1.0)
    inner = like(x, _SQRT_2_OVER_PI) * (x + like(x, _GELU_TANH_C) * x * x * x)
    th = ftanh(inner)
    d_inner = like(x, _SQRT_2_OVER_PI) * (one + like(x, 3.0 * _GELU_TANH_C) * x * x)
    return like(x, 0.5) * (one + th) + like(x, 0.5) * x * (one - th * th) * d_inner


# ------------------------------------------------------------ silu (from the input)
@_jit
def silu_forward(x, alpha):
    return x * sigmoid(x)


@_jit
def silu_derivative(x, alpha):
    s = sigmoid(x)
    return s * (like(x, 1.0) + x * (like(x, 1.0) - s))


# ------------------------------------------------------------ softplus (from the input)
@_jit
def softplus_forward(x, alpha):
    thr = like(x, _SOFTPLUS_THRESHOLD)
    return x if x > thr else math.log1p(fexp(min(x, thr)))


@_jit
def softplus_derivative(x, alpha):
    return like(x, 1.0) if x > like(x, _SOFTPLUS_THRESHOLD) else sigmoid(x)


# ------------------------------------------------------------ elu (from the output)
@_jit
def elu_forward(x, alpha):
    z = like(x, 0.0)
    return x if x > z else alpha * math.expm1(min(x, z))


@_jit
def elu_derivative(y, alpha):  # for x <= 0, alpha * e^x = y + alpha
    return like(y, 1.0) if y > like(y, 0.0) else y + alpha


# ------------------------------------------------------------ mish (from the input)
# tanh(softplus(x)) = tanh(log(1 + n)) = n (n + 2) / (n (n + 2) + 2) with n = e^x:
# one exp and one division, no log or tanh (which LLVM cannot vectorise), and
# sigmoid(x) = n / (1 + n) from the same exp. Above 20 the ratio is exactly 1
# in both dtypes, so clamping the exponent there changes nothing and keeps w
# finite.
@_jit
def _mish_terms(x):
    n = fexp(min(x, like(x, _SOFTPLUS_THRESHOLD)))
    w = n * (n + like(x, 2.0))
    return w / (w + like(x, 2.0)), n / (like(x, 1.0) + n)


@_jit
def mish_forward(x, alpha):
    t, _ = _mish_terms(x)
    return x * t


@_jit
def mish_derivative(x, alpha):
    t, s = _mish_terms(x)
    return t + x * s * (like(x, 1.0) - t * t)


# ------------------------------------------------------------ hardswish (from the input)
@_jit
def hardswish_forward(x, alpha):  # x * relu6(x + 3) / 6, divided first: no overflow near the float maximum
    return x * (min(max(x + like(x, 3.0), like(x, 0.0)), like(x, 6.0)) / like(x, 6.0))


@_jit
def hardswish_derivative(x, alpha):  # PyTorch's: 0 up to -3, x / 3 + 1/2 strictly between, 1 from 3 on
    if x <= like(x, -3.0):
        return like(x, 0.0)
    return x / like(x, 3.0) + like(x, 0.5) if x < like(x, 3.0) else like(x, 1.0)


# ------------------------------------------------------------ lookup by code
#: ``code -> forward(x, alpha)`` and ``code -> derivative(saved, alpha)`` for every activation of the table.
FORWARD = {CODES[name]: f for name, f in formulas(globals(), "forward", __name__).items()}
DERIVATIVE = {CODES[name]: f for name, f in formulas(globals(), "derivative", __name__).items()}


def forward(code, x, alpha):
    """The forward formula of the activation ``code`` (a compile-time constant in the kernels)."""
    raise NotImplementedError("only callable from compiled code")


def derivative(code, saved, alpha):
    """The derivative formula of the activation ``code`` (a compile-time constant in the kernels)."""
    raise NotImplementedError("only callable from compiled code")


@overload(forward)
def _forward_impl(code, x, alpha):
    if isinstance(code, types.IntegerLiteral):
        formula = FORWARD[code.literal_value]
        return lambda code, x, alpha: formula(x, alpha)
    return None  # a literal code is needed: each activation compiles its own loop


@overload(derivative)
def _derivative_impl(code, saved, alpha):
    if isinstance(code, types.IntegerLiteral):
        formula = DERIVATIVE[code.literal_value]
        return lambda code, saved, alpha: formula(saved, alpha)
    return None
