"""Self-test checks of the row ops: softmax, log-softmax and the fused softmax cross-entropy.

Row lengths come from the CUDA kernels' row-thread table
(:data:`nnfast.backends.cuda_launch.ROW_THREADS`): the longest row each
thread count serves, and one longer than any (a warp per row up to 1023
classes, then a block of 128, 256 and 512 threads). Each op is also given a
view one element into its buffer and logits near +-1e4 (a max-subtraction
left out would overflow). The cross-entropy runs every reduction with and
without label smoothing, ignored rows (the default ``ignore_index`` and one
that is also a valid class), a batch whose every row is ignored, and bad
labels: the error must be raised, name the first bad row and its label, and
leave the backend working (a correct call right after it must match the
reference).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..backends.cuda_launch import ROW_THREADS
from ..ops import REDUCTIONS
from .check import Check, CheckFailed, Context, dims
from .compare import Pair

#: (rows, classes) of a short row, then the longest row of each row-thread count, then a longer one.
ROW_SHAPES = ((17, 10),) + tuple((9 if threads == 32 else 3, limit - 1) if limit is not None else (2, 40003)
                                 for limit, threads in ROW_THREADS)
#: Logits near the float32 limit of exp's argument, differences that matter.
HUGE = np.array([[1e4, -1e4, 0.0, 9999.0], [-3e3, -3e3, -3e3, -3e3 + 1]])
#: The cross-entropy settings every reduction runs with (label smoothing 0 and 0.1).
SMOOTHINGS = (0.0, 0.1)
#: Rows (and their labels) of the bad-label check: the first bad one is row 3.
BAD_LABELS = {3: 1000, 5: -7}


def _logits(ctx: Context, rows: int, classes: int) -> np.ndarray:
    return ctx.normal(rows, classes, scale=4.0)


# ------------------------------------------------------------------ softmax / log-softmax
def _softmax_run(op: str, shape: tuple[int, int] | None, offset: int = 0):
    def run(ctx: Context) -> list[Pair]:
        x = _logits(ctx, *shape) if shape is not None else HUGE.astype(ctx.dtype)
        y = getattr(ctx.backend, op)(ctx.put(x, offset))
        return [Pair("y", ctx.get(y), getattr(ctx.reference, op)(ctx.wide(x)))]
    return run


def softmax_checks() -> Iterator[Check]:
    for op in ("softmax", "log_softmax"):
        for shape in ROW_SHAPES:
            yield Check("softmax", f"{op} rows of {shape[1]}", dims(*shape), (op,), _softmax_run(op, shape),
                        length=shape[1])
        yield Check("softmax", f"{op} misaligned view", dims(5, 33) + " +1", (op,), _softmax_run(op, (5, 33), 1),
                    length=33)
        yield Check("softmax", f"{op} logits near ±1e4", dims(*HUGE.shape), (op,), _softmax_run(op, None),
                    length=HUGE.shape[1])


# ------------------------------------------------------------------ cross-entropy
def _labels(ctx: Context, rows: int, classes: int, ignored: int | None = -100) -> np.ndarray:
    labels = ctx.rng.integers(0, classes, size=rows)
    if ignored is not None and rows > 4:
        labels[1::4] = ignored
    return labels


def _ce_pairs(ctx: Context, logits: np.ndarray, labels: np.ndarray, offset: int = 0, **options: Any) -> list[Pair]:
    loss, grad = ctx.backend.softmax_cross_entropy(ctx.put(logits, offset), ctx.backend.asarray(labels), **options)
    ref_loss, ref_grad = ctx.reference.softmax_cross_entropy(ctx.wide(logits), labels, **options)
    return [Pair("loss", ctx.get(loss), ref_loss), Pair("dlogits", ctx.get(grad), ref_grad)]


def _ce_run(shape: tuple[int, int], offset: int = 0, ignored: int | None = -100, **options: Any):
    def run(ctx: Context) -> list[Pair]:
        rows, classes = shape
        return _ce_pairs(ctx, _logits(ctx, rows, classes), _labels(ctx, rows, classes, ignored), offset, **options)
    return run


def _ce_huge(ctx: Context) -> list[Pair]:
    return _ce_pairs(ctx, HUGE.astype(ctx.dtype), np.array([3, 0]), label_smoothing=0.1)


def _ce_all_ignored(ctx: Context) -> list[Pair]:
    return _ce_pairs(ctx, _logits(ctx, 6, 7), np.full(6, -100), label_smoothing=0.1)


def _ce_bad_label(ctx: Context) -> list[Pair]:
    """Bad labels raise ``ValueError`` naming the first (on the GPU, when the loss is read); then all is well."""
    be = ctx.backend
    rows, classes = 8, 10
    logits = _logits(ctx, rows, classes)
    labels = _labels(ctx, rows, classes, ignored=None)
    for row, label in BAD_LABELS.items():
        labels[row] = label
    first = min(BAD_LABELS)
    try:
        loss, _ = be.softmax_cross_entropy(ctx.put(logits), be.asarray(labels))
        be.to_numpy(loss)
        be.synchronize()
    except ValueError as err:
        text = str(err)
        if f"got {BAD_LABELS[first]} at row {first}" not in text:
            raise CheckFailed(f"the error does not name label {BAD_LABELS[first]} at row {first}: {text}") from None
    else:
        raise CheckFailed(f"no ValueError for label {BAD_LABELS[first]} at row {first} of {classes} classes")
    good = _labels(ctx, rows, classes, ignored=None)
    result = _ce_pairs(ctx, logits, good, label_smoothing=0.1)
    be.synchronize()  # an error left pending by the bad call would surface here
    return result


def cross_entropy_checks() -> Iterator[Check]:
    ops = ("softmax_cross_entropy",)
    shape = (33, 1000)
    for reduction in REDUCTIONS:
        for smoothing in SMOOTHINGS:
            yield Check("cross_entropy", f"cross_entropy[{reduction}, smoothing {smoothing:g}] ignored rows",
                        dims(*shape), ops, _ce_run(shape, reduction=reduction, label_smoothing=smoothing),
                        length=shape[1])
    yield Check("cross_entropy", "cross_entropy[mean] ignore_index=2, a valid class", dims(5, 4), ops,
                _ce_run((5, 4), ignored=2, ignore_index=2, label_smoothing=0.2), length=4)
    for rows_classes in ROW_SHAPES:
        yield Check("cross_entropy", f"cross_entropy[mean, smoothing 0.1] rows of {rows_classes[1]}",
                    dims(*rows_classes), ops, _ce_run(rows_classes, label_smoothing=0.1), length=rows_classes[1])
    yield Check("cross_entropy", "cross_entropy misaligned view", dims(5, 33) + " +1", ops,
                _ce_run((5, 33), offset=1, label_smoothing=0.1), length=33)
    yield Check("cross_entropy", "cross_entropy logits near ±1e4", dims(*HUGE.shape), ops, _ce_huge,
                length=HUGE.shape[1])
    yield Check("cross_entropy", "cross_entropy every row ignored", dims(6, 7), ops, _ce_all_ignored, length=7)
    yield Check("cross_entropy", "cross_entropy bad labels raise, name row 3, backend usable", dims(8, 10), ops,
                _ce_bad_label, length=10)


__all__ = ["BAD_LABELS", "HUGE", "ROW_SHAPES", "SMOOTHINGS", "cross_entropy_checks", "softmax_checks"]
