"""Parameters, gradients and optimizer states that share memory are refused before any update.

On a GPU two blocks of the multi-tensor update would write the same memory at once and lose
updates; the NumPy reference and the CPU emulation (blocks one after another) would hide it. So
every backend refuses, with an error naming both arrays: the same array twice, two parameters
viewing one buffer, a gradient or a state in a parameter's memory. Views of one buffer that
share no element (disjoint slices, interleaved columns) and gradients that share memory with
each other (only read) are fine.
"""

from __future__ import annotations

import numpy as np
import pytest

import nnfast as nf


@pytest.fixture
def backend(backend_or_emulated):
    """Every backend that runs here, and the CuPy backend on the CPU emulation."""
    return backend_or_emulated


def _params(backend, *arrays):
    return [nf.Parameter(a, f"p{i}") for i, a in enumerate(arrays)]


def _host(a):
    return nf.to_numpy(a).copy()


def test_two_parameters_on_one_array_are_refused_at_construction(backend):
    a = backend.zeros((3, 4), "float32")
    with pytest.raises(ValueError, match=r"params\[1\]: shares memory with params\[0\]"):
        nf.SGD(_params(backend, a, a), lr=0.1)
    buf = backend.zeros(20, "float32")
    with pytest.raises(ValueError, match=r"params\[2\]: shares memory with params\[0\]"):
        nf.Adam(_params(backend, buf[:10], backend.zeros(3, "float32"), buf[5:15]))


@pytest.mark.parametrize("case", ["same array", "overlapping views", "gradient in a parameter",
                                  "state in a parameter", "state in a gradient"])
def test_sharing_is_refused_at_the_step_and_nothing_is_updated(backend, case):
    rng = np.random.default_rng(0)
    arrays = [backend.asarray(rng.standard_normal(6).astype(np.float32)) for _ in range(3)]
    params = _params(backend, *arrays)
    opt = nf.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = backend.asarray(rng.standard_normal(6).astype(np.float32))
    expected = r"params\[2\]: shares memory with params\[0\]"
    if case == "same array":
        params[2].data = params[0].data
    elif case == "overlapping views":
        buf = backend.asarray(rng.standard_normal(9).astype(np.float32))
        params[0].data, params[2].data = buf[:6], buf[3:]
    elif case == "gradient in a parameter":
        params[1].grad = params[0].data
        expected = r"grads\[1\]: shares memory with params\[0\]"
    elif case == "state in a parameter":
        opt.state["velocity"][2] = params[1].data
        expected = r"velocities\[2\]: shares memory with params\[1\]"
    else:
        opt.state["velocity"][0] = params[1].grad
        expected = r"velocities\[0\]: shares memory with grads\[1\]"
    before = [_host(p.data) for p in params] + [_host(v) for v in opt.state["velocity"]]
    with pytest.raises(ValueError, match=expected):
        opt.step()
    after = [_host(p.data) for p in params] + [_host(v) for v in opt.state["velocity"]]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert opt.step_count == 0


def test_the_update_ops_refuse_it_too(backend):
    p = backend.asarray(np.ones(5, np.float32))
    g = backend.asarray(np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"params\[1\]: shares memory with params\[0\]"):
        backend.sgd_update([p, p], [g, g], [], lr=0.1)
    m, v = backend.zeros(5, "float32"), backend.zeros(5, "float32")
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\]: shares memory with exp_avgs\[0\]"):
        backend.adam_update([p], [g], [m], [m], step=1, lr=0.1)
    np.testing.assert_array_equal(_host(p), np.ones(5, np.float32))
    backend.adam_update([p], [g], [m], [v], step=1, lr=0.1)  # the same gradient twice is only read: fine
    backend.sgd_update([p, backend.zeros(5, "float32")], [g, g], [], lr=0.1)


def test_views_that_share_no_element_are_fine(backend):
    buf = backend.zeros(16, "float32")
    columns = buf.reshape(8, 2)
    for first, second in [(buf[:8], buf[8:]), (columns[:, 0], columns[:, 1])]:
        params = _params(backend, first, second)
        opt = nf.SGD(params, lr=1.0)
        params[0].grad = backend.asarray(np.ones(8, np.float32))
        params[1].grad = backend.asarray(np.full(8, 2.0, np.float32))
        opt.step()
    np.testing.assert_array_equal(_host(buf), np.r_[np.full(8, -1.0), np.full(8, -2.0)].astype(np.float32)
                                  + np.tile([-1.0, -2.0], 8).astype(np.float32))


def test_a_train_step_refuses_shared_parameters_before_any_update(backend):
    model = nf.MLP([4, 6, 3], seed=0)
    opt = nf.Adam(model.parameters(), lr=0.1)
    step = nf.TrainStep(model, nf.SoftmaxCrossEntropy(), opt)
    model[1].b.data = model[0].b.data[:3]
    before = {name: _host(p.data) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"params\[3\]: shares memory with params\[1\]"):
        step(np.ones((2, 4), np.float32), np.array([0, 2]))
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(_host(p.data), before[name], err_msg=name)
    assert opt.step_count == 0
