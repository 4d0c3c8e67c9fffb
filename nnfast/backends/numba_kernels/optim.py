"""Fused optimizer updates: SGD (momentum, Nesterov, weight decay) and Adam / AdamW.

One pass over each parameter: every element of ``p``, ``grad`` and the
state is read once and written once (the NumPy reference makes 4-8 passes
with temporaries). The formulas and their order of operations follow the
reference (``numpy_backend``); the scalars are cast to the parameter dtype
first (:func:`sgd_coefficients`, :func:`adam_coefficients`), so float32
parameters are updated in float32 like NumPy does. No ``fastmath``.

Each rule is one loop over raw pointers (:func:`_sgd_span`,
:func:`_adam_span`), used twice:

* by the optimizer ops (:func:`sgd_update`, :func:`adam_update`), which run
  it over chunks of each parameter, in parallel for large ones;
* through its C-callable form (:func:`update_kernel`) by the fused training
  step, which calls it on each tile of ``dW`` while the tile is still in L1
  (the GEMM's update epilogue, :mod:`.gemm`) and on each bias.

Being the same loop, both give the same bits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import carray, cfunc, njit, prange, types

from ._calls import ptr_at
from ._schedule import set_chunksize
from ._simd import addr, vadd, vdiv, vlanes, vload, vmul, vsplat, vsqrt, vstore, vsub

#: Elements per parallel work item.
CHUNK = 1 << 15
#: Below this many elements a parameter is updated on the calling thread.
PARALLEL_MIN = 1 << 17

# Coefficient slots (in the parameter dtype; flags are 0 or 1).
SGD_LR, SGD_WD, SGD_MU, SGD_HAS_WD, SGD_MOMENTUM, SGD_NESTEROV, SGD_SIZE = range(7)
(ADAM_B1, ADAM_B2, ADAM_C1, ADAM_C2, ADAM_DECAY, ADAM_WD, ADAM_STEP, ADAM_SQ2, ADAM_EPS, ADAM_DECOUPLED,
 ADAM_SIZE) = range(11)


def sgd_coefficients(dtype, lr, momentum, nesterov, weight_decay, out=None):
    """The SGD scalars as the kernels take them (an array of the parameter dtype)."""
    c = np.empty(SGD_SIZE, dtype) if out is None else out
    c[:] = (lr, weight_decay, momentum, weight_decay != 0.0, momentum != 0.0, bool(nesterov))
    return c


def adam_coefficients(dtype, step, lr, beta1, beta2, eps, weight_decay, decoupled, out=None):
    """The Adam scalars of step number ``step`` (1 for the first update)."""
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    if not weight_decay:
        decoupled = True  # p * (1 - lr * 0) == p: the cheaper branch
    c = np.empty(ADAM_SIZE, dtype) if out is None else out
    c[:] = (beta1, beta2, 1.0 - beta1, 1.0 - beta2, 1.0 - lr * weight_decay, weight_decay, lr / bias1,
            math.sqrt(bias2), eps, bool(decoupled))
    return c


@njit(error_model="numpy")
def _sgd_span(pp, gp, vp, n, cp):
    """SGD over ``n`` elements at ``pp`` (``vp``: the velocity, unused without momentum).

    Whole SIMD vectors first (a tile row of the fused step is two of them, too
    short for LLVM's vectorised loop), then the tail; the same operations in
    both, without contraction, so every element gets the same bits.
    """
    c = carray(cp, SGD_SIZE)
    lr = c[SGD_LR]
    wd = c[SGD_WD]
    mu = c[SGD_MU]
    has_wd = c[SGD_HAS_WD] != 0
    momentum = c[SGD_MOMENTUM] != 0
    nesterov = c[SGD_NESTEROV] != 0
    h = vlanes(pp)
    vlr = vsplat(pp, lr)
    vwd = vsplat(pp, wd)
    vmu = vsplat(pp, mu)
    nv = n - n % h
    for i in range(0, nv, h):
        pi = vload(pp, i)
        d = vload(gp, i)
        if has_wd:
            d = vadd(d, vmul(vwd, pi))
        if momentum:
            vi = vadd(vmul(vload(vp, i), vmu), d)
            vstore(vp, i, vi)
            d = vadd(d, vmul(vmu, vi)) if nesterov else vi
        vstore(pp, i, vsub(pi, vmul(vlr, d)))
    p = carray(pp, n)
    g = carray(gp, n)
    v = carray(vp if momentum else pp, n)
    for i in range(nv, n):
        pi = p[i]
        d = g[i] + wd * pi if has_wd else g[i]
        if momentum:
            vi = v[i] * mu + d
            v[i] = vi
            d = d + mu * vi if nesterov else vi
        p[i] = pi - lr * d


@njit(error_model="numpy")
def _adam_span(pp, gp, mp, vp, n, cp):
    """Adam / AdamW over ``n`` elements at ``pp`` (whole vectors, then the tail, as :func:`_sgd_span`)."""
    c = carray(cp, ADAM_SIZE)
    b1 = c[ADAM_B1]
    b2 = c[ADAM_B2]
    c1 = c[ADAM_C1]
    c2 = c[ADAM_C2]
    decay = c[ADAM_DECAY]
    wd = c[ADAM_WD]
    step = c[ADAM_STEP]
    sq2 = c[ADAM_SQ2]
    e = c[ADAM_EPS]
    decoupled = c[ADAM_DECOUPLED] != 0
    h = vlanes(pp)
    nv = n - n % h
    for i in range(0, nv, h):
        pi = vload(pp, i)
        gi = vload(gp, i)
        if decoupled:
            pi = vmul(pi, vsplat(pp, decay))
        else:
            gi = vadd(gi, vmul(vsplat(pp, wd), pi))
        mi = vadd(vmul(vload(mp, i), vsplat(pp, b1)), vmul(vsplat(pp, c1), gi))
        vi = vadd(vmul(vload(vp, i), vsplat(pp, b2)), vmul(vmul(vsplat(pp, c2), gi), gi))
        vstore(mp, i, mi)
        vstore(vp, i, vi)
        denom = vadd(vdiv(vsqrt(vi), vsplat(pp, sq2)), vsplat(pp, e))
        vstore(pp, i, vsub(pi, vdiv(vmul(vsplat(pp, step), mi), denom)))
    p = carray(pp, n)
    g = carray(gp, n)
    m = carray(mp, n)
    v = carray(vp, n)
    for i in range(nv, n):
        pi = p[i]
        gi = g[i]
        if decoupled:
            pi = pi * decay
        else:
            gi = gi + wd * pi
        mi = m[i] * b1 + c1 * gi
        vi = v[i] * b2 + c2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = pi - step * mi / (np.sqrt(vi) / sq2 + e)


_TYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}


def _update_cfunc(rule: str, T: types.Float):
    ptr = types.CPointer(T)

    @cfunc(types.void(ptr, ptr, ptr, ptr, types.int64, ptr), cache=True, error_model="numpy")
    def update(p, g, s1, s2, n, c):
        if rule == "sgd":
            _sgd_span(p, g, s1, n, c)
        else:
            _adam_span(p, g, s1, s2, n, c)

    return update


@functools.lru_cache(maxsize=None)
def update_kernel(rule: str, dtype: np.dtype):
    """The C-callable update of ``rule`` ("sgd" or "adam") for ``dtype``:
    ``void(T* p, T* grad, T* state1, T* state2, int64 n, T* coefficients)``."""
    return _update_cfunc(rule, _TYPES[np.dtype(dtype)])


# ------------------------------------------------------------ the optimizer ops
@njit(cache=True, error_model="numpy")
def _sgd_serial(p, g, v, c):
    _sgd_span(addr(p), addr(g), addr(v), p.size, addr(c))


@njit(parallel=True, cache=True, error_model="numpy")
def _sgd_parallel(p, g, v, c):
    n = p.size
    outer = set_chunksize(1)  # each chunk a work item of its own (see _schedule)
    for k in prange((n + CHUNK - 1) // CHUNK):
        lo = k * CHUNK
        _sgd_span(ptr_at(addr(p), lo), ptr_at(addr(g), lo), ptr_at(addr(v), lo), min(n, lo + CHUNK) - lo, addr(c))
    set_chunksize(outer)


@njit(cache=True, error_model="numpy")
def _adam_serial(p, g, m, v, c):
    _adam_span(addr(p), addr(g), addr(m), addr(v), p.size, addr(c))


@njit(parallel=True, cache=True, error_model="numpy")
def _adam_parallel(p, g, m, v, c):
    n = p.size
    outer = set_chunksize(1)
    for k in prange((n + CHUNK - 1) // CHUNK):
        lo = k * CHUNK
        _adam_span(ptr_at(addr(p), lo), ptr_at(addr(g), lo), ptr_at(addr(m), lo), ptr_at(addr(v), lo),
                   min(n, lo + CHUNK) - lo, addr(c))
    set_chunksize(outer)


def _per_dtype(make):
    """``make(dtype)``, made once per dtype (parameters of one optimizer may differ in dtype)."""
    return functools.lru_cache(maxsize=None)(make)


def sgd_update(params, grads, velocities, lr, momentum, nesterov, weight_decay):
    """In-place SGD step on every parameter (``velocities[i]`` may be None when momentum == 0)."""
    coefficients = _per_dtype(lambda dtype: sgd_coefficients(dtype, lr, momentum, nesterov, weight_decay))
    for p, g, v in zip(params, grads, velocities):
        c = coefficients(p.dtype)
        pf, gf = p.reshape(-1), g.reshape(-1)
        vf = pf if (v is None or momentum == 0.0) else v.reshape(-1)  # unused when momentum == 0
        (_sgd_parallel if pf.size >= PARALLEL_MIN else _sgd_serial)(pf, gf, vf, c)


def adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                weight_decay, decoupled):
    """In-place Adam / AdamW step on every parameter."""
    coefficients = _per_dtype(lambda dtype: adam_coefficients(dtype, step, lr, beta1, beta2, eps, weight_decay,
                                                              decoupled))
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        c = coefficients(p.dtype)
        args = (p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1))
        (_adam_parallel if args[0].size >= PARALLEL_MIN else _adam_serial)(*args, c)
