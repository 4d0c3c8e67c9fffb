"""Scalar math shared by the kernels: dtype-specialised exp/erf and every activation.

float64 uses the C library (``math.exp``, ``math.erf``, ...), so results
match the NumPy reference to rounding. LLVM cannot vectorise those libm calls
here (no SVML), which would leave the float32 element-wise kernels at
~10 ns per element; so float32 gets branch-free polynomial versions that
LLVM inlines and vectorises to AVX2:

* :func:`fexp` float32: Cody-Waite range reduction ``x = n ln2 + r``, the
  Cephes ``expf`` degree-6 polynomial for ``e^r``, and ``2^n`` built from its
  bits (``(n + 127) * 2^23`` as an int32). Max relative error ~2 ulp for ``-87 <= x <= 88``;
  inputs below -87 give 0 (the true value is < 2e-38), inputs above 88.3 are
  clamped (the kernels only take exp of arguments <= 0 or of ``min(x, 20)``).
* :func:`ftanh` float32: the Cephes ``tanhf`` odd polynomial for
  ``|x| < 0.625``, ``1 - 2 / (e^{2|x|} + 1)`` above (absolute error ~1e-7).
* :func:`ferf` float32: the odd/even rational approximation used by Eigen
  (``x P(x^2) / Q(x^2)`` on ``[-4, 4]``, +/-1 outside), absolute error < 2e-7
  and no exp at all.
* :func:`gelu_grad` float32: ``Phi(x) + x phi(x)`` with Abramowitz & Stegun
  7.1.26 for ``Phi``, which reuses the ``exp(-x^2 / 2)`` of ``phi`` (one
  exp per element; absolute error < 2e-7).

All stay well inside the float32 tolerance (rtol 1e-4, atol 1e-5). The
overloads pick the implementation while typing, so one kernel source serves
both dtypes with no run-time branch. The float32 helpers are compiled with
``fastmath={"contract"}`` only (multiply-adds fused into FMAs: one rounding
instead of two, never less accurate).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ...activations import CODES as ACTIVATION_CODES
from ._simd import f32_from_bits

# Activation codes (base.ACTIVATION_CODES), as compile-time constants.
IDENTITY = ACTIVATION_CODES["identity"]
RELU = ACTIVATION_CODES["relu"]
LEAKY_RELU = ACTIVATION_CODES["leaky_relu"]
SIGMOID = ACTIVATION_CODES["sigmoid"]
TANH = ACTIVATION_CODES["tanh"]
GELU = ACTIVATION_CODES["gelu"]
GELU_TANH = ACTIVATION_CODES["gelu_tanh"]
SILU = ACTIVATION_CODES["silu"]
SOFTPLUS = ACTIVATION_CODES["softplus"]
ELU = ACTIVATION_CODES["elu"]

_f = np.float32
_EXP_HI = _f(88.3)
_EXP_LO = _f(-87.0)
_LOG2E = _f(1.44269504088896341)
_LN2_HI = _f(0.693359375)
_LN2_LO = _f(-2.12194440e-4)
_P0 = _f(1.9875691500e-4)
_P1 = _f(1.3981999507e-3)
_P2 = _f(8.3334519073e-3)
_P3 = _f(4.1665795894e-2)
_P4 = _f(1.6666665459e-1)
_P5 = _f(5.0000001201e-1)
_HALF32 = _f(0.5)
_ONE32 = _f(1.0)
_ZERO32 = _f(0.0)
_BIAS32 = _f(127.0)
_TWO32 = _f(2.0)
_TANH_SMALL = _f(0.625)
_TANH_BIG = _f(40.0)
_T0, _T1, _T2 = _f(-5.70498872745e-3), _f(2.06390887954e-2), _f(-5.37397155531e-2)
_T3, _T4 = _f(1.33314422036e-1), _f(-3.33332819422e-1)
_MANT32 = _f(8388608.0)

_ERF_CLAMP = _f(4.0)
_A1, _A3 = _f(-1.60960333262415e-02), _f(-2.95459980854025e-03)
_A5, _A7 = _f(-7.34990630326855e-04), _f(-5.69250639462346e-05)
_A9, _A11, _A13 = _f(-2.10102402082508e-06), _f(2.77068142495902e-08), _f(-2.72614225801306e-10)
_B0, _B2, _B4 = _f(-1.42647390514189e-02), _f(-7.37332916720468e-03), _f(-1.68282697438203e-03)
_B6, _B8 = _f(-2.13374055278905e-04), _f(-1.45660718464996e-05)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _exp32(x):
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + _HALF32)
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _P0 * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    y = p * (r * r) + r + _ONE32
    # 2^n from its bit pattern; (n + 127) * 2^23 stays in int32 end to end
    # (an int64 shift would halve the vector width).
    y = y * f32_from_bits(np.int32((n + _BIAS32) * _MANT32))
    # Underflow to 0 below -87; a NaN input stays NaN (x <= LO is false for NaN).
    return y if x > _EXP_LO else (_ZERO32 if x <= _EXP_LO else x)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _erf32(x):
    xc = min(max(x, -_ERF_CLAMP), _ERF_CLAMP)
    x2 = xc * xc
    p = _A13 * x2 + _A11
    p = p * x2 + _A9
    p = p * x2 + _A7
    p = p * x2 + _A5
    p = p * x2 + _A3
    p = p * x2 + _A1
    q = _B8 * x2 + _B6
    q = q * x2 + _B4
    q = q * x2 + _B2
    q = q * x2 + _B0
    return xc * p / q


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _tanh32(x):
    # Cephes tanhf: an odd polynomial below 0.625, 1 - 2 / (e^{2|x|} + 1) above.
    a = abs(x)
    z = x * x
    p = _T0 * z + _T1
    p = p * z + _T2
    p = p * z + _T3
    p = p * z + _T4
    small = x + x * z * p
    big = _ONE32 - _TWO32 / (_exp32(min(a + a, _TANH_BIG)) + _ONE32)
    big = big if x >= _ZERO32 else -big
    return small if a < _TANH_SMALL else big


def fexp(x):
    """``e^x`` in the dtype of ``x`` (polynomial for float32, libm for float64)."""
    return math.exp(x)


def ferf(x):
    """``erf(x)`` in the dtype of ``x`` (rational approximation for float32, libm for float64)."""
    return math.erf(x)


@overload(fexp)
def _fexp_impl(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


def ftanh(x):
    """``tanh(x)`` in the dtype of ``x`` (Cephes polynomial / exp form for float32, libm for float64)."""
    return math.tanh(x)


@overload(ftanh)
def _ftanh_impl(x):
    if x == types.float32:
        return lambda x: _tanh32(x)
    return lambda x: math.tanh(x)


@overload(ferf)
def _ferf_impl(x):
    if x == types.float32:
        return lambda x: _erf32(x)
    return lambda x: math.erf(x)


def like(x, value):
    """``value`` as a constant of ``x``'s dtype (a bare Python float would promote
    float32 arithmetic to float64)."""
    return value


@overload(like)
def _like_impl(x, value):
    if x == types.float32:
        return lambda x, value: np.float32(value)
    return lambda x, value: np.float64(value)


# ------------------------------------------------------------ activations
# One small function per activation and direction; the element-wise kernels
# call them from a loop specialised per activation so that LLVM inlines and
# vectorises each loop separately. Constants go through :func:`like` so that
# float32 stays float32.

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_SOFTPLUS_THRESHOLD = 20.0


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def sigmoid(x):
    one = like(x, 1.0)
    e = fexp(-abs(x))
    r = one / (one + e)
    return r if x >= 0 else e * r


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def gelu_fwd(x):
    return like(x, 0.5) * x * (like(x, 1.0) + ferf(x * like(x, _SQRT1_2)))


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _gelu_grad_exact(x):
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


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _gelu_grad32(x):
    e = _exp32(_F_MHALF * x * x)
    t = _ONE32 / (_ONE32 + _AS_P * _F_SQRT1_2 * abs(x))
    p = _AS_A5 * t + _AS_A4
    p = p * t + _AS_A3
    p = p * t + _AS_A2
    p = p * t + _AS_A1
    tail = _HALF32 * (t * p) * e  # Phi(-|x|) = erfc(|x| / sqrt 2) / 2
    cdf = _ONE32 - tail if x >= _ZERO32 else tail
    return cdf + x * (_F_INV_SQRT_2PI * e)


def gelu_grad(x):
    """d gelu / dx = Phi(x) + x phi(x) (one-exp A&S form for float32, libm for float64)."""
    return _gelu_grad_exact(x)


@overload(gelu_grad)
def _gelu_grad_impl(x):
    if x == types.float32:
        return lambda x: _gelu_grad32(x)
    return lambda x: _gelu_grad_exact(x)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def gelu_tanh_fwd(x):
    inner = like(x, _SQRT_2_OVER_PI) * (x + like(x, _GELU_TANH_C) * x * x * x)
    return like(x, 0.5) * x * (like(x, 1.0) + ftanh(inner))


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def gelu_tanh_grad(x):
    # As the reference: beyond |x| = 10 the derivative is exactly 0 or 1;
    # clipping keeps x * (1 - t * t) from becoming inf * 0 = NaN.
    x = min(max(x, like(x, -10.0)), like(x, 10.0))
    one = like(x, 1.0)
    inner = like(x, _SQRT_2_OVER_PI) * (x + like(x, _GELU_TANH_C) * x * x * x)
    th = ftanh(inner)
    d_inner = like(x, _SQRT_2_OVER_PI) * (one + like(x, 3.0 * _GELU_TANH_C) * x * x)
    return like(x, 0.5) * (one + th) + like(x, 0.5) * x * (one - th * th) * d_inner


@njit(cache=True, error_model="numpy")
def softplus_fwd(x):
    thr = like(x, _SOFTPLUS_THRESHOLD)
    return x if x > thr else math.log1p(fexp(min(x, thr)))


@njit(cache=True, error_model="numpy")
def softplus_grad(x):
    return like(x, 1.0) if x > like(x, _SOFTPLUS_THRESHOLD) else sigmoid(x)


@njit(cache=True, error_model="numpy")
def elu_fwd(x, alpha):
    t = like(x, 0.0)
    return x if x > t else alpha * math.expm1(min(x, t))
