"""Cross-backend property tests: hypothesis drives every op of the backend contract.

For every op (activations forward/backward, fused linear forward/backward,
softmax, log-softmax, softmax cross-entropy, SGD and Adam updates) hypothesis
draws shapes, dtypes, activations, ``alpha``, label smoothing, reductions,
``ignore_index`` patterns (every row ignored included), memory layouts
(C, Fortran, negative strides, strided views) and extreme values (logits
+-1e4, +-3e38 in float32, +-1e300 in float64, denormals, signed zeros), and

* compares every fast backend with the NumPy reference (``FAST_BACKENDS``),
  for every entry of the op driver (``tests/op_table.py``, derived from the
  library's op and activation tables: ``test_matches_reference``);
* checks properties that hold on every backend (``AVAILABLE``): finite input
  gives finite output, softmax rows sum to 1, an all-ignored batch gives
  loss 0 and gradient 0;
* checks the reference's backward against float64 central finite differences,
  within the bound derived in ``tests/finite_differences.py``.

Example counts come from the hypothesis profile (``tests/conftest.py``):
``ci`` (the default, derandomised), ``explore`` (as many, at random) or
``HYPOTHESIS_PROFILE=thorough`` (>= 1000 per test, at random).
Each test below covers one op (and backend), so those counts are per op.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nnfast.backends import backend_for
from nnfast.activations import ACTIVATIONS, BY_NAME, saves_input

from finite_differences import check_element, value_bounds
from op_table import AVAILABLE, FAST_BACKENDS, OPS, OPS_BY_NAME, Sample

REF = backend_for("numpy")
DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]

# Values hypothesis injects into otherwise Gaussian arrays, per dtype: "moderate" ones (signed
# zeros, denormals, +-1e4, the softplus threshold, exp's overflow edge) and "huge" ones, whose
# intermediate results (x * x, x**3, logit spreads) overflow the dtype.
SPECIALS = {
    np.dtype(np.float32): [0.0, -0.0, 1e4, -1e4, 1e-40, -1e-40, 1.4e-45, 20.0, -20.0, 88.0, -88.0, 0.5, -0.5],
    np.dtype(np.float64): [0.0, -0.0, 1e4, -1e4, 1e-310, -5e-324, 20.0, -20.0, 710.0, -745.0, 0.5, -0.5],
}
HUGE = {
    np.dtype(np.float32): [3e38, -3e38, 3.4e38, -3.4e38, 1e19, -1e19, 1e30, -1e30],
    np.dtype(np.float64): [1e300, -1e300, 1.7e308, -1.7e308, 1e154, -1e154, 1e200, -1e200],
}
# Logits per regime: scale of the Gaussian part.
LOGIT_SCALES = [1e-3, 1.0, 5.0, 50.0, 1e4]

every_backend = pytest.mark.parametrize("name", AVAILABLE)

# Defects these tests find in a backend, while they are being fixed: (backend, op, regime) -> reason.
# Each is an expected failure (not strict: the test passes by itself once the kernel is fixed, and
# the entry goes).
KNOWN_ISSUES: dict[tuple[str, str, str], str] = {
    ("cupy", "softmax_cross_entropy", "full smoothing"):
        "ce_rows weighs the nll term by 1 - s = 0 instead of leaving it out: 0 * inf is NaN when the "
        "logit spread overflows (seen on the CPU emulation of kernels/cross_entropy.cu)",
    ("numba", "softmax_cross_entropy", "full smoothing"):
        "float64: the fused kernel weighs the nll term by 1 - s = 0 instead of leaving it out: 0 * inf is NaN "
        "when the logit spread overflows float64 (float32 is computed in float64 and stays inf)",
}


def backend_activation_params(names, issue):
    """``(name, activation)`` pairs, those of a known issue marked as expected failures."""
    params = []
    for name in names:
        for activation in ACTIVATIONS:
            reason = KNOWN_ISSUES.get((name, activation, issue))
            marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
            params.append(pytest.param(name, activation, marks=marks, id=f"{activation}-{name}"))
    return params or [pytest.param("none", "identity", marks=pytest.mark.skip(reason="no fast backend can run here"))]


# ----------------------------------------------------------------- strategies
@st.composite
def float_arrays(draw, shape, dtype, specials=True, scales=(1e-3, 1.0, 3.0, 30.0), huge=False):
    """A Gaussian array of ``dtype`` with hypothesis-chosen special values at chosen places.

    ``huge`` puts at least one value from :data:`HUGE` in (and allows more).
    """
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = (rng.standard_normal(shape) * draw(st.sampled_from(scales))).astype(dtype)
    if (specials or huge) and a.size:
        flat = a.reshape(-1)
        pool = SPECIALS[dtype] + (HUGE[dtype] if huge else [])
        for _ in range(draw(st.integers(0, min(a.size, 6)))):
            flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(pool))
        if huge:
            flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(HUGE[dtype]))
    return a


@st.composite
def layouts(draw, a):
    """``a``'s values in a hypothesis-chosen memory layout (C, Fortran, negative strides, strided)."""
    if a.ndim == 0:
        return a
    kind = draw(st.sampled_from(["c", "f", "reversed", "strided"]))
    if kind == "f":
        return np.asfortranarray(a)
    if kind == "reversed":
        axis = draw(st.integers(0, a.ndim - 1))
        flipped = np.ascontiguousarray(np.flip(a, axis))
        view = np.flip(flipped, axis)
        assert view.strides[axis] < 0 or a.shape[axis] == 1
        return view
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _alpha(draw, activation):
    if BY_NAME[activation].parameter is not None:
        return draw(st.one_of(st.none(), st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.5])))
    return None


# ----------------------------------------------------------------- comparison helpers
def _host(backend, a):
    return None if a is None else np.asarray(backend.to_numpy(a))


def assert_close(got, expected, dtype, rtol=None, atol=None, what=""):
    """Element-wise ``|g - e| <= atol + rtol |e|``; NaN matches NaN; an overflowed value matches one."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, reference {expected.shape}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, reference {expected.dtype}"
    # Defaults: the op table's stated tolerances for element-wise ops.
    if rtol is None:
        rtol = 1e-4 if dtype == np.float32 else 1e-9
    if atol is None:
        atol = 1e-5 if dtype == np.float32 else 1e-12
    g, e = got.astype(np.float64), expected.astype(np.float64)
    # Values beyond max/16 may legitimately round to inf on one side and not the other.
    huge = np.finfo(dtype).max / 16
    over = (np.abs(e) > huge) & (np.abs(g) > huge) & (np.sign(e) == np.sign(g))
    both_nan = np.isnan(g) & np.isnan(e)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = over | both_nan | (np.abs(g - e) <= atol + rtol * np.abs(e))
    if not ok.all():
        bad = np.argwhere(~ok.reshape(got.shape) if got.ndim else ~ok)[:5]
        pairs = [(tuple(int(i) for i in k), got[tuple(k)], expected[tuple(k)]) for k in bad] if got.ndim \
            else [((), got, expected)]
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} elements differ, e.g. "
                             f"(index, got, reference) {pairs}")


# Step of the finite differences: small enough that a perturbed weight (times inputs up to ~100)
# moves a pre-activation by far less than the kink margin below; the bound in
# tests/finite_differences.py accounts for the rounding noise a small step brings.
FD_STEP = 1e-6


def _check_gradients(f, arrays, grads, bounds, data, count=6):
    """Compare analytic ``grads`` with finite differences of ``f`` at hypothesis-chosen elements.

    ``bounds`` is :func:`finite_differences.value_bounds` of the op: the tolerance is derived
    there from the step, the value scale and a bound on the third derivative.
    """
    for name, analytic in grads.items():
        for _ in range(min(count, analytic.size)):
            k = data.draw(st.integers(0, analytic.size - 1), label=f"{name} element")
            index = np.unravel_index(k, analytic.shape)
            check_element(f, arrays, name, index, float(analytic[index]), bounds, FD_STEP)


def _kinks(activation):
    """Points where the activation's derivative (or, for softplus, its value) jumps."""
    return BY_NAME[activation].kinks


def _away_from_kinks(x, activation, margin=1e-3):
    for k in _kinks(activation):
        if np.any(np.abs(x - k) < margin):
            return False
    return True


# ================================================================= activations
@st.composite
def activation_cases(draw, activation, extremes=True, huge=False):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
    x = draw(float_arrays(shape, dtype, specials=extremes, huge=huge))
    dy = draw(float_arrays(shape, dtype, specials=False, scales=(1.0,)))
    return dtype, x, dy, _alpha(draw, activation)


def _activation_run(backend, x, dy, activation, alpha):
    xb, dyb = backend.asarray(x), backend.asarray(dy)
    y = backend.activation_forward(xb, activation, alpha)
    saved = xb if saves_input(activation) else y
    dx = backend.activation_backward(dyb, saved, activation, alpha)
    return _host(backend, y), _host(backend, dx)


def _compare_activation(name, entry, data, huge):
    activation = entry.activation
    dtype, x, dy, alpha = data.draw(activation_cases(activation, huge=huge))
    x_view, dy_view = data.draw(layouts(x)), data.draw(layouts(dy))
    backend = backend_for(name)
    with np.errstate(all="ignore"):
        ey, edx = _activation_run(REF, x, dy, activation, alpha)
        gy, gdx = _activation_run(backend, x_view, dy_view, activation, alpha)
    assert_close(gy, ey, dtype, what=f"{name} {activation} forward")
    assert_close(gdx, edx, dtype, what=f"{name} {activation} backward")


@pytest.mark.parametrize("name,activation", backend_activation_params(AVAILABLE, "overflow"))
@given(data=st.data())
def test_activation_finite_in_finite_out(name, activation, data):
    """Finite x (up to +-3e38, denormals included) and finite dy give finite y and dx, same shape and dtype."""
    dtype, x, dy, alpha = data.draw(activation_cases(activation, huge=data.draw(st.booleans())))
    if activation == "leaky_relu" and alpha is not None and alpha > 1:
        x = np.clip(x, -np.finfo(dtype).max / alpha, None)  # alpha * x itself must be representable
    backend = backend_for(name)
    with np.errstate(all="ignore"):
        y, dx = _activation_run(backend, data.draw(layouts(x)), dy, activation, alpha)
    for label, out in (("forward", y), ("backward", dx)):
        assert out.shape == x.shape and out.dtype == dtype, f"{label}: {out.shape} {out.dtype} for {x.shape} {dtype}"
        assert np.isfinite(out).all(), f"{name} {activation} {label}: non-finite {out[~np.isfinite(out)][:5]} " \
                                       f"for x {x[~np.isfinite(out)][:5]}"


@pytest.mark.parametrize("name,activation", backend_activation_params(AVAILABLE, "nan"))
@given(data=st.data())
def test_activation_propagates_nan(name, activation, data):
    """A NaN input gives a NaN output in that position and leaves the others alone (as the reference)."""
    dtype, x, dy, alpha = data.draw(activation_cases(activation, extremes=False))
    assume(x.ndim > 0)
    k = data.draw(st.integers(0, x.size - 1))
    x.reshape(-1)[k] = np.nan
    y, _ = _activation_run(backend_for(name), x, dy, activation, alpha)
    assert np.isnan(y.reshape(-1)[k])
    assert np.isfinite(np.delete(y.reshape(-1), k)).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@given(data=st.data())
def test_activation_reference_matches_finite_differences(activation, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    x = data.draw(float_arrays(shape, np.float64, specials=False, scales=(0.3, 3.0, 12.0)))
    dy = data.draw(float_arrays(shape, np.float64, specials=False, scales=(1.0,)))
    assume(_away_from_kinks(x, activation))
    alpha = _alpha(data.draw, activation)
    op = OPS_BY_NAME[f"activation_{activation}"]
    options = {"activation": activation, "alpha": alpha}
    _, grads = op.value_and_grad(REF, Sample({"x": x, "dy": dy}, options, ("x",)))
    value = lambda arrays: op.value_and_grad(REF, Sample(arrays, options, ("x",)))[0]  # noqa: E731
    arrays = {"x": x, "dy": dy}
    _check_gradients(value, arrays, grads, value_bounds("activation", arrays, options), data)


# ================================================================= fused linear
@st.composite
def linear_cases(draw, activation, dtype=None, extremes=True):
    dtype = dtype or draw(st.sampled_from(DTYPES))
    batch, n_in, n_out = draw(st.integers(1, 17)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    x = draw(float_arrays((batch, n_in), dtype, specials=False))
    if extremes and draw(st.booleans()):  # zeros and denormals in x (no overflow: matmul sums differ)
        flat = x.reshape(-1)
        for _ in range(draw(st.integers(1, 4))):
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([0.0, -0.0, 1e-40, 1e-310]))
    W = draw(float_arrays((n_in, n_out), dtype, specials=False, scales=(1.0,))) / dtype.type(math.sqrt(n_in))
    b = draw(float_arrays((n_out,), dtype, specials=False, scales=(1.0,))) if draw(st.booleans()) else None
    dy = draw(float_arrays((batch, n_out), dtype, specials=False, scales=(1.0,)))
    alpha = _alpha(draw, activation)
    return dtype, x, W, b, dy, alpha, draw(st.booleans())


def _linear_run(backend, x, W, b, dy, activation, alpha, need_dx):
    xb, Wb = backend.asarray(x), backend.asarray(W)
    bb = None if b is None else backend.asarray(b)
    y, saved = backend.linear_forward(xb, Wb, bb, activation, alpha)
    dx, dW, db = backend.linear_backward(backend.asarray(dy), xb, Wb, saved, activation, alpha,
                                         has_bias=b is not None, need_dx=need_dx)
    return [_host(backend, t) for t in (y, saved, dx, dW, db)]


def _compare_linear(name, entry, data, huge):
    activation = entry.activation
    dtype, x, W, b, dy, alpha, need_dx = data.draw(linear_cases(activation))
    views = [data.draw(layouts(a)) for a in (x, W)]
    b_view = None if b is None else data.draw(layouts(b))
    backend = backend_for(name)
    expected = _linear_run(REF, x, W, b, dy, activation, alpha, need_dx)
    got = _linear_run(backend, *views, b_view, data.draw(layouts(dy)), activation, alpha, need_dx)
    length = max(x.shape[1], x.shape[0], W.shape[1])
    for label, g, e in zip(("y", "saved", "dx", "dW", "db"), got, expected):
        if e is None:
            assert g is None, f"{label}: expected None (has_bias={b is not None}, need_dx={need_dx})"
            continue
        scale = max(float(np.abs(e).max()), 1.0)
        atol = (1e-5 * math.sqrt(length) if dtype == np.float32 else 1e-12 * length) * scale
        assert_close(g, e, dtype, rtol=1e-4 if dtype == np.float32 else 1e-9, atol=atol,
                     what=f"{name} linear_{activation} {label}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@given(data=st.data())
def test_linear_reference_matches_finite_differences(activation, data):
    _, x, W, b, dy, alpha, _ = data.draw(linear_cases(activation, np.dtype(np.float64), extremes=False))
    z = x @ W + (0 if b is None else b)
    assume(_away_from_kinks(z, activation))
    arrays = {"x": x, "W": W, "dy": dy} | ({} if b is None else {"b": b})

    def value(a):
        y, _ = REF.linear_forward(a["x"], a["W"], a.get("b"), activation, alpha)
        return float(np.sum(y * a["dy"]))

    _, saved, dx, dW, db = _linear_run(REF, x, W, b, dy, activation, alpha, True)
    grads = {"x": dx, "W": dW} | ({} if b is None else {"b": db})
    bounds = value_bounds("linear", arrays, {"activation": activation, "alpha": alpha})
    _check_gradients(value, arrays, grads, bounds, data, count=4)


# ================================================================= softmax / log-softmax
@st.composite
def logit_cases(draw, dtype=None, extremes=True, max_classes=40, huge=False):
    dtype = dtype or draw(st.sampled_from(DTYPES))
    batch, classes = draw(st.integers(1, 12)), draw(st.integers(1, max_classes))
    # Without extremes (finite differences), logits stay where an h of 1e-6 resolves the loss.
    scales = LOGIT_SCALES if extremes else LOGIT_SCALES[:-1]
    logits = draw(float_arrays((batch, classes), dtype, specials=extremes, scales=scales, huge=huge))
    if huge and draw(st.booleans()):  # a whole row at the float maximum: sums of logits overflow
        logits[draw(st.integers(0, batch - 1))] = draw(st.sampled_from(HUGE[dtype]))
    return dtype, logits


def _compare_softmax(name, entry, data, huge):
    op = entry.name
    dtype, x = data.draw(logit_cases(huge=huge))
    backend = backend_for(name)
    expected = _host(REF, getattr(REF, op)(x))
    got = _host(backend, getattr(backend, op)(backend.asarray(data.draw(layouts(x)))))
    length = x.shape[1]
    atol = 1e-6 * math.sqrt(length) if dtype == np.float32 else 1e-13 * length
    if op == "log_softmax":  # log-probabilities: absolute error scales with the logits
        atol *= max(float(np.abs(np.where(np.isfinite(expected), expected, 0)).max()), 1.0)
    assert_close(got, expected, dtype, atol=atol, what=f"{name} {op}")


@every_backend
@given(data=st.data())
def test_softmax_rows_are_distributions(name, data):
    """Finite logits (+-3e38 included): probabilities in [0, 1] summing to 1, log-probabilities <= 0."""
    dtype, x = data.draw(logit_cases(huge=data.draw(st.booleans())))
    backend = backend_for(name)
    p = _host(backend, backend.softmax(backend.asarray(x)))
    logp = _host(backend, backend.log_softmax(backend.asarray(x)))
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-12)
    assert not np.isnan(logp).any() and (logp <= 0).all()
    # The row maximum has the largest probability.
    rows = np.arange(x.shape[0])
    assert (p[rows, x.argmax(axis=1)] >= p.max(axis=1)).all()


# ================================================================= softmax cross-entropy
IGNORE_INDICES = [-100, -1, 0, 3, 2**31]


@st.composite
def ce_cases(draw, dtype=None, extremes=True, huge=False):
    dtype, logits = draw(logit_cases(dtype, extremes, huge=huge))
    batch, classes = logits.shape
    ignore_index = draw(st.sampled_from(IGNORE_INDICES))
    labels = np.asarray(draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)))
    pattern = draw(st.sampled_from(["none", "some", "all"]))
    if pattern == "all":
        labels[:] = ignore_index
    elif pattern == "some":
        mask = np.asarray(draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
        labels[mask] = ignore_index
    labels = labels.astype(draw(st.sampled_from([np.int64, np.int32, np.int64])) if abs(ignore_index) < 2**31
                           else np.int64)
    smoothing = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.1]), st.floats(0.0, 1.0)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return dtype, logits, labels, {"label_smoothing": smoothing, "ignore_index": ignore_index,
                                   "reduction": reduction}


def _ce_run(backend, logits, labels, options):
    loss, grad = backend.softmax_cross_entropy(backend.asarray(logits), backend.asarray(labels), **options)
    return _host(backend, loss), _host(backend, grad)


CE_OVERFLOW_ISSUE = KNOWN_ISSUES.get(("numba", "softmax_cross_entropy", "huge"))


def _ce_backends(names, issue):
    params = [pytest.param(n, marks=[pytest.mark.xfail(reason=issue, strict=False)] if issue and n == "numba"
                           else []) for n in names]
    return params or [pytest.param("none", marks=pytest.mark.skip(reason="no fast backend can run here"))]


def _compare_cross_entropy(name, entry, data, huge):
    dtype, logits, labels, options = data.draw(ce_cases(huge=huge))
    backend = backend_for(name)
    with np.errstate(all="ignore"):
        eloss, egrad = _ce_run(REF, logits, labels, options)
        gloss, ggrad = _ce_run(backend, data.draw(layouts(logits)), data.draw(layouts(labels)), options)
    length = logits.shape[1]
    scale = max(float(np.abs(np.where(np.isfinite(eloss), eloss, 0)).max()), 1.0)
    atol = (1e-5 * math.sqrt(length) if dtype == np.float32 else 1e-12 * length)
    assert_close(gloss, eloss, dtype, atol=atol * scale, what=f"{name} cross-entropy loss {options}")
    assert_close(ggrad, egrad, dtype, atol=atol, what=f"{name} cross-entropy dlogits {options}")


@pytest.mark.parametrize("name", _ce_backends(AVAILABLE, None))
@given(data=st.data())
def test_cross_entropy_is_never_nan(name, data):
    """Finite logits: the loss is >= 0 (inf only past the float range) and dlogits is finite and bounded.

    Ignored rows contribute exactly 0 loss and 0 gradient; an all-ignored
    ``"mean"`` is 0 (not NaN); each kept row's gradient sums to 0.
    """
    _check_cross_entropy_health(name, data, huge=False)


@pytest.mark.parametrize("name", _ce_backends(AVAILABLE, CE_OVERFLOW_ISSUE))
@given(data=st.data())
def test_cross_entropy_with_huge_logits_is_never_nan(name, data):
    _check_cross_entropy_health(name, data, huge=True)


def _check_cross_entropy_health(name, data, huge):
    dtype, logits, labels, options = data.draw(ce_cases(huge=huge))
    backend = backend_for(name)
    with np.errstate(all="ignore"):
        loss, grad = _ce_run(backend, logits, labels, options)
    ignored = labels == options["ignore_index"]
    assert not np.isnan(loss).any() and (loss >= 0).all(), f"loss {loss}"
    if np.abs(logits).max() <= 1e4:
        assert np.isfinite(loss).all(), f"loss {loss} for |logits| <= 1e4"
    assert grad.shape == logits.shape and grad.dtype == dtype
    assert np.isfinite(grad).all() and (np.abs(grad) <= 1 + 1e-6).all()
    assert (grad[ignored] == 0).all(), "an ignored row has a non-zero gradient"
    if options["reduction"] == "none":
        assert loss.shape == (logits.shape[0],) and (loss[ignored] == 0).all()
    else:
        assert loss.shape == ()
    if ignored.all():
        assert (loss == 0).all() and (grad == 0).all()
    kept_sums = grad[~ignored].astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(kept_sums, 0.0, atol=(1e-5 if dtype == np.float32 else 1e-12) * logits.shape[1])


EDGE_ROWS = [  # (logits row, label, smoothing): overflowing sums and spreads, smoothing that rounds to 0
    ([3e38, -1.3e-4, 6.4e-4], 0, 2.9e-212), ([3e38, -3e38], 0, 1e-50), ([3e38, -3e38], 0, 0.0),
    ([3e38, -3e38], 1, 0.0), ([3e38, 3e38], 0, 0.0), ([3e38, 3e38], 1, 0.1), ([3e38], 0, 0.1),
    ([-3e38, -3e38, -3e38], 2, 1.0), ([1e-45, -1e-45], 1, 0.5), ([3.4e38, -3.4e38, 0.0], 2, 0.3),
]


@pytest.mark.parametrize("name", _ce_backends(AVAILABLE, CE_OVERFLOW_ISSUE))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_edge_rows_are_never_nan(name, reduction):
    backend = backend_for(name)
    for row, label, smoothing in EDGE_ROWS:
        logits = np.asarray([row], dtype=np.float32)
        with np.errstate(all="ignore"):
            loss, grad = _ce_run(backend, logits, np.array([label]),
                                 {"label_smoothing": smoothing, "reduction": reduction})
        what = f"{name} row {row} label {label} smoothing {smoothing}: loss {loss}, dlogits {grad}"
        assert not np.isnan(loss).any() and (loss >= 0).all(), what
        assert np.isfinite(grad).all() and abs(float(grad.sum())) < 1e-5, what
        if max(row) - min(row) < 3.4e38:  # the loss itself is representable: it must be finite
            assert np.isfinite(loss).all(), what


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(reason=KNOWN_ISSUES[key], strict=False)]
                                              if (key := (n, "softmax_cross_entropy", "full smoothing")) in KNOWN_ISSUES
                                              else []) for n in AVAILABLE])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_smoothing_of_an_overflowing_row_is_inf_not_nan(name, reduction):
    """Label smoothing 1 gives the nll term weight 0: leaving it out (not 0 * inf) keeps the loss inf, not NaN."""
    backend = backend_for(name)
    for dtype, big in ((np.float32, 3e38), (np.float64, 1.7e308)):
        with np.errstate(all="ignore"):
            loss, grad = _ce_run(backend, np.array([[big, -big], [0.5, -0.5]], dtype=dtype), np.array([1, 0]),
                                 {"label_smoothing": 1.0, "reduction": reduction})
        assert not np.isnan(loss).any() and np.isinf(loss.reshape(-1)[0]), (dtype, loss)
        assert np.isfinite(grad).all(), (dtype, grad)


@given(data=st.data())
def test_cross_entropy_reference_matches_finite_differences(data):
    _, logits, labels, options = data.draw(ce_cases(np.dtype(np.float64), extremes=False))
    arrays = {"logits": logits, "labels": labels}
    if options["reduction"] == "none":
        arrays["dloss"] = data.draw(float_arrays((logits.shape[0],), np.float64, specials=False))
    op = OPS_BY_NAME["softmax_cross_entropy"]
    _, grads = op.value_and_grad(REF, Sample(arrays, options, ("logits",)))
    value = lambda a: op.value_and_grad(REF, Sample(a, options, ("logits",)))[0]  # noqa: E731
    _check_gradients(value, arrays, grads, value_bounds("softmax_cross_entropy", arrays, options), data)


@pytest.mark.parametrize("kind,arrays,options,wrong", [
    # Label smoothing 0.01 left out of the gradient.
    ("softmax_cross_entropy", {"logits": np.array([[0.3, -1.2, 2.0], [1e-3, 2e-3, -1e-3]]),
                               "labels": np.array([2, 0])}, {"label_smoothing": 0.01, "reduction": "mean"},
     lambda g, a: g + 0.01 * (1 / 3 - np.eye(3)[a["labels"]]) / 2),
    # Logits of 1e-3 under full smoothing (gradients ~1e-4, loss log C): a gradient 1% too large.
    ("softmax_cross_entropy", {"logits": np.array([[1e-3, -2e-3, 5e-4, 0.0]]), "labels": np.array([1]),
                               "dloss": np.array([3.0])}, {"label_smoothing": 1.0, "reduction": "none"},
     lambda g, a: g * 1.01),
    # tanh's derivative taken from the input instead of the output: 1 - x^2 instead of 1 - y^2.
    ("activation", {"x": np.array([0.2, -0.7, 1.5]), "dy": np.array([1.0, -0.5, 2.0])}, {"activation": "tanh"},
     lambda g, a: a["dy"] * (1 - a["x"] ** 2)),
])
def test_finite_difference_bound_catches_a_wrong_gradient(kind, arrays, options, wrong):
    """The finite-difference tolerance passes the right gradient and fails a plausibly wrong one."""
    is_ce = kind == "softmax_cross_entropy"
    op = OPS_BY_NAME[kind if is_ce else f"activation_{options['activation']}"]
    wrt = ("logits",) if is_ce else ("x",)
    value = lambda a: op.value_and_grad(REF, Sample(a, options, wrt))[0]  # noqa: E731
    ((name, right),) = op.value_and_grad(REF, Sample(arrays, options, wrt))[1].items()
    bounds = value_bounds(kind, arrays, options)
    for index in np.ndindex(right.shape):
        check_element(value, arrays, name, index, float(right[index]), bounds, FD_STEP)
    bad = wrong(right, arrays)
    with pytest.raises(AssertionError, match="analytic"):
        for index in np.ndindex(right.shape):
            check_element(value, arrays, name, index, float(bad[index]), bounds, FD_STEP)


# ================================================================= optimizers
@st.composite
def optimizer_cases(draw, kind):
    dtype = draw(st.sampled_from(DTYPES))
    shapes = draw(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple), min_size=1, max_size=4))
    arrays = {}
    for i, shape in enumerate(shapes):
        arrays[f"p{i}"] = draw(float_arrays(shape, dtype, specials=False))
        arrays[f"g{i}"] = draw(float_arrays(shape, dtype, specials=False, scales=(1e-3, 1.0, 100.0)))
        arrays[f"m{i}"] = draw(float_arrays(shape, dtype, specials=False, scales=(0.1,)))
        arrays[f"v{i}"] = np.abs(draw(float_arrays(shape, dtype, specials=False, scales=(0.01,))))
    lr = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
    wd = draw(st.sampled_from([0.0, 0.0, 0.01, 0.5]))
    if kind == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        options = dict(lr=lr, momentum=momentum, nesterov=momentum > 0 and draw(st.booleans()), weight_decay=wd)
    else:
        options = dict(lr=lr, beta1=draw(st.sampled_from([0.0, 0.5, 0.9])),
                       beta2=draw(st.sampled_from([0.0, 0.9, 0.999])), eps=draw(st.sampled_from([1e-8, 1e-3])),
                       weight_decay=wd, decoupled=draw(st.booleans()))
    return dtype, len(shapes), arrays, options, draw(st.integers(1, 3))


def _optimizer_run(backend, kind, n, arrays, options, steps, views=None):
    views = views or {}
    # Copies: the NumPy backend's asarray returns the caller's array, updated in place.
    a = {k: backend.asarray(views[k] if k in views else v.copy()) for k, v in arrays.items()}
    params = [a[f"p{i}"] for i in range(n)]
    grads = [a[f"g{i}"] for i in range(n)]
    ms, vs = [a[f"m{i}"] for i in range(n)], [a[f"v{i}"] for i in range(n)]
    for step in range(1, steps + 1):
        if kind == "sgd":
            backend.sgd_update(params, grads, ms if options["momentum"] else [], **options)
        else:
            backend.adam_update(params, grads, ms, vs, step=step, **options)
    return [_host(backend, t) for t in params + ms + (vs if kind == "adam" else [])]


def _compare_optimizer(name, entry, data, huge):
    kind = entry.name.split("_")[0]  # "sgd" / "adam"
    dtype, n, arrays, options, steps = data.draw(optimizer_cases(kind))
    expected = _optimizer_run(REF, kind, n, arrays, options, steps)
    got = _optimizer_run(backend_for(name), kind, n, arrays, options, steps)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, dtype, rtol=1e-5 if dtype == np.float32 else 1e-12,
                     atol=1e-6 if dtype == np.float32 else 1e-14, what=f"{name} {kind} output {i} {options}")


@pytest.mark.parametrize("name", [n for n in AVAILABLE if n != "cupy"])  # views of host memory
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@given(data=st.data())
def test_optimizer_updates_strided_parameters_in_place(name, kind, data):
    """Parameters and states that are strided views are updated in place, as contiguous ones."""
    dtype, n, arrays, options, steps = data.draw(optimizer_cases(kind))
    backend = backend_for(name)
    expected = _optimizer_run(backend, kind, n, arrays, options, steps)
    views = {k: data.draw(layouts(v.copy())) for k, v in arrays.items()}
    got = _optimizer_run(backend, kind, n, arrays, options, steps, views=views)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, dtype, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=0.0,
                     what=f"{name} {kind} output {i}")


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@given(data=st.data())
def test_optimizer_reference_matches_float64_formula(kind, data):
    """The reference update equals PyTorch's rule written out in float64 (its 'finite difference')."""
    dtype, n, arrays, options, steps = data.draw(optimizer_cases(kind))
    got = _optimizer_run(REF, kind, n, arrays, options, steps)
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    lr, wd = options["lr"], options["weight_decay"]
    params, ms, vs = [], [], []
    for i in range(n):
        p, g, m, v = a[f"p{i}"].copy(), a[f"g{i}"], a[f"m{i}"].copy(), a[f"v{i}"].copy()
        for t in range(1, steps + 1):
            if kind == "sgd":
                d = g + wd * p
                if options["momentum"]:
                    m = options["momentum"] * m + d
                    d = d + options["momentum"] * m if options["nesterov"] else m
                p = p - lr * d
            else:
                b1, b2, eps = options["beta1"], options["beta2"], options["eps"]
                gg = g if options["decoupled"] else g + wd * p
                if options["decoupled"]:
                    p = p * (1 - lr * wd)
                m = b1 * m + (1 - b1) * gg
                v = b2 * v + (1 - b2) * gg * gg
                p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        params.append(p), ms.append(m), vs.append(v)
    expected = params + ms + (vs if kind == "adam" else [])
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e.astype(dtype), dtype, rtol=1e-4 if dtype == np.float32 else 1e-10,
                     atol=1e-5 if dtype == np.float32 else 1e-12, what=f"reference {kind} output {i} {options}")


# ================================================================= every op of the table against the reference
#: How an entry of the op driver (tests/op_table.py) is compared with the reference on hypothesis-drawn
#: input (shapes, dtypes, options, memory layouts, extreme values), by the library op it starts with,
#: and the regimes it is drawn in ("huge": values up to the float maximum, where x * x, x**3, logit sums and
#: spreads overflow inside the formulas).
COMPARISONS = {
    "activation_forward": (_compare_activation, ("normal", "huge")),
    "linear_forward": (_compare_linear, ("normal",)),
    "softmax": (_compare_softmax, ("normal", "huge")),
    "log_softmax": (_compare_softmax, ("normal", "huge")),
    "softmax_cross_entropy": (_compare_cross_entropy, ("normal", "huge")),
    "sgd_update": (_compare_optimizer, ("normal",)),
    "adam_update": (_compare_optimizer, ("normal",)),
}


def comparison_params(names):
    """``(backend, entry, regime)`` for every entry of the op driver; known issues marked as expected failures."""
    params = []
    for name in names:
        for entry in OPS:
            for regime in COMPARISONS[entry.ops[0]][1]:
                reason = KNOWN_ISSUES.get((name, entry.activation or entry.name, regime))
                marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
                params.append(pytest.param(name, entry.name, regime, marks=marks, id=f"{entry.name}-{regime}-{name}"))
    return params or [pytest.param("none", "softmax", "normal", marks=pytest.mark.skip(reason="no fast backend can run here"))]


@pytest.mark.parametrize("name,entry,regime", comparison_params(FAST_BACKENDS))
@given(data=st.data())
def test_matches_reference(name, entry, regime, data):
    entry = OPS_BY_NAME[entry]
    COMPARISONS[entry.ops[0]][0](name, entry, data, huge=regime == "huge")
