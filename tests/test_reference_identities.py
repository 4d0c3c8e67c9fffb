"""Forward identities of the NumPy reference: softmax, log-softmax, cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nnfast.backends import backend_for
from nnfast.backends import reference_activations

REF = backend_for("numpy")

rows = st.integers(1, 9)
classes = st.integers(1, 40)
seeds = st.integers(0, 2**31 - 1)


@given(rows, classes, seeds, st.sampled_from([np.float32, np.float64]))
def test_softmax_rows_sum_to_one(n, c, seed, dtype):
    x = (np.random.default_rng(seed).standard_normal((n, c)) * 30).astype(dtype)
    p = REF.softmax(x)
    assert p.dtype == dtype
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(np.exp(REF.log_softmax(x)), p, rtol=1e-4, atol=1e-7)


def test_softmax_is_stable_for_huge_logits():
    x = np.array([[1e4, 1e4 - 1, -1e4], [-3e38, 0.0, 3e38]], dtype=np.float32)
    p = REF.softmax(x)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0], rtol=1e-6)
    np.testing.assert_allclose(p[1], [0, 0, 1])


@given(rows, classes, seeds)
def test_cross_entropy_without_smoothing_is_minus_log_p(n, c, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)) * 5
    y = rng.integers(0, c, n)
    loss, _ = REF.softmax_cross_entropy(x, y, reduction="none")
    p = REF.softmax(x)
    np.testing.assert_allclose(loss, -np.log(p[np.arange(n), y]), rtol=1e-12, atol=1e-14)


@given(rows, classes, seeds, st.floats(0.0, 1.0))
def test_ignored_rows_contribute_nothing(n, c, seed, smoothing):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c))
    y = rng.integers(0, c, n)
    ignored = rng.random(n) < 0.5
    y[ignored] = -100
    loss, grad = REF.softmax_cross_entropy(x, y, label_smoothing=smoothing, reduction="none")
    assert (loss[ignored] == 0).all()
    assert (grad[ignored] == 0).all()
    mean, gmean = REF.softmax_cross_entropy(x, y, label_smoothing=smoothing)
    kept = int((~ignored).sum())
    assert np.isfinite(mean) and np.isfinite(gmean).all()
    if kept == 0:
        assert mean == 0.0 and (gmean == 0).all()
    else:
        np.testing.assert_allclose(mean, loss[~ignored].mean(), rtol=1e-12)


@given(rows, classes, seeds, st.floats(0.0, 1.0))
def test_sum_is_mean_times_count(n, c, seed, smoothing):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c))
    y = rng.integers(0, c, n)
    y[rng.random(n) < 0.3] = -100
    count = int((y != -100).sum())
    total, gsum = REF.softmax_cross_entropy(x, y, label_smoothing=smoothing, reduction="sum")
    mean, gmean = REF.softmax_cross_entropy(x, y, label_smoothing=smoothing, reduction="mean")
    np.testing.assert_allclose(total, mean * count, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(gsum, gmean * count, rtol=1e-12, atol=1e-15)


def test_label_smoothing_matches_definition():
    x = np.array([[2.0, -1.0, 0.5]])
    logp = x - np.log(np.exp(x).sum())
    loss, grad = REF.softmax_cross_entropy(x, np.array([0]), label_smoothing=0.3)
    np.testing.assert_allclose(loss, 0.7 * -logp[0, 0] + 0.3 * -logp[0].mean())
    np.testing.assert_allclose(grad, np.exp(logp) - (0.7 * np.eye(3)[[0]] + 0.1))


def test_one_class_has_zero_loss():
    loss, grad = REF.softmax_cross_entropy(np.array([[3.0], [-2.0]]), np.array([0, 0]))
    assert loss == 0.0 and (grad == 0).all()


def test_erf_matches_known_values():
    x = np.array([0.0, 0.5, 1.0, -2.0, 5.0])
    np.testing.assert_allclose(reference_activations.erf(np, x), [0.0, 0.5204998778130465, 0.8427007929497149,
                                        -0.9953222650189527, 0.9999999999984626], rtol=1e-15)


@pytest.mark.parametrize("activation,x,y", [
    ("gelu", 1.0, 0.8413447460685429), ("gelu_tanh", 1.0, 0.8411919906082768),
    ("silu", 1.0, 0.7310585786300049), ("softplus", 1.0, 1.3132616875182228),
    ("softplus", 30.0, 30.0), ("elu", -1.0, -0.6321205588285577), ("leaky_relu", -2.0, -0.02),
    ("sigmoid", -800.0, 0.0), ("tanh", 0.5, 0.46211715726000974),
])
def test_activation_values_match_pytorch_definitions(activation, x, y):
    np.testing.assert_allclose(REF.activation_forward(np.array([x]), activation), [y], rtol=1e-12)


# Mish and HardSwish as PyTorch defines them (torch.nn.Mish, torch.nn.Hardswish), values worked out by
# hand: mish(x) = x tanh(ln(1 + e^x)), mish'(x) = t + x sigmoid(x) (1 - t^2) with t = tanh(ln(1 + e^x))
# (to 20 digits; e.g. mish'(0) = tanh(ln 2) = (2 - 1/2) / (2 + 1/2) = 0.6 exactly); hardswish(x) =
# x relu6(x + 3) / 6, and PyTorch's derivative (torch 2.x) is x / 3 + 1/2 strictly between -3 and 3,
# 0 up to -3 and 1 from 3 on (its limits from outside at the two kinks).
MISH = [(-5.0, -0.033576237730161705396, -0.026747498019901933504),
        (-1.0, -0.30340146137410891807, 0.059216755877394948006), (0.0, 0.0, 0.6),
        (1.0, 0.86509838826731034612, 1.0490362200997921591), (2.5, 2.4713923045578811069, 1.0411295301313531884),
        (30.0, 30.0, 1.0)]
HARDSWISH = [(-4.0, 0.0, 0.0), (-3.0, 0.0, 0.0), (-1.5, -0.375, 0.0), (0.0, 0.0, 0.5), (1.0, 2 / 3, 5 / 6),
             (2.5, 2.5 * 5.5 / 6, 2.5 / 3 + 0.5), (3.0, 3.0, 1.0), (4.0, 4.0, 1.0)]


@pytest.mark.parametrize("name,table", [("mish", MISH), ("hardswish", HARDSWISH)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mish_and_hardswish_follow_pytorch(name, table, dtype):
    x, y, dy = (np.array(column, dtype=dtype) for column in zip(*table))
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(REF.activation_forward(x, name), y, **tol)
    np.testing.assert_allclose(REF.activation_backward(np.ones_like(x), x, name), dy, **tol)
