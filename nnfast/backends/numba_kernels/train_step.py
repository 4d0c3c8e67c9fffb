"""The fused training step of an MLP: one compiled call runs the whole step.

A step of ``L`` layers, once its buffers and descriptors are laid out
(:mod:`nnfast.train_step.numba_fused`), is::

    scan the labels                      a bad one: stop before anything changed
    for l in 0 .. L-1:   h[l+1] = act_l(h[l] @ W_l + b_l)          GEMM, FORWARD epilogue
    per block of rows:   softmax-CE of the logits -> loss rows, dz[L-1] (x act' of the last layer)
                         + its rows into the partial db of the last layer
    loss = the reduction of the loss rows                           not finite: stop
    for l in L-1 .. 0:
        if l > 0:  dz[l-1] = (dz[l] @ W_l.T) * act'_{l-1}           GEMM, DX epilogue (+ partial db)
        W_l -= update(h[l].T @ dz[l])                               GEMM, UPDATE epilogue
        b_l -= update(sum of the partial db of layer l)

``dx`` of layer ``l`` is computed before ``W_l`` is updated (it reads the old
``W_l``), and no gradient of a weight makes a round trip through memory: each
block of it is consumed by the update while it is still in L2. Every
operation is the one the layer ops of the eager step perform (the same GEMM
task with the same K blocking, the same activation loops, the same ``db`` row
blocks, the same update loops, NumPy's pairwise summation of the loss rows),
in the same order per element, so the fused step gives the eager step's bits.

The descriptors (:mod:`.gemm`) hold every address and size; the step itself
is compiled once per dtype, for every model depth, activation, optimizer and
loss setting. Two entries: :func:`step_serial` runs everything on the calling
thread (small models, where waking threads costs more than it saves; one
call, no parallel region), :func:`step_parallel` runs each GEMM whose
descriptor asks for workers as a parallel region with dynamic task
scheduling, and the softmax-CE over row blocks in parallel.
"""

from __future__ import annotations

import types as pytypes

import numpy as np
from numba import carray, njit, prange

from ._calls import call_backward, call_update, ptr_at
from ._sched import address_of, as_ptr
from ._simd import addr
from .gemm import A, run, run_serial
from .linear import _merge
from .softmax_ce import _ce_rows, scan_labels

# Slots of ``info`` (int64): the step as a whole.
(I_TASK, I_LAYERS, I_BATCH, I_CLASSES, I_IGNORE, I_USE_IGNORE, I_REDUCTION, I_LOGITS, I_DLOGITS, I_LOSS_ROWS,
 I_LAST_BWD, I_LAST_SAVED, I_PROWS, I_UPDATE, I_COEF, I_INFO) = range(16)
# Slots of ``layers[l]`` (int64): what the bias of layer l needs.
(L_OUT, L_BIAS, L_DB, L_PARTIAL, L_BLOCKS, L_S1, L_S2, L_SIZE) = range(8)
# Slots of ``finfo`` (float64).
F_EPS, F_SIZE = range(2)
#: Reductions, as ``info[I_REDUCTION]``.
MEAN, SUM, NONE = range(3)
#: What a step returns.
DONE, NOT_FINITE, BAD_LABEL = range(3)
#: Descriptor rows of layer ``l``: forward ``3l``, dx ``3l + 1`` (for l > 0), dW + update ``3l + 2``.
FWD, DXR, DWR = range(3)
#: Below this many logits the softmax-CE of a parallel step runs on the calling thread.
CE_PARALLEL_MIN = 1 << 15


@njit(error_model="numpy")
def pairwise_sum(a):
    """``a.sum()`` of a float64 array with NumPy's pairwise summation (eight partial
    sums per block of at most 128, halves above), so the result has NumPy's bits.

    NumPy's recursion is walked with an explicit stack, in the same order (left
    half, right half, their sum): Numba compiles a recursive function twice
    over (once to type the recursion), which made it a second of a cold start.
    """
    n = a.size
    # Pending ranges: (start, length), the length negated once its halves are pushed; the sums of finished ones.
    todo = np.empty((2 * _STACK, 2), np.int64)
    sums = np.empty(_STACK, np.float64)
    top = 0
    todo[0, 0] = 0
    todo[0, 1] = n
    done = 0
    while top >= 0:
        lo = todo[top, 0]
        m = todo[top, 1]
        if m < 0:  # both halves summed
            done -= 1
            sums[done - 1] = sums[done - 1] + sums[done]
            top -= 1
        elif m > 128:
            half = m // 2
            half -= half % 8
            todo[top, 1] = -m
            todo[top + 1, 0] = lo + half
            todo[top + 1, 1] = m - half
            todo[top + 2, 0] = lo
            todo[top + 2, 1] = half
            top += 2
        else:
            sums[done] = _pairwise_block(a, lo, m)
            done += 1
            top -= 1
    return sums[0]


#: Depth of :func:`pairwise_sum`'s stack: every halving leaves more than 64 values, so 2**64 values need fewer.
_STACK = 64


@njit(error_model="numpy")
def _pairwise_block(a, lo, n):
    """NumPy's sum of ``a[lo:lo + n]``, ``n <= 128``: eight partial sums (one below eight values)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    while i < n - n % 8:
        k = lo + i
        r0 += a[k]
        r1 += a[k + 1]
        r2 += a[k + 2]
        r3 += a[k + 3]
        r4 += a[k + 4]
        r5 += a[k + 5]
        r6 += a[k + 6]
        r7 += a[k + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(error_model="numpy")
def _ce_block(b, info, finfo, fps, layers, labels, like, scale):
    """Softmax-CE of row block ``b`` (the last layer's ``db`` block): loss rows, ``dz``, partial ``db``."""
    batch = info[I_BATCH]
    classes = info[I_CLASSES]
    prows = info[I_PROWS]
    r0 = b * prows
    r1 = min(batch, r0 + prows)
    logits = carray(as_ptr(info[I_LOGITS], like), (batch, classes))
    grad = carray(as_ptr(info[I_DLOGITS], like), (batch, classes))
    loss = carray(as_ptr(info[I_LOSS_ROWS], finfo), batch)
    _ce_rows(logits, labels, r0, r1, finfo[F_EPS], info[I_IGNORE], info[I_USE_IGNORE] != 0, scale, loss, grad)
    bwd = info[I_LAST_BWD]
    last = layers[info[I_LAYERS] - 1]
    has_db = last[L_PARTIAL] != 0
    partial = carray(as_ptr(last[L_PARTIAL] if has_db else info[I_DLOGITS], like), (last[L_BLOCKS], classes))
    acc = partial[b]
    if has_db:
        for j in range(classes):
            acc[j] = 0
    alpha = fps[3 * (info[I_LAYERS] - 1) + FWD, 0]  # the last layer's activation parameter
    pg = addr(grad)
    for r in range(r0, r1):
        if bwd != 0:  # the last layer's own activation, in place
            ps = as_ptr(info[I_LAST_SAVED], like)
            call_backward(bwd, ptr_at(pg, r * classes), ptr_at(ps, r * classes), ptr_at(pg, r * classes),
                          classes, alpha)
        if has_db:
            row = grad[r]
            for j in range(classes):
                acc[j] += row[j]


@njit(error_model="numpy")
def _ce_serial(info, finfo, fps, layers, labels, like, scale, blocks):
    for b in range(blocks):
        _ce_block(b, info, finfo, fps, layers, labels, like, scale)


@njit(parallel=True, error_model="numpy")
def _ce_parallel(info, finfo, fps, layers, labels, like, scale, blocks):
    for b in prange(blocks):
        _ce_block(b, info, finfo, fps, layers, labels, like, scale)


@njit(error_model="numpy")
def _ce(info, finfo, fps, layers, labels, x, scale, blocks):
    if info[I_BATCH] * info[I_CLASSES] >= CE_PARALLEL_MIN:
        _ce_parallel(info, finfo, fps, layers, labels, x, scale, blocks)
    else:
        _ce_serial(info, finfo, fps, layers, labels, x, scale, blocks)


#: The drivers ``_step`` calls; each step kernel is ``_step`` compiled with its own (see :func:`_kernel`).
_run_gemm, _run_ce = run, _ce


def _step(x, labels, descs, fps, info, finfo, layers, out, status, counter):
    """One step (see the module documentation); returns DONE, NOT_FINITE or BAD_LABEL (row in ``status[0]``)."""
    batch = info[I_BATCH]
    use_ignore = info[I_USE_IGNORE] != 0
    bad, kept = scan_labels(labels, info[I_CLASSES], info[I_IGNORE], use_ignore)
    if bad >= 0:
        status[0] = bad
        return BAD_LABEL
    task = info[I_TASK]
    nl = info[I_LAYERS]
    xa = address_of(addr(x))
    descs[FWD, A] = xa
    descs[DWR, A] = xa
    for l in range(nl):
        _run_gemm(task, descs[3 * l + FWD], fps[3 * l + FWD], counter)
    reduction = info[I_REDUCTION]
    scale = 1.0
    if reduction == MEAN:
        scale = 1.0 / kept if kept else 0.0
    blocks = (batch + info[I_PROWS] - 1) // info[I_PROWS]
    _run_ce(info, finfo, fps, layers, labels, x, scale, blocks)
    loss = carray(as_ptr(info[I_LOSS_ROWS], finfo), batch)
    finite = True
    if reduction == NONE:
        for i in range(batch):
            out[i] = loss[i]
            finite = finite and np.isfinite(out[i])
    else:
        out[0] = pairwise_sum(loss) * scale
        finite = np.isfinite(out[0])
    if not finite:
        return NOT_FINITE
    upd = info[I_UPDATE]
    coef = as_ptr(info[I_COEF], x)
    for l in range(nl - 1, -1, -1):
        if l > 0:
            below = layers[l - 1]
            if below[L_PARTIAL] != 0:
                part = carray(as_ptr(below[L_PARTIAL], x), below[L_BLOCKS] * below[L_OUT])
                part[:] = 0
            _run_gemm(task, descs[3 * l + DXR], fps[3 * l + DXR], counter)
        _run_gemm(task, descs[3 * l + DWR], fps[3 * l + DWR], counter)
        lay = layers[l]
        if lay[L_BIAS] != 0:
            n = lay[L_OUT]
            db = carray(as_ptr(lay[L_DB], x), n)
            _merge(carray(as_ptr(lay[L_PARTIAL], x), (lay[L_BLOCKS], n)), db)
            bias = as_ptr(lay[L_BIAS], x)
            s1 = as_ptr(lay[L_S1] if lay[L_S1] != 0 else lay[L_BIAS], x)
            s2 = as_ptr(lay[L_S2] if lay[L_S2] != 0 else lay[L_BIAS], x)
            call_update(upd, bias, addr(db), s1, s2, n, coef)
    return DONE


def _kernel(name: str, run_gemm, run_ce):
    """``_step`` compiled with ``run_gemm`` / ``run_ce`` as its drivers, named ``name`` (its disk-cache entries).

    The drivers are globals of the compiled copy, not arguments or closure
    variables: a kernel links only the drivers it calls (the serial step no
    parallel region), and Numba can cache it (a closure over a dispatcher
    would miss the cache in every new process).
    """
    fn = pytypes.FunctionType(_step.__code__, dict(globals(), _run_gemm=run_gemm, _run_ce=run_ce), name)
    fn.__qualname__ = name
    fn.__doc__ = _step.__doc__
    return njit(cache=True, error_model="numpy")(fn)


#: The whole step on the calling thread.
step_serial = _kernel("step_serial", run_serial, _ce_serial)
#: The whole step, each large GEMM and a large softmax-CE as a parallel region.
step_parallel = _kernel("step_parallel", run, _ce)
