"""The Numba backend against the NumPy reference, op by op.

Tolerances: float64 rtol 1e-10; float32 rtol 1e-4 and atol 1e-5, both
scaled by sqrt(reduction length) where an op sums (GEMM over K, db over the
batch). Shapes include 1x1, primes, sizes that are not multiples of any
tile or block (MR 6, NR 16/8, KC 256, MC 120, NC 512), K spanning several
K blocks, and non-contiguous / transposed inputs.
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
from nnfast.activations import ACTIVATIONS, BY_NAME, saves_input  # noqa: E402
from nnfast.backends.numba_backend import NumbaBackend  # noqa: E402
from nnfast.backends.numpy_backend import NumpyBackend  # noqa: E402

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


def alpha_of(act):
    param = BY_NAME[act].parameter
    return param.default if param is not None else None


# ------------------------------------------------------------------ linear
def check_linear(rng, dtype, M, K, N, act, bias=True, need_dx=True, layout="c"):
    x = rand(rng, (M, K), dtype)
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rand(rng, (N,), dtype) if bias else None
    if layout == "t":  # transposed views: not C-contiguous
        x = np.ascontiguousarray(x.T).T
        W = np.ascontiguousarray(W.T).T
    elif layout == "s":  # strided views
        x = np.repeat(x, 2, axis=1)[:, ::2]
        W = np.repeat(W, 2, axis=0)[::2]
    y, saved = NB.linear_forward(x, W, b, act)
    yr, savedr = REF.linear_forward(x, W, b, act)
    assert_close(y, yr, dtype, K, f"y {act}")
    assert_close(saved, savedr, dtype, K, f"saved {act}")
    dy = rand(rng, (M, N), dtype)
    dx, dW, db = NB.linear_backward(dy, x, W, saved, act, has_bias=bias, need_dx=need_dx)
    dxr, dWr, dbr = REF.linear_backward(dy, x, W, savedr, act, has_bias=bias, need_dx=need_dx)
    assert_close(dW, dWr, dtype, M, f"dW {act}")
    if bias:
        assert_close(db, dbr, dtype, M, f"db {act}")
    else:
        assert db is None
    if need_dx:
        assert_close(dx, dxr, dtype, N, f"dx {act}")
    else:
        assert dx is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_linear_every_activation(dtype, act):
    rng = np.random.default_rng(ACTIVATIONS.index(act))
    check_linear(rng, dtype, 23, 37, 19, act)
    check_linear(rng, dtype, 1, 1, 1, act, bias=False, need_dx=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, act", [
    ((256, 784, 1024), "relu"),      # the training shape: parallel, several N blocks
    ((130, 600, 700), "gelu"),       # ragged in every block dimension
    ((97, 1031, 53), "identity"),    # K over four K blocks, prime sizes
    ((7, 2053, 11), "tanh"),         # long K, tiny M and N
    ((300, 5, 520), "silu"),         # tiny K, N just over one N block
])
def test_linear_large(dtype, shape, act):
    check_linear(np.random.default_rng(1), dtype, *shape, act)


def test_linear_backward_identity_ignores_saved():
    rng = np.random.default_rng(10)
    x, W, dy = rand(rng, (5, 4), np.float32), rand(rng, (4, 3), np.float32), rand(rng, (5, 3), np.float32)
    for saved in (None, np.zeros((2, 2), np.float64)):
        dx, dW, db = NB.linear_backward(dy, x, W, saved, "identity")
        dxr, dWr, dbr = REF.linear_backward(dy, x, W, None, "identity")
        assert_close(dx, dxr, np.float32, 3)
        assert_close(dW, dWr, np.float32, 5)
        assert_close(db, dbr, np.float32, 5)


@pytest.mark.parametrize("layout", ["t", "s"])
def test_linear_non_contiguous(layout):
    rng = np.random.default_rng(2)
    for dtype in DTYPES:
        check_linear(rng, dtype, 29, 41, 33, "relu", layout=layout)


@SETTINGS
@given(M=SIZES, K=SIZES, N=SIZES, act=st.sampled_from(ACTIVATIONS), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_hypothesis(M, K, N, act, dtype, bias, seed):
    check_linear(np.random.default_rng(seed), dtype, M, K, N, act, bias=bias)


def test_gemm_microkernel_uses_avx2_fma():
    """The micro-kernel compiles to packed FMAs on 256-bit registers."""
    from nnfast.backends.numba_kernels import gemm
    from nnfast.backends.numba_kernels._simd import addr

    micro = numba.njit(error_model="numpy")(gemm._micro.py_func)

    @numba.njit
    def drive(buf):
        p = addr(buf)
        micro(4, p, 0, p, 0, p, p, 0, 16, False, False, p, -1, False)

    drive(np.zeros(4096, np.float32))
    asm = "\n".join(micro.inspect_asm().values())
    assert re.search(r"vfmadd\w*ps\s+[^\n]*ymm", asm), "no packed ymm FMA in the micro-kernel"


# ------------------------------------------------------------- activations
def activation_data(rng, dtype, n):
    x = rand(rng, n, dtype, 4.0)
    # Beyond softplus's threshold, far negative, and exact zeros.
    extra = np.array([0.0, -0.0, 20.5, 25.0, -30.0, -90.0, 19.99, 1e-6, -1e-6], dtype)
    return np.concatenate([x, extra])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("n", [1, 37, 200_003])  # serial and parallel paths
def test_activation(dtype, act, n):
    rng = np.random.default_rng(n)
    x = activation_data(rng, dtype, n)
    if n == 37:
        x = x.reshape(2, 23)[:, ::-1]  # 2-D, non-contiguous
    y = NB.activation_forward(x, act)
    yr = REF.activation_forward(x, act)
    assert_close(y, yr, dtype, what=f"forward {act}")
    saved = x if saves_input(act) else yr
    dy = rand(rng, x.shape, dtype)
    assert_close(NB.activation_backward(dy, saved, act), REF.activation_backward(dy, saved, act),
                 dtype, what=f"backward {act}")


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


@pytest.mark.parametrize("act, alpha", [("leaky_relu", 0.2), ("leaky_relu", 0.0), ("elu", 0.5), ("elu", 2.0)])
def test_activation_alpha(act, alpha):
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        x = activation_data(rng, dtype, 1000)
        y = NB.activation_forward(x, act, alpha)
        assert_close(y, REF.activation_forward(x, act, alpha), dtype)
        dy = rand(rng, x.shape, dtype)
        assert_close(NB.activation_backward(dy, y, act, alpha), REF.activation_backward(dy, y, act, alpha), dtype)
        yl, sl = NB.linear_forward(x[:60].reshape(6, 10), np.eye(10, dtype=dtype), None, act, alpha)
        assert_close(yl, REF.activation_forward(x[:60].reshape(6, 10), act, alpha), dtype)


# ------------------------------------------------------ softmax / softmax-CE
@SETTINGS
@given(batch=SIZES, classes=st.one_of(SIZES, st.sampled_from([255, 256, 257, 1000, 1031])),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_softmax_log_softmax(batch, classes, dtype, seed):
    x = rand(np.random.default_rng(seed), (batch, classes), dtype, 5.0)
    assert_close(NB.softmax(x), REF.softmax(x), dtype, classes)
    assert_close(NB.log_softmax(x), REF.log_softmax(x), dtype, classes)


def check_ce(rng, dtype, batch, classes, smoothing, reduction, ignore_index=-100, ignore_frac=0.3, scale=5.0):
    logits = rand(rng, (batch, classes), dtype, scale)
    labels = rng.integers(0, classes, batch)
    labels[rng.random(batch) < ignore_frac] = ignore_index
    kw = dict(label_smoothing=smoothing, ignore_index=ignore_index, reduction=reduction)
    loss, grad = NB.softmax_cross_entropy(logits, labels, **kw)
    lossr, gradr = REF.softmax_cross_entropy(logits, labels, **kw)
    assert_close(loss, lossr, dtype, batch * classes if reduction != "none" else classes, "loss")
    assert_close(grad, gradr, dtype, classes, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_softmax_ce(dtype, reduction, smoothing):
    rng = np.random.default_rng(4)
    check_ce(rng, dtype, 64, 10, smoothing, reduction)
    check_ce(rng, dtype, 1, 1, smoothing, reduction, ignore_frac=0.0)
    check_ce(rng, dtype, 300, 1000, smoothing, reduction, ignore_index=3)  # parallel path


@SETTINGS
@given(batch=SIZES, classes=st.one_of(SIZES, st.sampled_from([257, 1000])), dtype=st.sampled_from(DTYPES),
       smoothing=st.floats(0.0, 1.0), reduction=st.sampled_from(["mean", "sum", "none"]),
       seed=st.integers(0, 2**16))
def test_softmax_ce_hypothesis(batch, classes, dtype, smoothing, reduction, seed):
    check_ce(np.random.default_rng(seed), dtype, batch, classes, smoothing, reduction)


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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_ce_all_ignored(reduction):
    for dtype in DTYPES:
        logits = rand(np.random.default_rng(6), (4, 7), dtype)
        loss, grad = NB.softmax_cross_entropy(logits, np.full(4, -100), label_smoothing=0.2, reduction=reduction)
        assert np.all(np.asarray(loss) == 0) and not np.isnan(loss).any()
        assert np.all(grad == 0)
        assert loss.dtype == dtype


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


# --------------------------------------------------------------- optimizers
def make_state(rng, dtype, shapes):
    return [rand(rng, s, dtype) for s in shapes]


SHAPES = [(1,), (13, 7), (300, 500), (31,)]  # (300, 500) takes the parallel path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0),
                                                    (0.9, True, 0.01), (0.5, False, 0.1)])
def test_sgd(dtype, momentum, nesterov, wd):
    rng = np.random.default_rng(8)
    params = make_state(rng, dtype, SHAPES)
    grads = make_state(rng, dtype, SHAPES)
    vel = make_state(rng, dtype, SHAPES) if momentum else []
    p2, v2 = [p.copy() for p in params], [v.copy() for v in vel]
    for _ in range(3):
        NB.sgd_update(params, grads, vel, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
        REF.sgd_update(p2, grads, v2, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for a, b in zip(params + vel, p2 + v2):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd, decoupled", [(0.0, True), (0.01, True), (0.01, False)])
def test_adam(dtype, wd, decoupled):
    rng = np.random.default_rng(9)
    params = make_state(rng, dtype, SHAPES)
    m = make_state(rng, dtype, SHAPES)
    v = [np.abs(a) for a in make_state(rng, dtype, SHAPES)]
    ref = [[a.copy() for a in group] for group in (params, m, v)]
    for step in (1, 2, 3):
        grads = make_state(rng, dtype, SHAPES)
        kw = dict(step=step, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, decoupled=decoupled)
        NB.adam_update(params, grads, m, v, **kw)
        REF.adam_update(ref[0], grads, ref[1], ref[2], **kw)
    for a, b in zip(params + m + v, ref[0] + ref[1] + ref[2]):
        assert_close(a, b, dtype)


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
