"""Element-wise activation kernels, one compiled loop per activation and dtype, made from the table.

For each row of the activation table and each dtype, two loops are compiled
on first use (and cached on disk like every kernel here):

* forward ``y[i] = act(x[i])``;
* backward ``dx[i] = dy[i] * act'(saved[i])``;

from the row's formulas in :mod:`.activation_math`, so a run compiles only
the activations and dtypes it uses, and a new row of the table gets its
kernels with nothing to add here. Each loop is one read and one write per
element, with the formula inlined and the loop vectorised by LLVM (float32
uses the polynomial exp/erf/tanh of :mod:`._math`, which is what makes
erf-GELU vectorisable). No ``fastmath`` on the loops: there are no
reductions to reassociate, and results stay bit-comparable for float64.

The loops are C-callable (``numba.cfunc``) and called through their
addresses (:mod:`._calls`): by two drivers per dtype for the activation ops
(serial below :data:`PARALLEL_MIN` elements, where a thread launch would cost
more than the work, else in parallel over chunks of :data:`CHUNK`), by the
GEMM epilogue and by the linear backward.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import carray, cfunc, njit, prange, types

from ...activations import CODES
from ._calls import call_backward, call_forward, ptr_at
from ._simd import addr
from .activation_math import derivative as formula_derivative
from .activation_math import forward as formula_forward

#: Elements per parallel work item (a multiple of every vector width).
CHUNK = 1 << 15
#: Below this many elements the kernels run on the calling thread.
PARALLEL_MIN = 1 << 16

_TYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}


def _forward_loop(code: int, T: types.Float, cache: bool = True):
    @cfunc(types.void(types.CPointer(T), types.CPointer(T), types.int64, T), cache=cache, error_model="numpy")
    def loop(x, y, n, alpha):
        xs = carray(x, n)
        ys = carray(y, n)
        for i in range(n):
            v = xs[i]
            ys[i] = formula_forward(code, v, alpha)

    return loop


def _backward_loop(code: int, T: types.Float, cache: bool = True):
    @cfunc(types.void(types.CPointer(T), types.CPointer(T), types.CPointer(T), types.int64, T), cache=cache,
           error_model="numpy")
    def loop(dy, saved, dx, n, alpha):
        ds = carray(dy, n)
        ss = carray(saved, n)
        out = carray(dx, n)
        for i in range(n):
            s = ss[i]
            out[i] = ds[i] * formula_derivative(code, s, alpha)

    return loop


@functools.lru_cache(maxsize=None)
def forward_kernel(activation: str, dtype: np.dtype):
    """The compiled forward loop of ``activation`` for ``dtype`` (``.address`` to call it)."""
    return _forward_loop(CODES[activation], _TYPES[np.dtype(dtype)])


@functools.lru_cache(maxsize=None)
def backward_kernel(activation: str, dtype: np.dtype):
    """The compiled backward loop of ``activation`` for ``dtype`` (``.address`` to call it)."""
    return _backward_loop(CODES[activation], _TYPES[np.dtype(dtype)])


# ------------------------------------------------------------ drivers (one per dtype, any activation)
@njit(cache=True, error_model="numpy")
def _forward_serial(x, y, fn, alpha):
    call_forward(fn, addr(x), addr(y), x.size, alpha)


@njit(parallel=True, cache=True, error_model="numpy")
def _forward_parallel(x, y, fn, alpha):
    n = x.size
    px = addr(x)
    py = addr(y)
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo = c * CHUNK
        call_forward(fn, ptr_at(px, lo), ptr_at(py, lo), min(n, lo + CHUNK) - lo, alpha)


@njit(cache=True, error_model="numpy")
def _backward_serial(dy, s, dx, fn, alpha):
    call_backward(fn, addr(dy), addr(s), addr(dx), dy.size, alpha)


@njit(parallel=True, cache=True, error_model="numpy")
def _backward_parallel(dy, s, dx, fn, alpha):
    n = dy.size
    pdy = addr(dy)
    ps = addr(s)
    pdx = addr(dx)
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo = c * CHUNK
        call_backward(fn, ptr_at(pdy, lo), ptr_at(ps, lo), ptr_at(pdx, lo), min(n, lo + CHUNK) - lo, alpha)


def forward(x: np.ndarray, activation: str, alpha: float) -> np.ndarray:
    """``act(x)`` as a new array; ``x`` must be C-contiguous (any rank)."""
    y = np.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    driver = _forward_parallel if xf.size >= PARALLEL_MIN else _forward_serial
    driver(xf, yf, forward_kernel(activation, x.dtype).address, x.dtype.type(alpha))
    return y


def backward(dy: np.ndarray, saved: np.ndarray, activation: str, alpha: float) -> np.ndarray:
    """``dy * act'(saved)`` as a new array; both C-contiguous, same shape."""
    dx = np.empty_like(dy)
    d, s, o = dy.reshape(-1), saved.reshape(-1), dx.reshape(-1)
    driver = _backward_parallel if d.size >= PARALLEL_MIN else _backward_serial
    driver(d, s, o, backward_kernel(activation, dy.dtype).address, dy.dtype.type(alpha))
    return dx
