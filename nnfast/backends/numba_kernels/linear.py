"""Linear layer forward / backward on top of :mod:`.gemm`.

Forward: one GEMM whose epilogue adds the bias and applies the activation
while the tile is in registers; the pre-activation ``z`` is written only when
the activation's backward needs the input (``base.saves_input``).

Backward: ``dz = dy * act'(saved)`` and ``db = sum_rows(dz)`` in one fused
pass (each worker takes a block of rows, writes their ``dz`` and adds them
into its own partial ``db`` while they are still in L1; a short serial merge
adds the partials: no atomics, and the result does not depend on the thread
count). Then ``dW = x.T @ dz`` and ``dx = dz @ W.T`` are GEMMs that read
``x`` and ``W`` transposed in their packing step, without materialising a
transpose. For the identity ``dz`` is ``dy`` itself (no copy).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._calls import call_backward, ptr_at
from ._simd import addr
from .activations import backward_kernel
from .gemm import gemm

#: At most this many row blocks (and partial ``db`` rows) per backward pass.
MAX_BLOCKS = 64
#: Below this many elements the dz/db pass runs on the calling thread.
PARALLEL_MIN = 1 << 15


@njit(cache=True, error_model="numpy")
def _dz_db_block(dy, saved, dz, acc, r0, r1, grad, alpha, write_dz, want_db):
    n = dy.shape[1]
    pdy = addr(dy)
    ps = addr(saved)
    pdz = addr(dz)
    for j in range(n):
        acc[j] = 0
    for r in range(r0, r1):
        if write_dz:  # the activation's backward loop, at address grad, over row r
            call_backward(grad, ptr_at(pdy, r * n), ptr_at(ps, r * n), ptr_at(pdz, r * n), n, alpha)
        if want_db:
            row = dz[r] if write_dz else dy[r]
            for j in range(n):
                acc[j] += row[j]


@njit(cache=True, error_model="numpy")
def _merge(partial, db):
    for j in range(db.size):
        db[j] = 0
    for t in range(partial.shape[0]):
        row = partial[t]
        for j in range(db.size):
            db[j] += row[j]


@njit(parallel=True, cache=True, error_model="numpy")
def _dz_db_parallel(dy, saved, dz, partial, rows, grad, alpha, write_dz, want_db):
    batch = dy.shape[0]
    for t in prange(partial.shape[0]):
        _dz_db_block(dy, saved, dz, partial[t], t * rows, min(batch, (t + 1) * rows),
                     grad, alpha, write_dz, want_db)


@njit(cache=True, error_model="numpy")
def _dz_db_serial(dy, saved, dz, partial, rows, grad, alpha, write_dz, want_db):
    batch = dy.shape[0]
    for t in range(partial.shape[0]):
        _dz_db_block(dy, saved, dz, partial[t], t * rows, min(batch, (t + 1) * rows),
                     grad, alpha, write_dz, want_db)


def dz_db(dy, saved, activation, alpha, want_db):
    """``(dz, db)``: ``dz = dy * act'(saved)`` (``dy`` itself for the identity)
    and its column sums (None unless ``want_db``)."""
    batch, n = dy.shape
    write_dz = activation != "identity"
    if not write_dz and not want_db:
        return dy, None
    dz = np.empty_like(dy) if write_dz else dy
    rows = max(16, -(-batch // MAX_BLOCKS))
    blocks = -(-batch // rows)
    partial = np.empty((blocks, n), dy.dtype)
    kernel = _dz_db_parallel if dy.size >= PARALLEL_MIN else _dz_db_serial
    # The identity never reads ``saved`` (it may be anything): pass dy in its place.
    grad = backward_kernel(activation, dy.dtype).address if write_dz else 0
    kernel(dy, saved if write_dz else dy, dz, partial, rows, grad, dy.dtype.type(alpha), write_dz, want_db)
    db = None
    if want_db:
        db = np.empty(n, dy.dtype)
        _merge(partial, db)
    return dz, db


def linear_forward(x, W, b, activation, alpha, saves_input):
    """``(y, saved)`` of ``act(x @ W + b)``."""
    if activation == "identity":
        y, _ = gemm(x, W, bias=b)
        return y, y
    y, z = gemm(x, W, bias=b, activation=activation, alpha=alpha, save_z=saves_input)
    return y, (z if saves_input else y)


def linear_backward(dy, x, W, saved, activation, alpha, has_bias, need_dx):
    """``(dx, dW, db)`` of :func:`linear_forward`."""
    dz, db = dz_db(dy, saved, activation, alpha, has_bias)
    dW, _ = gemm(x, dz, trans_a=True)
    dx = gemm(dz, W, trans_b=True)[0] if need_dx else None
    return dx, dW, db
