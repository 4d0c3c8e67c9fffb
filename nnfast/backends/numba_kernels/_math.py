"""Scalar math shared by the kernels: dtype-specialised exp, erf, tanh and the sigmoid.

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

from ._simd import f32_from_bits

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


# ------------------------------------------------------------ sigmoid
@njit(cache=True, error_model="numpy", fastmath={"contract"})
def sigmoid(x):
    one = like(x, 1.0)
    e = fexp(-abs(x))
    r = one / (one + e)
    return r if x >= 0 else e * r
