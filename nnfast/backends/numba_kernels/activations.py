"""Element-wise activation kernels, forward and backward, for every activation.

One read and one write per element (forward: ``x -> y``; backward: ``dy,
saved -> dx``). Each activation has its own loop so LLVM inlines the scalar
formula from :mod:`._math` and vectorises the loop; float32 uses the
polynomial exp/erf there (that is what makes erf-GELU vectorisable), float64
the C library. Arrays are split into chunks of :data:`CHUNK` elements run in
parallel (``prange``); arrays under :data:`PARALLEL_MIN` run serially, where a
thread launch would cost more than the work. No ``fastmath``: there are no
reductions to reassociate, and results stay bit-comparable for float64.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._math import (ELU, GELU, GELU_TANH, LEAKY_RELU, RELU, SIGMOID, SILU, SOFTPLUS,
                    TANH, elu_fwd, gelu_fwd, gelu_grad, gelu_tanh_fwd, gelu_tanh_grad,
                    ftanh, like, sigmoid, softplus_fwd, softplus_grad)

#: Elements per parallel work item (a multiple of every vector width).
CHUNK = 1 << 15
#: Below this many elements the kernels run on the calling thread.
PARALLEL_MIN = 1 << 16


@njit(cache=True, error_model="numpy")
def forward_range(x, y, lo, hi, code, alpha):
    """``y[lo:hi] = act(x[lo:hi])`` on flat arrays."""
    # Slicing first makes every index provably >= 0 (no negative-index
    # wrap-around code in the loop), and every load goes into a local before
    # a conditional: both are needed for LLVM to vectorise the loops.
    x = x[lo:hi]
    y = y[lo:hi]
    lo = 0
    hi = x.size
    a = like(x[0], alpha)
    z = like(x[0], 0.0)
    if code == RELU:
        for i in range(lo, hi):
            v = x[i]
            y[i] = z if v < z else v
    elif code == LEAKY_RELU:
        for i in range(lo, hi):
            v = x[i]
            y[i] = v if v > z else a * v
    elif code == SIGMOID:
        for i in range(lo, hi):
            y[i] = sigmoid(x[i])
    elif code == TANH:
        for i in range(lo, hi):
            y[i] = ftanh(x[i])
    elif code == GELU:
        for i in range(lo, hi):
            y[i] = gelu_fwd(x[i])
    elif code == GELU_TANH:
        for i in range(lo, hi):
            y[i] = gelu_tanh_fwd(x[i])
    elif code == SILU:
        for i in range(lo, hi):
            v = x[i]
            y[i] = v * sigmoid(v)
    elif code == SOFTPLUS:
        for i in range(lo, hi):
            y[i] = softplus_fwd(x[i])
    elif code == ELU:
        for i in range(lo, hi):
            y[i] = elu_fwd(x[i], a)
    else:
        for i in range(lo, hi):
            y[i] = x[i]


@njit(cache=True, error_model="numpy")
def backward_range(dy, s, dx, lo, hi, code, alpha):
    """``dx[lo:hi] = dy * act'(saved)`` on flat arrays."""
    dy = dy[lo:hi]
    s = s[lo:hi]
    dx = dx[lo:hi]
    lo = 0
    hi = dy.size
    a = like(s[0], alpha)
    z = like(s[0], 0.0)
    one = like(s[0], 1.0)
    if code == RELU:
        for i in range(lo, hi):
            d = dy[i]
            dx[i] = d if s[i] > z else z
    elif code == LEAKY_RELU:
        for i in range(lo, hi):
            d = dy[i]
            dx[i] = d if s[i] > z else a * d
    elif code == SIGMOID:
        for i in range(lo, hi):
            v = s[i]
            dx[i] = dy[i] * (v * (one - v))
    elif code == TANH:
        for i in range(lo, hi):
            v = s[i]
            dx[i] = dy[i] * (one - v * v)
    elif code == GELU:
        for i in range(lo, hi):
            dx[i] = dy[i] * gelu_grad(s[i])
    elif code == GELU_TANH:
        for i in range(lo, hi):
            dx[i] = dy[i] * gelu_tanh_grad(s[i])
    elif code == SILU:
        for i in range(lo, hi):
            v = s[i]
            sg = sigmoid(v)
            dx[i] = dy[i] * (sg * (one + v * (one - sg)))
    elif code == SOFTPLUS:
        for i in range(lo, hi):
            dx[i] = dy[i] * softplus_grad(s[i])
    elif code == ELU:
        for i in range(lo, hi):
            v = s[i]
            d = dy[i]
            dx[i] = d if v > z else d * (v + a)
    else:
        for i in range(lo, hi):
            dx[i] = dy[i]


@njit(parallel=True, cache=True, error_model="numpy")
def _forward_parallel(x, y, code, alpha):
    n = x.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        forward_range(x, y, c * CHUNK, min(n, (c + 1) * CHUNK), code, alpha)


@njit(parallel=True, cache=True, error_model="numpy")
def _backward_parallel(dy, s, dx, code, alpha):
    n = dy.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        backward_range(dy, s, dx, c * CHUNK, min(n, (c + 1) * CHUNK), code, alpha)


def forward(x: np.ndarray, code: int, alpha: float) -> np.ndarray:
    """``act(x)`` as a new array; ``x`` must be C-contiguous."""
    y = np.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    if xf.size >= PARALLEL_MIN:
        _forward_parallel(xf, yf, code, alpha)
    else:
        forward_range(xf, yf, 0, xf.size, code, alpha)
    return y


def backward(dy: np.ndarray, saved: np.ndarray, code: int, alpha: float) -> np.ndarray:
    """``dy * act'(saved)`` as a new array; both C-contiguous, same shape."""
    dx = np.empty_like(dy)
    d, s, o = dy.reshape(-1), saved.reshape(-1), dx.reshape(-1)
    if d.size >= PARALLEL_MIN:
        _backward_parallel(d, s, o, code, alpha)
    else:
        backward_range(d, s, o, 0, d.size, code, alpha)
    return dx
