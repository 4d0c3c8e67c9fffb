"""Fused optimizer updates: SGD (momentum, Nesterov, weight decay) and Adam / AdamW.

One pass over each parameter: every element of ``p``, ``grad`` and the
state is read once and written once (the NumPy reference makes 4-8 passes
with temporaries). The formulas and their order of operations follow the
reference (``numpy_backend``); scalars are cast to the parameter dtype
first, so float32 parameters are updated in float32 like NumPy does. Large
parameters are split into chunks updated in parallel. No ``fastmath``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._math import like
from ._schedule import set_chunksize

#: Elements per parallel work item.
CHUNK = 1 << 15
#: Below this many elements a parameter is updated on the calling thread.
PARALLEL_MIN = 1 << 17


@njit(cache=True, error_model="numpy")
def _sgd_range(p, g, v, lo, hi, lr, momentum, nesterov, weight_decay):
    p = p[lo:hi]
    g = g[lo:hi]
    t = p[0]
    lr_ = like(t, lr)
    wd = like(t, weight_decay)
    mu = like(t, momentum)
    has_wd = weight_decay != 0.0
    if momentum == 0.0:
        for i in range(p.size):
            pi = p[i]
            d = g[i] + wd * pi if has_wd else g[i]
            p[i] = pi - lr_ * d
        return
    v = v[lo:hi]
    for i in range(p.size):
        pi = p[i]
        d = g[i] + wd * pi if has_wd else g[i]
        vi = v[i] * mu + d
        v[i] = vi
        if nesterov:
            d = d + mu * vi
        else:
            d = vi
        p[i] = pi - lr_ * d


@njit(parallel=True, cache=True, error_model="numpy")
def _sgd_parallel(p, g, v, lr, momentum, nesterov, weight_decay):
    n = p.size
    outer = set_chunksize(1)  # each chunk a work item of its own (see _schedule)
    for c in prange((n + CHUNK - 1) // CHUNK):
        _sgd_range(p, g, v, c * CHUNK, min(n, (c + 1) * CHUNK), lr, momentum, nesterov, weight_decay)
    set_chunksize(outer)


@njit(cache=True, error_model="numpy")
def _adam_range(p, g, m, v, lo, hi, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2):
    p = p[lo:hi]
    g = g[lo:hi]
    m = m[lo:hi]
    v = v[lo:hi]
    t = p[0]
    b1 = like(t, beta1)
    b2 = like(t, beta2)
    c1 = like(t, 1.0 - beta1)
    c2 = like(t, 1.0 - beta2)
    decay = like(t, 1.0 - lr * weight_decay)
    wd = like(t, weight_decay)
    step = like(t, lr / bias1)
    sq2 = like(t, math.sqrt(bias2))
    e = like(t, eps)
    for i in range(p.size):
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


@njit(parallel=True, cache=True, error_model="numpy")
def _adam_parallel(p, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2):
    n = p.size
    outer = set_chunksize(1)
    for c in prange((n + CHUNK - 1) // CHUNK):
        _adam_range(p, g, m, v, c * CHUNK, min(n, (c + 1) * CHUNK), lr, beta1, beta2, eps,
                    weight_decay, decoupled, bias1, bias2)
    set_chunksize(outer)


def sgd_update(params, grads, velocities, lr, momentum, nesterov, weight_decay):
    """In-place SGD step on every parameter (``velocities[i]`` may be None when momentum == 0)."""
    for p, g, v in zip(params, grads, velocities):
        pf, gf = p.reshape(-1), g.reshape(-1)
        vf = pf if (v is None or momentum == 0.0) else v.reshape(-1)  # unused when momentum == 0
        if pf.size >= PARALLEL_MIN:
            _sgd_parallel(pf, gf, vf, lr, momentum, nesterov, weight_decay)
        else:
            _sgd_range(pf, gf, vf, 0, pf.size, lr, momentum, nesterov, weight_decay)


def adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                weight_decay, decoupled):
    """In-place Adam / AdamW step on every parameter."""
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    if not weight_decay:
        decoupled = True  # p * (1 - lr * 0) == p: the cheaper branch
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        args = (p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1))
        if args[0].size >= PARALLEL_MIN:
            _adam_parallel(*args, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2)
        else:
            _adam_range(*args, 0, args[0].size, lr, beta1, beta2, eps, weight_decay, decoupled,
                        bias1, bias2)
