"""The CUDA kernels on the CPU emulation at the edges of their inputs.

* values: logits with a large common offset (x - max must be formed before log(sum) is
  taken off), rows at the float limits, activations of huge inputs, and
  ``tests/test_properties.py``'s huge-value and edge-row properties;
* labels: several bad labels in one batch, handled by one thread in different passes of its
  loop, by different warps, in rows of different blocks: the error names the first;
* layouts: softmax, log-softmax and cross-entropy of views that start one element into their
  buffer (the backend must copy them to an aligned buffer first).

Each check is a function of a backend; the ``slow`` tests at the end run it on a copy of the
kernels with one bug put in on purpose and require it to fail.
See tests/cuda_emulation.py and CONTRIBUTING.md.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import cuda_emulation as emu
from emulation_support import REFERENCE, assert_caught, assert_close, mutant, run_property_test
from nnfast.activations import ACTIVATIONS, saves_input
from op_table import OPS

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]


# ===================================================================== the property suite's huge regimes
#: The huge regime of every op of the op driver (tests/op_table.py) whose comparison has one
#: (tests/test_properties.py's COMPARISONS: activations, softmax, log-softmax, cross-entropy), and the
#: deterministic edge rows.
HUGE_ENTRIES = [entry.name for entry in OPS if entry.ops[0] in
                ("activation_forward", "softmax", "log_softmax", "softmax_cross_entropy")]
HUGE_PROPERTY_CASES = (
    [("test_matches_reference", (name, "huge")) for name in HUGE_ENTRIES]
    + [("test_cross_entropy_with_huge_logits_is_never_nan", ())]
    + [("test_cross_entropy_edge_rows_are_never_nan", (r,)) for r in ("mean", "sum", "none")]
    + [("test_full_smoothing_of_an_overflowing_row_is_not_nan", (r,)) for r in ("mean", "sum", "none")]
)


@pytest.mark.parametrize("test_name,args", HUGE_PROPERTY_CASES)
def test_huge_value_properties_on_the_emulated_gpu(kernel_modules, monkeypatch, test_name, args):
    run_property_test(monkeypatch, test_name, args)


# ===================================================================== precision at large logits
def _within(got, truth, dtype, units, length, what, relative=True):
    """|got - truth| <= units * eps * (|truth| + sqrt(length)), element-wise.

    ``truth`` is float64. Rounding every operation of a correct row kernel once costs well
    under one such unit (the x - max of a row is exact, log(sum) is off by a few eps); a
    value that went through max + log(sum) before x was taken off is off by half an ulp of
    the logits, thousands of units at logits near 1e5. Values beyond max / 16 of the dtype
    match any value beyond it of the same sign (one side may round to inf); NaN matches NaN.
    """
    dtype = np.dtype(dtype)
    g, t = np.asarray(got, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    assert g.shape == t.shape, f"{what}: shape {g.shape}, expected {t.shape}"
    eps, big = np.finfo(dtype).eps, np.finfo(dtype).max / 16
    with np.errstate(invalid="ignore", over="ignore"):
        bound = units * eps * ((np.abs(t) if relative else 0.0) + math.sqrt(length))
        ok = (np.abs(g - t) <= bound) | (np.isnan(g) & np.isnan(t))
        ok |= (np.abs(t) > big) & (np.abs(g) > big) & (np.sign(g) == np.sign(t))
    if not ok.all():
        bad = [tuple(int(i) for i in k) for k in np.argwhere(~ok)[:4]]
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} values off by more than {units} eps units, "
                             f"e.g. (index, got, expected) {[(k, float(g[k]), float(t[k])) for k in bad]}")


def _logit_regimes(dtype, rng, widths):
    """(name, logits) rows that stress the order of the operations of the row kernels."""
    for cols in widths:
        n = rng.standard_normal((3, cols))
        yield f"1e5 + N(0, 3), {cols} columns", 1e5 + 3 * n
        yield f"-1e5 + N(0, 3), {cols} columns", -1e5 + 3 * n
        yield f"1e4 + N(0, 30), {cols} columns", 1e4 + 30 * n
        yield f"N(0, 1e4), {cols} columns", 1e4 * n
        dominant = n.copy()
        dominant[:, cols // 2] = 1e5
        yield f"one logit at 1e5, {cols} columns", dominant
    limit = float(np.finfo(dtype).max)
    yield "rows at the float limits", np.array([[0.9 * limit, -0.9 * limit, 0.0, 1.0],
                                                [0.9 * limit, 0.9 * limit, 0.9 * limit, -1.0],
                                                [-0.9 * limit, -0.9 * limit, -0.5 * limit, -0.9 * limit]])


def check_rows_at_large_logits(gpu, dtypes=DTYPES, widths=(37, 1029)):
    """Softmax, log-softmax and cross-entropy (loss per row and gradient) within a few eps
    of the float64 result, for logits with a large common offset or at the float limits.
    ``widths``: row lengths (37: one warp per row; 1029: one block of 128 threads per row)."""
    rng = np.random.default_rng(31)
    for dtype in dtypes:
        for name, x in _logit_regimes(dtype, rng, widths):
            x = x.astype(dtype)
            exact = x.astype(np.float64)
            cols = x.shape[1]
            what = f"{dtype} {name}"
            with np.errstate(over="ignore"):
                _within(gpu.to_numpy(gpu.log_softmax(gpu.asarray(x))), REFERENCE.log_softmax(exact), dtype, 8,
                        cols, f"log_softmax {what}")
                _within(gpu.to_numpy(gpu.softmax(gpu.asarray(x))), REFERENCE.softmax(exact), dtype, 8, cols,
                        f"softmax {what}", relative=False)
                labels = np.argmax(x, axis=1)  # the loss is log(sum): small, and relative error shows
                labels[1::2] = rng.integers(0, cols, size=labels[1::2].size)
                for smoothing in (0.0, 0.1):
                    loss, grad = gpu.softmax_cross_entropy(gpu.asarray(x), gpu.asarray(labels), reduction="none",
                                                           label_smoothing=smoothing)
                    loss_e, grad_e = REFERENCE.softmax_cross_entropy(exact, labels, reduction="none",
                                                                     label_smoothing=smoothing)
                    what_ce = f"{what} smoothing {smoothing}"
                    _within(gpu.to_numpy(grad), grad_e, dtype, 8, cols, f"ce grad {what_ce}", relative=False)
                    _within(gpu.to_numpy(loss), loss_e, dtype, 8, cols, f"ce loss {what_ce}")


def test_rows_at_large_logits(gpu):
    check_rows_at_large_logits(gpu)


def check_activations_at_extreme_inputs(gpu, dtypes=DTYPES, activations=ACTIVATIONS):
    """Every activation, forward and backward, at the special and huge values of the property
    suite (overflowing x * x and x**3 inside the formulas), against the reference."""
    props = pytest.importorskip("test_properties")
    for dtype in dtypes:
        x = np.array(props.SPECIALS[dtype] + props.HUGE[dtype], dtype=dtype)
        dy = np.linspace(-2.0, 2.0, x.size).astype(dtype)
        for activation in activations:
            with np.errstate(all="ignore"):
                y_e = REFERENCE.activation_forward(x, activation)
                dx_e = REFERENCE.activation_backward(dy, x if saves_input(activation) else y_e, activation)
            xs = gpu.asarray(x)
            y = gpu.activation_forward(xs, activation)
            dx = gpu.activation_backward(gpu.asarray(dy), xs if saves_input(activation) else y, activation)
            props.assert_close(gpu.to_numpy(y), y_e, dtype, what=f"{activation} forward {dtype}")
            props.assert_close(gpu.to_numpy(dx), dx_e, dtype, what=f"{activation} backward {dtype}")


def test_activations_at_extreme_inputs(gpu):
    check_activations_at_extreme_inputs(gpu)


# ===================================================================== several bad labels
# ce_prepare runs one block of 512 threads over the rows: thread t looks at rows t, t + 512,
# t + 1024, ... and the block keeps the smallest bad row it saw.
BAD_ROW_SETS = [
    [5, 517, 1029],  # one thread, three passes of its loop
    [600, 1050, 530],  # threads 88, 26 and 18 of the second and third passes
    [1099, 511, 40, 3],  # the last row, the last warp, warps 1 and 0
]


def check_first_bad_label_is_reported(gpu):
    rng = np.random.default_rng(32)
    rows, cols = 1100, 3  # eight rows per block of ce_rows: the bad rows are in different blocks
    logits = gpu.asarray(rng.standard_normal((rows, cols)).astype(np.float32))
    for bad_rows in BAD_ROW_SETS:
        labels = rng.integers(0, cols, size=rows)
        labels[rng.random(rows) < 0.2] = -100
        for k, r in enumerate(bad_rows):  # a distinct label per row: the message names both
            labels[r] = (-7 - k) if k % 2 else cols + 10 + k
        first = min(bad_rows)
        loss, _ = gpu.softmax_cross_entropy(logits, gpu.asarray(labels))
        with pytest.raises(ValueError, match=rf"got {labels[first]} at row {first}$"):
            gpu.to_numpy(loss)


def test_first_bad_label_is_reported(gpu):
    check_first_bad_label_is_reported(gpu)


# ===================================================================== misaligned views
def check_rows_of_misaligned_views(gpu):
    """Rows that start one element into their buffer: the backend gives the kernels an
    aligned copy (input and output rows must share their address modulo 16)."""
    rng = np.random.default_rng(33)
    cp = gpu.xp
    for dtype in DTYPES:
        for rows, cols in [(9, 33), (3, 1029), (2, 8)]:
            x = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
            labels = rng.integers(0, cols, size=rows)
            labels[::3] = -100
            buf = cp.empty(rows * cols + 1, dtype)
            buf[1:] = x.ravel()
            view = buf[1:].reshape(rows, cols)
            label_buf = cp.empty(rows + 1, np.int64)
            label_buf[1:] = labels
            what = f"{dtype} {(rows, cols)} offset by one element"
            assert_close(gpu.to_numpy(gpu.softmax(view)), REFERENCE.softmax(x), cols, dtype, f"softmax {what}")
            assert_close(gpu.to_numpy(gpu.log_softmax(view)), REFERENCE.log_softmax(x), cols, dtype,
                         f"log_softmax {what}")
            for reduction in ("mean", "none"):
                got = gpu.softmax_cross_entropy(view, label_buf[1:], label_smoothing=0.1, reduction=reduction)
                expected = REFERENCE.softmax_cross_entropy(x, labels, label_smoothing=0.1, reduction=reduction)
                for name, g, e in zip(("loss", "grad"), got, expected):
                    assert_close(gpu.to_numpy(g), e, cols, dtype, f"cross-entropy {reduction} {name} {what}")


def test_rows_of_misaligned_views(gpu):
    check_rows_of_misaligned_views(gpu)


@pytest.fixture
def gpu(kernel_modules):
    with emu.emulated_cupy_backend() as backend:
        yield backend


# ===================================================================== the bugs these catch
# (id, file, function (None: anywhere in the file), text, replacement, check). The checks
# are narrowed to what shows the bug: each instantiation a mutant launches is built anew.
_LARGE_LOGITS = functools.partial(check_rows_at_large_logits, dtypes=[np.dtype(np.float32)], widths=(37,))
MUTANTS = [
    # log-softmax as x - (max + log(sum)): max + log(sum) rounds to the logits' ulp
    ("log-softmax-rounds-lse", "softmax.cu", None, "return (x - m) - log_s;", "return x - (m + log_s);",
     _LARGE_LOGITS),
    ("ce-grad-rounds-lse", "cross_entropy.cu", "operator", "m_exp((x - m) - log_s)", "m_exp(x - (m + log_s))",
     _LARGE_LOGITS),
    ("ce-loss-rounds-lse", "cross_entropy.cu", "ce_rows", "(acc.m - xr[label]) + log_s",
     "(acc.m + log_s) - xr[label]", _LARGE_LOGITS),
    # the mean logit of the smoothing term summed from the logits themselves, not from their
    # distances to one of the row's values: near 1e5 it cancels to the float ulp of 1e5
    ("ce-smoothing-mean-cancels", "cross_entropy.cu", "ce_rows", "acc(inv_classes, xr[0])", "acc(inv_classes, T(0))",
     _LARGE_LOGITS),
    # gelu_tanh' without its clip: x * x overflows and 0 * inf is NaN beyond |x| ~ 1e19
    ("gelu-tanh-grad-unclipped", "common.cuh", None, "x_in > T(10) ? T(10) : (x_in < T(-10) ? T(-10) : x_in)",
     "x_in", functools.partial(check_activations_at_extreme_inputs, dtypes=[np.dtype(np.float32)],
                               activations=["gelu_tanh"])),
    # each thread keeps the last bad row it saw, or the block the last warp's
    ("bad-label-last-of-thread", "cross_entropy.cu", "ce_prepare", "first_bad = r < first_bad ? r : first_bad;",
     "first_bad = r;", check_first_bad_label_is_reported),
    ("bad-label-last-of-block", "cross_entropy.cu", "ce_prepare", "bad = scratch[w] < bad ? scratch[w] : bad;",
     "bad = scratch[w] < rows ? scratch[w] : bad;", check_first_bad_label_is_reported),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,file,function,old,new,check", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_bug_at_the_edges_is_caught(tmp_path, name, file, function, old, new, check):
    assert_caught(name, check, kernel_dir=mutant(tmp_path, file, function, old, new))


@pytest.mark.slow
def test_rows_kernels_given_a_misaligned_view_trap(kernel_modules, monkeypatch):
    """Without the aligning copy the input and output rows differ modulo 16 bytes: the
    vector stores of the row kernels are misaligned, which the emulation traps on."""
    from nnfast.backends.cupy_backend import CupyBackend

    monkeypatch.setattr(CupyBackend, "_aligned_rows", lambda self, x: x)
    with pytest.raises(emu.EmulationError, match="misaligned"):
        with emu.emulated_cupy_backend() as gpu:
            check_rows_of_misaligned_views(gpu)
