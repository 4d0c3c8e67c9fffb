"""Row kernels: fused softmax cross-entropy (loss + d loss / d logits), softmax, log-softmax.

Each row is handled by one worker (``prange`` over rows) in two sweeps:

1. **Online max / sum-exp** (one read of the row): the row is cut into
   blocks of :data:`BLOCK` elements; for each block, its maximum ``bm`` is
   taken with SIMD ``vmaxps``; if ``bm`` exceeds the running maximum ``m``,
   the running sum is rescaled once, ``s *= exp(m - bm)``, and ``m = bm``;
   then ``s += sum(exp(x - m))`` over the block. This is the online-softmax
   recurrence applied per block instead of per element, so it costs one exp
   per element (plus one per block), never overflows, and reads the row
   once. The same sweep adds up ``sum(x)`` (for label smoothing).
2. **Gradient** (second read, from L1/L2, and the only write):
   ``g = (exp(x - m) / s - eps / C) * scale`` and ``g[y] -= (1 - eps) * scale``.

So the logits are read twice and the gradient written once; no temporary
of the logits' size exists besides the gradient. The loss of the row is
``(1 - eps) (log s + M - x[y]) + eps (log s - mean(x - M))``, the reference's
``(1 - eps) nll + eps smooth`` written without differences of huge numbers.

Labels are scanned first (serially; it is ``batch`` integers): a label
outside ``[0, C)`` that is not ``ignore_index`` stops the kernel before any
row is read, and the wrapper raises ``base.bad_label_error``. A label is
never used as an index unless it is in range.

``fastmath``: only ``reassoc`` (+ ``contract``), only in the two inner block
loops, so that LLVM can vectorise the sums of exponentials and of ``x`` with
partial sums; it changes the summation order (float64: ~1e-16 relative).
No ``nnan`` / ``ninf``: a NaN or inf logit propagates to the loss as in NumPy.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._math import fexp, like
from ._schedule import set_chunksize
from ._simd import vlane, vload, vmax

#: Elements per online-softmax block (a multiple of every vector width).
BLOCK = 256
#: Rows per parallel work item.
ROWS_PER_TASK = 16
#: Below this many logits the kernels run on the calling thread.
PARALLEL_MIN = 1 << 15

_FM = {"reassoc", "contract"}


@njit(cache=True, error_model="numpy")
def _block_max(x, lo, hi):
    """max(x[lo:hi]) with SIMD compares; ``hi - lo >= 1``."""
    h = 32 // x.itemsize
    m = x[lo]
    i = lo
    if hi - lo >= 4 * h:
        v0 = vload(x, i)
        v1 = vload(x, i + h)
        v2 = vload(x, i + 2 * h)
        v3 = vload(x, i + 3 * h)
        i += 4 * h
        while i + 4 * h <= hi:
            v0 = vmax(v0, vload(x, i))
            v1 = vmax(v1, vload(x, i + h))
            v2 = vmax(v2, vload(x, i + 2 * h))
            v3 = vmax(v3, vload(x, i + 3 * h))
            i += 4 * h
        v0 = vmax(vmax(v0, v1), vmax(v2, v3))
        for k in range(h):
            e = vlane(v0, k)
            m = e if e > m else m
    for k in range(i, hi):
        e = x[k]
        m = e if e > m else m
    return m


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _block_exp(x, e, lo, hi, m, inv_n):
    """e[lo:hi] = exp(x[lo:hi] - m); returns (sum of those, sum((x[lo:hi] - m) * inv_n)).

    The second sum adds pre-scaled terms, so a row mean near the float
    maximum cannot overflow on the way (as the reference does).
    """
    s = like(m, 0.0)
    sd = like(m, 0.0)
    xs = x[lo:hi]
    es = e[lo:hi]
    for k in range(xs.size):
        d = xs[k] - m
        ev = fexp(d)
        es[k] = ev
        s += ev
        sd += d * inv_n
    return s, sd


@njit(cache=True, error_model="numpy")
def row_exp(x, e, mb, inv_n):
    """Online softmax sweep over one row.

    Writes ``e = exp(x - m_b)`` where ``m_b`` is the running maximum when
    block ``b`` was reached (kept in ``mb[b]``), and returns the row maximum
    ``M``, ``s = sum(exp(x - M))`` and ``mean(x - M)`` (float64; summed
    relative to the maximum from terms pre-scaled by ``inv_n = 1 / len(x)``,
    so huge logits can neither overflow it nor cancel in the loss).
    ``e * exp(mb[b] - M)`` is then ``exp(x - M)``: the second sweep needs no
    exp per element.
    """
    n = x.size
    m = x[0]
    s = like(m, 0.0)
    sd = 0.0
    b = 0
    for lo in range(0, n, BLOCK):
        hi = min(n, lo + BLOCK)
        bm = _block_max(x, lo, hi)
        if bm > m:
            s *= fexp(m - bm)
            sd += lo * (np.float64(m) - np.float64(bm)) * np.float64(inv_n)
            m = bm
        bs, bd = _block_exp(x, e, lo, hi, m, inv_n)
        s += bs
        sd += np.float64(bd)
        mb[b] = m
        b += 1
    return m, s, sd


@njit(cache=True, error_model="numpy", fastmath=_FM)
def _rescale(e, mb, m, mul, sub):
    """e = e * exp(mb[b] - m) * mul - sub, block by block."""
    n = e.size
    b = 0
    for lo in range(0, n, BLOCK):
        es = e[lo:min(n, lo + BLOCK)]
        f = fexp(mb[b] - m) * mul
        for k in range(es.size):
            es[k] = es[k] * f - sub
        b += 1


@njit(cache=True, error_model="numpy")
def scan_labels(labels, classes, ignore_index, use_ignore):
    """(first bad row or -1, number of rows not ignored)."""
    kept = 0
    for i in range(labels.size):
        y = labels[i]
        if use_ignore and y == ignore_index:
            continue
        if y < 0 or y >= classes:
            return i, kept
        kept += 1
    return -1, kept


@njit(cache=True, error_model="numpy")
def _ce_rows(logits, labels, r0, r1, eps, ignore_index, use_ignore, scale, loss, grad):
    classes = logits.shape[1]
    mb = np.empty((classes + BLOCK - 1) // BLOCK, logits.dtype)
    inv_n = like(logits[0, 0], 1.0 / classes)
    for i in range(r0, r1):
        x = logits[i]
        g = grad[i]
        y = labels[i]
        if use_ignore and y == ignore_index:
            for j in range(classes):
                g[j] = 0
            loss[i] = 0.0
            continue
        if y < 0 or y >= classes:  # unreachable after scan_labels; never index with it
            for j in range(classes):
                g[j] = np.nan
            loss[i] = np.nan
            continue
        m, s, mean_d = row_exp(x, g, mb, inv_n)
        # -log p[y] = log s + (M - x[y]) and -mean(log p) = log s - mean(x - M):
        # no term is the difference of two huge numbers.
        log_s = math.log(np.float64(s))
        # A term of weight 0 is left out, not multiplied by 0: the nll is inf when the logits' spread
        # overflows, and the mean may be -inf (0 * inf = NaN).
        row_loss = 0.0
        if eps != 1.0:
            row_loss = (1.0 - eps) * (log_s + (np.float64(m) - np.float64(x[y])))
        if eps != 0.0:
            row_loss += eps * (log_s - mean_d)
        loss[i] = row_loss
        _rescale(g, mb, m, like(m, 1.0) / s * like(m, scale), like(m, eps / classes * scale))
        g[y] -= like(m, (1.0 - eps) * scale)


@njit(parallel=True, cache=True, error_model="numpy")
def _ce_parallel(logits, labels, eps, ignore_index, use_ignore, scale, loss, grad):
    batch = logits.shape[0]
    outer = set_chunksize(1)  # each block of rows a work item of its own (see _schedule)
    for t in prange((batch + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _ce_rows(logits, labels, t * ROWS_PER_TASK, min(batch, (t + 1) * ROWS_PER_TASK),
                 eps, ignore_index, use_ignore, scale, loss, grad)
    set_chunksize(outer)


def softmax_cross_entropy(logits, labels, label_smoothing, ignore_index, reduction, bad_label_error):
    """Fused loss and gradient; see ``Backend.softmax_cross_entropy``."""
    batch, classes = logits.shape
    # An ignore_index beyond int64 can equal no label: switch ignoring off.
    use_ignore = -(2**63) <= ignore_index < 2**63
    ignore = ignore_index if use_ignore else 0
    bad, kept = scan_labels(labels, classes, ignore, use_ignore)
    if bad >= 0:
        raise bad_label_error(int(labels[bad]), int(bad), classes, ignore_index)
    if reduction == "mean":
        scale = 1.0 / kept if kept else 0.0
    else:
        scale = 1.0
    grad = np.empty_like(logits)
    loss = np.empty(batch, np.float64)
    if logits.size >= PARALLEL_MIN:
        _ce_parallel(logits, labels, float(label_smoothing), ignore, use_ignore, scale, loss, grad)
    else:
        _ce_rows(logits, labels, 0, batch, float(label_smoothing), ignore, use_ignore, scale, loss, grad)
    if reduction == "none":
        return loss.astype(logits.dtype), grad
    return np.asarray(loss.sum() * scale, dtype=logits.dtype), grad


@njit(cache=True, error_model="numpy")
def _softmax_rows(x, r0, r1, out, log):
    mb = np.empty((x.shape[1] + BLOCK - 1) // BLOCK, x.dtype)
    inv_n = like(x[0, 0], 1.0 / x.shape[1])
    for i in range(r0, r1):
        row = x[i]
        o = out[i]
        m, s, _ = row_exp(row, o, mb, inv_n)
        if log:
            # (x - M) - log s, as the reference: M + log s would absorb log s
            # when M is huge.
            log_s = like(m, math.log(np.float64(s)))
            for j in range(row.size):
                o[j] = (row[j] - m) - log_s
        else:
            _rescale(o, mb, m, like(m, 1.0) / s, like(m, 0.0))


@njit(parallel=True, cache=True, error_model="numpy")
def _softmax_parallel(x, out, log):
    batch = x.shape[0]
    outer = set_chunksize(1)
    for t in prange((batch + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _softmax_rows(x, t * ROWS_PER_TASK, min(batch, (t + 1) * ROWS_PER_TASK), out, log)
    set_chunksize(outer)


def softmax(x, log=False):
    """Softmax (or log-softmax) over the last axis of a C-contiguous 2-D array."""
    out = np.empty_like(x)
    if x.size >= PARALLEL_MIN:
        _softmax_parallel(x, out, log)
    else:
        _softmax_rows(x, 0, x.shape[0], out, log)
    return out
