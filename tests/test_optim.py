"""Optimizers against a scalar, loop-by-loop transcription of PyTorch's update rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import nnfast as nf


def _sgd_scalar(p, g, v, lr, momentum, nesterov, wd):
    d = g + wd * p
    if momentum:
        v = momentum * v + d
        d = d + momentum * v if nesterov else v
    return p - lr * d, v


def _adam_scalar(p, g, m, v, t, lr, b1, b2, eps, wd, decoupled):
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = math.sqrt(v) / math.sqrt(1 - b2**t) + eps
    return p - lr / (1 - b1**t) * m / denom, m, v


def _model_with_grads(seed):
    model = nf.MLP([3, 4, 2], dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(p.shape) for p in model.parameters()]
    return model, grads


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.01),
                                                  (0.5, False, 0.1)])
def test_sgd_matches_pytorch_rule(backend, momentum, nesterov, wd):
    model, grads = _model_with_grads(0)
    start = [nf.to_numpy(p.data).copy() for p in model.parameters()]
    opt = nf.SGD(model.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for _ in range(3):
        for p, g in zip(model.parameters(), grads):
            p.grad = backend.asarray(g)
        opt.step()
        opt.zero_grad()
    assert opt.step_count == 3
    for p, p0, g in zip(model.parameters(), start, grads):
        want = np.empty_like(p0)
        for idx in np.ndindex(p0.shape):
            value, vel = p0[idx], 0.0
            for _ in range(3):
                value, vel = _sgd_scalar(value, g[idx], vel, 0.1, momentum, nesterov, wd)
            want[idx] = value
        np.testing.assert_allclose(nf.to_numpy(p.data), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wd,decoupled", [(0.0, True), (0.1, True), (0.1, False)])
def test_adam_matches_pytorch_rule(backend, wd, decoupled):
    model, grads = _model_with_grads(1)
    start = [nf.to_numpy(p.data).copy() for p in model.parameters()]
    opt = nf.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, decoupled=decoupled)
    for _ in range(4):
        for p, g in zip(model.parameters(), grads):
            p.grad = backend.asarray(g)
        opt.step()
    for p, p0, g in zip(model.parameters(), start, grads):
        want = np.empty_like(p0)
        for idx in np.ndindex(p0.shape):
            value, m, v = p0[idx], 0.0, 0.0
            for t in range(1, 5):
                value, m, v = _adam_scalar(value, g[idx], m, v, t, 0.01, 0.8, 0.99, 1e-6, wd, decoupled)
            want[idx] = value
        np.testing.assert_allclose(nf.to_numpy(p.data), want, rtol=1e-12, atol=1e-14)


def test_parameters_without_grad_are_skipped():
    model, _ = _model_with_grads(2)
    before = [nf.to_numpy(p.data).copy() for p in model.parameters()]
    opt = nf.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert opt.step_count == 0
    model.parameters()[0].grad = np.ones(model.parameters()[0].shape)
    opt.step()
    after = [nf.to_numpy(p.data) for p in model.parameters()]
    np.testing.assert_allclose(after[0], before[0] - 0.1)
    for a, b in zip(after[1:], before[1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make,error,match", [
    (lambda ps: nf.SGD(ps, lr=-1), ValueError, "lr: expected a value >= 0.0"),
    (lambda ps: nf.SGD(ps, lr="fast"), TypeError, "lr: expected a finite real number"),
    (lambda ps: nf.SGD(ps, lr=float("nan")), TypeError, "lr"),
    (lambda ps: nf.SGD(ps, lr=10**400), TypeError, "lr: expected a finite real number"),  # no float holds it
    (lambda ps: nf.SGD(ps, lr=True), TypeError, "lr: expected a finite real number"),
    (lambda ps: nf.SGD(ps, lr=0.1, nesterov=True), ValueError, "nesterov: Nesterov momentum needs momentum > 0"),
    (lambda ps: nf.Adam(ps, betas=(0.9, 1.0)), ValueError, r"betas\[1\]: expected a value in \[0.0, 1.0\)"),
    (lambda ps: nf.Adam(ps, betas=0.9), ValueError, "betas: expected a pair"),
    (lambda ps: nf.Adam([]), ValueError, "params: expected at least one Parameter"),
    (lambda ps: nf.Adam([np.ones(3)]), TypeError, r"params\[0\]: expected an nnfast Parameter"),
])
def test_optimizers_reject_bad_settings(make, error, match):
    model, _ = _model_with_grads(0)
    with pytest.raises(error, match=match):
        make(model.parameters())


def test_failed_step_changes_nothing():
    model, grads = _model_with_grads(3)
    opt = nf.Adam(model.parameters(), lr=0.1)
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    model.parameters()[-1].grad = np.ones((7,))  # wrong shape
    before = [nf.to_numpy(p.data).copy() for p in model.parameters()]
    state = {k: v.copy() for k, v in opt.state_dict().items()}
    with pytest.raises(ValueError, match=r"grads\[3\]: expected shape \(2,\), got \(7,\)"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(nf.to_numpy(p.data), b)
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    assert opt.step_count == 0
