"""Layers: initialisation, fusion, whole-model gradients, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

import nnfast as nf

from op_table import activation_layer_factories


def test_linear_shapes_and_reproducible_init(backend):
    a = nf.Linear(20, 7, seed=3)
    b = nf.Linear(20, 7, seed=3)
    c = nf.Linear(20, 7, seed=4)
    assert a.W.data.shape == (20, 7) and a.b.data.shape == (7,)
    assert a.W.data.dtype == np.float32
    np.testing.assert_array_equal(nf.to_numpy(a.W.data), nf.to_numpy(b.W.data))
    assert not np.array_equal(nf.to_numpy(a.W.data), nf.to_numpy(c.W.data))
    assert (nf.to_numpy(a.b.data) == 0).all()
    assert nf.Linear(3, 2, bias=False).parameters()[0].name == "W"
    assert len(nf.Linear(3, 2, bias=False).parameters()) == 1


@pytest.mark.parametrize("activation,bound", [
    ("relu", math.sqrt(6 / 400)),                     # Kaiming uniform, gain sqrt(2)
    ("gelu", math.sqrt(6 / 400)),
    ("leaky_relu", math.sqrt(2 / (1 + 0.01**2)) * math.sqrt(3 / 400)),
    (None, math.sqrt(6 / (400 + 300))),               # Glorot uniform
    ("tanh", math.sqrt(6 / (400 + 300))),
])
def test_init_scheme(activation, bound):
    W = nf.to_numpy(nf.Linear(400, 300, activation=activation, dtype="float64", seed=0).W.data)
    assert np.abs(W).max() <= bound
    assert np.abs(W).max() > 0.99 * bound
    np.testing.assert_allclose(W.std(), bound / math.sqrt(3), rtol=0.02)


def _forward_backward(model, x, dy):
    y = model.forward(x)
    dx = model.backward(dy)
    return nf.to_numpy(y), nf.to_numpy(dx), [nf.to_numpy(p.grad) for p in model.parameters()]


@pytest.mark.parametrize("act_layer", activation_layer_factories())
def test_sequential_fused_equals_unfused(backend, act_layer):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 13))
    dy = rng.standard_normal((9, 5))
    fused = nf.Sequential(nf.Linear(13, 8, dtype="float64", seed=1), act_layer(),
                          nf.Linear(8, 5, dtype="float64", seed=2))
    assert fused._plan[0][1] is not None  # Linear + activation run as one op
    # The same layers, but the activation stands alone: Identity in between stops the fusion.
    lin1, act, lin2 = fused.layers
    unfused_plan = nf.Sequential._fuse([lin1, nf.Identity(), act, lin2])
    assert unfused_plan[0][1].activation == "identity"
    unfused = nf.Sequential(nf.Linear(13, 8, dtype="float64", seed=1), nf.Identity(), act_layer(),
                            nf.Linear(8, 5, dtype="float64", seed=2))
    got = _forward_backward(fused, x, dy)
    want = _forward_backward(unfused, x, dy)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[2], want[2]):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_mlp_is_sequential_of_fused_linears():
    m = nf.MLP([6, 5, 4, 3], activation="tanh", seed=0)
    assert [type(layer).__name__ for layer in m] == ["Linear", "Linear", "Linear"]
    assert [layer.activation for layer in m] == ["tanh", "tanh", "identity"]
    assert [n for n, _ in m.named_parameters()] == ["0.W", "0.b", "1.W", "1.b", "2.W", "2.b"]
    assert nf.to_numpy(nf.MLP([6, 5, 4, 3], activation="tanh", seed=0)[0].W.data).tolist() == \
        nf.to_numpy(m[0].W.data).tolist()


def test_mlp_gradient_matches_finite_differences():
    with nf.use_backend("numpy"):
        rng = np.random.default_rng(1)
        model = nf.MLP([5, 7, 6, 3], activation="gelu", dtype="float64", seed=2)
        x = rng.standard_normal((4, 5))
        labels = np.array([0, 2, 1, 2])
        loss_fn = nf.SoftmaxCrossEntropy(label_smoothing=0.1)

        def loss_of() -> float:
            return float(loss_fn(model.forward(x), labels)[0])

        _, dlogits = loss_fn(model.forward(x), labels)
        model.backward(dlogits)
        for p in model.parameters():
            flat = p.data.reshape(-1)
            grad = p.grad.reshape(-1)
            for k in range(0, flat.size, 3):
                old = flat[k]
                flat[k] = old + 1e-6
                up = loss_of()
                flat[k] = old - 1e-6
                down = loss_of()
                flat[k] = old
                assert abs((up - down) / 2e-6 - grad[k]) < 1e-7 * max(1.0, abs(grad[k])), p.name


def test_gradients_accumulate_until_zero_grad():
    with nf.use_backend("numpy"):
        lin = nf.Linear(3, 2, dtype="float64", seed=0)
        x = np.ones((2, 3))
        lin.forward(x)
        lin.backward(np.ones((2, 2)))
        first = lin.W.grad.copy()
        lin.forward(x)
        lin.backward(np.ones((2, 2)))
        np.testing.assert_allclose(lin.W.grad, 2 * first)
        lin.zero_grad()
        assert lin.W.grad is None and lin.b.grad is None


def test_inputs_are_converted_at_the_boundary(backend):
    lin = nf.Linear(3, 2, dtype="float32", seed=0)
    y = lin.forward([[1.0, 2.0, 3.0]])  # a list, float64 values
    assert y.dtype == np.float32 and backend.is_native(y)
    x64 = np.ones((2, 3), dtype=np.float64)
    y = lin.forward(x64)
    assert y.dtype == np.float32


@pytest.mark.parametrize("x,error,match", [
    (np.ones((2, 4)), ValueError, r"x: expected shape \(batch, 3\), got \(2, 4\)"),
    (np.ones(3), ValueError, r"x: expected shape \(batch, 3\), got \(3,\)"),
    (np.ones((0, 3)), ValueError, "x: expected a non-empty batch"),
    (np.ones((2, 3), dtype=np.int64), TypeError, "x: expected floating-point data, got dtype int64"),
    (np.ones((2, 3), dtype=bool), TypeError, "x: expected floating-point data"),
    (np.ones((2, 3), dtype=complex), TypeError, "x: expected floating-point data"),
    ("abc", TypeError, "x: cannot convert"),
])
def test_linear_rejects_bad_input(backend, x, error, match):
    lin = nf.Linear(3, 2, seed=0)
    with pytest.raises(error, match=match):
        lin.forward(x)


def test_backward_checks_and_needs_forward(backend):
    lin = nf.Linear(3, 2, seed=0)
    with pytest.raises(RuntimeError, match="call forward first"):
        lin.backward(np.ones((1, 2)))
    lin.forward(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 2\)"):
        lin.backward(np.ones((4, 3)))
    relu = nf.ReLU()
    with pytest.raises(RuntimeError, match="ReLU.backward: call forward first"):
        relu.backward(np.ones(3))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_features=0, out_features=2), ValueError, "in_features: expected a positive int, got 0"),
    (dict(in_features=2.5, out_features=2), TypeError, "in_features: expected a positive int, got 2.5"),
    (dict(in_features=2, out_features=2, activation="swish"), ValueError, "activation: expected one of"),
    (dict(in_features=2, out_features=2, dtype="int32"), TypeError, "dtype: expected 'float32' or 'float64'"),
    (dict(in_features=2, out_features=2, dtype="float16"), TypeError, "dtype"),
])
def test_linear_rejects_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        nf.Linear(**kwargs)


def test_activation_layers_reject_bad_settings():
    with pytest.raises(ValueError, match="alpha: leaky_relu needs alpha >= 0"):
        nf.LeakyReLU(-0.1)
    with pytest.raises(ValueError, match="approximate: expected 'none' or 'tanh'"):
        nf.GELU("fast")
    with pytest.raises(TypeError, match=r"layers\[1\]: expected an nnfast Module"):
        nf.Sequential(nf.ReLU(), "relu")
    with pytest.raises(ValueError, match="sizes: expected a list of at least 2"):
        nf.MLP([10])
    with pytest.raises(ValueError, match=r"sizes\[1\]: expected a positive int"):
        nf.MLP([10, 0, 3])


@pytest.mark.parametrize("name", nf.ACTIVATIONS)
def test_activation_layer_by_name(name):
    layer = nf.activation_layer(name)
    assert layer.activation == name

