"""The Numba backend against the NumPy reference: the op table at the sizes its kernels care about.

Every entry of the tests' op driver (``tests/op_table.py``) runs at shapes
that are not multiples of any tile or block (MR 6, NR 16/8, KC 256, MC 120,
NC 512), with K spanning several K blocks, and on both sides of the
parallel thresholds, with the op table's tolerances. Then what only this
backend has: the GEMM micro-kernel's instructions, special values through
the float32 polynomial math, the bad-label and overflow paths of the fused
cross-entropy, ``NNFAST_NUM_THREADS``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nnfast.backends import backend_for  # noqa: E402
from nnfast.bench.machine import ThreadLimits  # noqa: E402
from nnfast.activations import ACTIVATIONS, saves_input  # noqa: E402
from nnfast.backends.numba_backend import NumbaBackend  # noqa: E402
from nnfast.backends.numpy_backend import NumpyBackend  # noqa: E402

from op_table import OPS, assert_matches_reference  # noqa: E402

NB = NumbaBackend()
REF = NumpyBackend()
DTYPES = [np.float32, np.float64]
SETTINGS = settings(max_examples=12, deadline=None)
# Interesting sizes: 1, primes, around the tile sizes, around the block sizes.
SIZES = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 5, 6, 7, 8, 13, 16, 17, 31, 97, 121, 127, 257]))


def assert_close(got, want, dtype, reduce_len=1, what=""):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    scale = max(1.0, float(np.sqrt(reduce_len)))
    if np.dtype(dtype) == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-10 * scale, atol=1e-12 * scale, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4 * scale, atol=1e-5 * scale, err_msg=what)


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------------ the op table at the kernels' sizes
# Sizes that matter to the Numba kernels: around the register tile (MR 6, NR 16 / 8), the blocks
# (KC 256, MC 120, NC 512), several K blocks, and the thresholds of the parallel paths.
KERNEL_SHAPES = {
    "linear_forward": [(23, 37, 19), (1, 1, 1), (256, 784, 1024), (130, 600, 700), (97, 1031, 53),
                       (7, 2053, 11), (300, 5, 520)],
    "activation_forward": [(1,), (2, 23), (200_003,)],
    "softmax": [(64, 10), (1, 1), (300, 1000), (5, 1031)],
    "log_softmax": [(64, 10), (1, 1), (300, 1000), (5, 1031)],
    "softmax_cross_entropy": [(64, 10), (1, 1), (300, 1000)],
    "sgd_update": [(1,), (13, 7), (300, 500), (31,)],
    "adam_update": [(1,), (13, 7), (300, 500), (31,)],
}
# Hypothesis-drawn sizes of the same ops.
DRAWN_SHAPES = {
    "linear_forward": st.tuples(SIZES, SIZES, SIZES),
    "softmax": st.tuples(SIZES, st.one_of(SIZES, st.sampled_from([255, 256, 257, 1000, 1031]))),
    "log_softmax": st.tuples(SIZES, st.one_of(SIZES, st.sampled_from([255, 256, 257, 1000, 1031]))),
    "softmax_cross_entropy": st.tuples(SIZES, st.one_of(SIZES, st.sampled_from([257, 1000]))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_op_table_at_kernel_sizes(op, dtype):
    rng = np.random.default_rng(sum(map(ord, op.name)))
    for sample in op.samples(rng, np.dtype(dtype), shapes=KERNEL_SHAPES[op.ops[0]]):
        assert_matches_reference(op, NB, REF, sample, dtype, "numba")


@SETTINGS
@given(op=st.sampled_from([op for op in OPS if op.ops[0] in DRAWN_SHAPES]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16), data=st.data())
def test_op_table_at_drawn_sizes(op, dtype, seed, data):
    shape = data.draw(DRAWN_SHAPES[op.ops[0]], label="shape")
    for sample in op.samples(np.random.default_rng(seed), np.dtype(dtype), shapes=[shape]):
        assert_matches_reference(op, NB, REF, sample, dtype, "numba")


def test_linear_backward_identity_ignores_saved():
    rng = np.random.default_rng(10)
    x, W, dy = rand(rng, (5, 4), np.float32), rand(rng, (4, 3), np.float32), rand(rng, (5, 3), np.float32)
    for saved in (None, np.zeros((2, 2), np.float64)):
        dx, dW, db = NB.linear_backward(dy, x, W, saved, "identity")
        dxr, dWr, dbr = REF.linear_backward(dy, x, W, None, "identity")
        assert_close(dx, dxr, np.float32, 3)
        assert_close(dW, dWr, np.float32, 5)
        assert_close(db, dbr, np.float32, 5)


# (M, K, N): A read in place (column blocks of at most IN_PLACE_A_MAX_COLS) and packed; full and edge
# panels of MR rows, several K blocks, one thread and two.
GEMM_PATH_SHAPES = [(13, 300, 10), (131, 37, 100), (128, 784, 256), (20, 600, 1030), (127, 513, 140)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_reads_a_in_place_and_packed(trans_a, trans_b, dtype):
    from nnfast.backends.numba_kernels import gemm

    rng = np.random.default_rng(7)
    in_place = set()
    for m, k, n in GEMM_PATH_SHAPES:
        for workers in (1, 2):
            in_place.add(gemm.split(m, n, k, workers)[1] <= gemm.IN_PLACE_A_MAX_COLS)
        a = rand(rng, (k, m) if trans_a else (m, k), dtype)
        b = rand(rng, (n, k) if trans_b else (k, n), dtype)
        bias = rand(rng, n, dtype)
        want = np.maximum((a.T if trans_a else a) @ (b.T if trans_b else b) + bias, 0)
        for threads in (1, 2):
            limits = ThreadLimits(threads, None, [])  # Numba's threads (at most those configured)
            try:
                got, _ = gemm.gemm(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation="relu")
            finally:
                limits.undo()
            assert_close(got, want, dtype, k, f"{m}x{k}x{n} on {threads} threads")
    assert in_place == {True, False}, "the shapes no longer cover both ways of reading A"


def test_gemm_cached_descriptors_follow_each_call(monkeypatch):
    """gemm() reuses a descriptor per shape and epilogue: a call of one shape with another bias, activation
    slope or saved pre-activation gets its own, and the cache stays bounded."""
    from nnfast.backends.numba_kernels import gemm

    rng = np.random.default_rng(3)
    a, b = rand(rng, (40, 70), np.float32), rand(rng, (70, 30), np.float32)
    product = a @ b
    for bias in (None, rand(rng, 30, np.float32), rand(rng, 30, np.float32)):
        for alpha in (0.1, 0.3):
            for save_z in (False, True):
                y, z = gemm.gemm(a, b, bias=bias, activation="leaky_relu", alpha=alpha, save_z=save_z)
                pre = product if bias is None else product + bias
                assert_close(y, np.where(pre > 0, pre, np.float32(alpha) * pre), np.float32, 70, f"alpha {alpha}")
                assert (z is not None) == save_z
                if save_z:
                    assert_close(z, pre, np.float32, 70)
    monkeypatch.setattr(gemm, "MAX_CACHED", 4)
    ws = gemm.workspace(np.float32)
    for n in range(1, 12):
        got, _ = gemm.gemm(a[:, :n].copy(), b[:n].copy())
        assert_close(got, a[:, :n] @ b[:n], np.float32, n)
        assert len(ws.descriptors) <= 4


def _k_loops(asm):
    """The basic blocks of ``asm`` that jump back to their own label and hold at least 12 FMAs (the micro-kernel's
    K loops), each as its list of instruction names."""
    loops, label, body = [], None, []
    for line in asm.splitlines():
        head = re.match(r"^(\.?\w+):", line)
        if head:
            label, body = head.group(1), []
        elif line.startswith("\t") and not line.lstrip().startswith("."):
            fields = line.split()
            body.append(fields[0])
            if fields[0].startswith("j") and len(fields) > 1 and fields[1] == label:
                loops.append(body)
    return [b for b in loops if sum(op.startswith("vfmadd") for op in b) >= 12]


def test_gemm_task_k_loops_are_packed_fmas():
    """The GEMM task as it runs (compiled afresh: cached code cannot be read back) has two K loops, on a packed A
    panel and on A read in place, each of packed FMAs on 256-bit registers whose A addresses are a base plus a
    constant multiple of the stride, not the end of a chain of additions."""
    from numba import types

    from nnfast.backends.numba_kernels import gemm

    asm = gemm._task_cfunc(types.float32, cache=False)._library.get_asm_str()
    loops = _k_loops(asm)
    assert len(loops) >= 2, f"{len(loops)} micro-kernel K loops in the GEMM task"
    for loop in loops:
        fmas = sum(op.startswith("vfmadd") for op in loop)
        adds = sum(op.startswith(("add", "sub", "lea", "inc", "dec")) for op in loop)
        assert fmas % 12 == 0, loop
        assert adds <= fmas // 4, f"{adds} integer additions per {fmas} FMAs in a K loop: {loop}"
    assert re.search(r"vfmadd231ps\s+%ymm", asm), "no packed ymm FMAs in the GEMM task"


# ------------------------------------------------------------- activations
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_float32_activation_loops_are_vectorised(act, direction):
    """Each activation's float32 loop works on SIMD vectors, unless its formula calls the C library."""
    from nnfast.activations import CODES
    from nnfast.backends.numba_kernels import activations

    make = activations._forward_loop if direction == "forward" else activations._backward_loop
    ir = make(CODES[act], numba.float32, cache=False).inspect_llvm()  # cached code cannot be inspected
    if not re.search(r"<\d+ x float>", ir):
        calls = re.findall(r"call [^@\n]*@(\w+)\(float", ir)
        assert calls, f"{act} {direction}: no vector instruction and no C library call"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_specials(dtype, act):
    """NaN stays NaN where the reference gives NaN; +-inf and huge inputs match it."""
    x = np.array([np.nan, np.inf, -np.inf, 3e37, -3e37, 1e19, -1e19, 0.0, 1.0], dtype)
    with np.errstate(all="ignore"):
        yr = REF.activation_forward(x, act)
        saved = x if saves_input(act) else yr
        gr = REF.activation_backward(np.ones_like(x), saved, act)
    y = NB.activation_forward(x, act)
    g = NB.activation_backward(np.ones_like(x), saved, act)
    for got, want in ((y, yr), (g, gr)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------ softmax / softmax-CE
def check_ce(rng, dtype, batch, classes, smoothing, reduction, ignore_index=-100, ignore_frac=0.3, scale=5.0):
    logits = rand(rng, (batch, classes), dtype, scale)
    labels = rng.integers(0, classes, batch)
    labels[rng.random(batch) < ignore_frac] = ignore_index
    kw = dict(label_smoothing=smoothing, ignore_index=ignore_index, reduction=reduction)
    loss, grad = NB.softmax_cross_entropy(logits, labels, **kw)
    lossr, gradr = REF.softmax_cross_entropy(logits, labels, **kw)
    assert_close(loss, lossr, dtype, batch * classes if reduction != "none" else classes, "loss")
    assert_close(grad, gradr, dtype, classes, "grad")


def test_softmax_ce_extreme_logits():
    rng = np.random.default_rng(5)
    for dtype in DTYPES:
        check_ce(rng, dtype, 50, 300, 0.1, "mean", scale=300.0)  # exp underflows for most entries
        logits = np.zeros((3, 5), dtype)
        logits[:, 0] = 1e4 if dtype == np.float64 else 80.0
        loss, grad = NB.softmax_cross_entropy(logits, np.array([0, 1, 2]))
        lossr, gradr = REF.softmax_cross_entropy(logits, np.array([0, 1, 2]))
        assert_close(loss, lossr, dtype, 15)
        assert_close(grad, gradr, dtype, 5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.9])
def test_softmax_ce_huge_logits(smoothing):
    """Logits near the float32 maximum: no overflow of sum(x), no cancellation in the loss."""
    for logits in ([[3e38]], [[3e38, 3e38]], [[3e38, -3e38, 0.0]], [[-3e38, -3e38]], [[3e38, -1.3e-4, 6.4e-4]]):
        logits = np.array(logits, np.float32)
        labels = np.zeros(1, np.int64)
        with np.errstate(all="ignore"):
            lossr, gradr = REF.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
        loss, grad = NB.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
        np.testing.assert_allclose(loss, lossr, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grad, gradr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, row", [([0, 1, 7, 2], 2), ([-1, 0, 0, 0], 0), ([0, 0, 0, -101], 3),
                                      ([-100, 2**40, 0, 0], 1)])
def test_softmax_ce_bad_label(bad, row):
    logits = np.zeros((4, 7), np.float32)
    with pytest.raises(ValueError, match=rf"got {bad[row]} at row {row}"):
        NB.softmax_cross_entropy(logits, np.array(bad))
    with pytest.raises(ValueError, match="labels"):
        NB.softmax_cross_entropy(np.zeros((4000, 7), np.float32), np.array(bad * 1000))


def test_softmax_ce_custom_ignore_index():
    rng = np.random.default_rng(7)
    for ignore in (0, 5, -1, 2**70):
        check_ce(rng, np.float64, 40, 6, 0.1, "mean", ignore_index=ignore if ignore < 2**63 else -100)
    logits = rand(rng, (3, 4), np.float64)
    loss, _ = NB.softmax_cross_entropy(logits, np.array([0, 1, 2]), ignore_index=2**70)
    assert_close(loss, REF.softmax_cross_entropy(logits, np.array([0, 1, 2]), ignore_index=2**70)[0], np.float64)


# ---------------------------------------------------------- registry / env
def test_registry_picks_numba():
    assert backend_for("numba").name == "numba"
    assert isinstance(backend_for("numba"), NumbaBackend)


def _run(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_num_threads_env():
    code = (
        "import numba, numpy as np\n"
        "from nnfast.backends.numba_backend import NumbaBackend\n"
        "b = NumbaBackend()\n"
        "y = b.activation_forward(np.ones(1 << 17, np.float32), 'relu')\n"
        "print(b.num_threads, numba.get_num_threads(), float(y.sum()))\n"
    )
    out = _run(code, NNFAST_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", str(float(1 << 17))]
    in_thread = (
        "import threading, numba, numpy as np\n"
        "from nnfast.backends.numba_backend import NumbaBackend\n"
        "b = NumbaBackend()\n"
        "seen = []\n"
        "def work():\n"
        "    b.activation_forward(np.ones(8, np.float32), 'relu')\n"
        "    seen.append(numba.get_num_threads())\n"
        "t = threading.Thread(target=work); t.start(); t.join()\n"
        "print(seen[0])\n"
    )
    other = _run(in_thread, NNFAST_NUM_THREADS="1")
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == ["1"]
    bad = _run(code, NNFAST_NUM_THREADS="zero")
    assert bad.returncode != 0 and "NNFAST_NUM_THREADS" in bad.stderr
