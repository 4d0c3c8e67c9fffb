"""``nf.TrainStep``: one call is the eager step, guarded; plans per batch size, re-made when stale.

Every backend that runs here, plus the CuPy backend on the CPU emulation of the CUDA kernels
(tests/cuda_emulation.py), which runs the CuPy plan's recorded launches directly (no graphs).
"""

from __future__ import annotations

import numpy as np
import pytest

import nnfast as nf
from nnfast.train_step import MAX_PLANS


@pytest.fixture
def backend(backend_or_emulated):
    """Every backend that runs here, and the CuPy backend on the CPU emulation."""
    return backend_or_emulated


def _setup(backend_name, optimizer="sgd", dtype="float32", sizes=(12, 16, 5), seed=0, **loss_options):
    with nf.use_backend(backend_name):
        model = nf.MLP(list(sizes), activation="tanh", dtype=dtype, seed=seed)
        loss_fn = nf.SoftmaxCrossEntropy(**loss_options)
        if optimizer == "sgd":
            opt = nf.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        else:
            opt = nf.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    return model, loss_fn, opt


def _batches(n, batch, sizes=(12, 16, 5), seed=1, dtype="float32"):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield (rng.standard_normal((batch, sizes[0])).astype(dtype),
               rng.integers(0, sizes[-1], size=batch))


def _eager_step(model, loss_fn, opt, x, labels):
    opt.zero_grad()
    loss, dlogits = loss_fn(model.forward(x), labels)
    model.backward(dlogits, need_input_grad=False)
    opt.step()
    opt.zero_grad()
    return loss


def _state(model, opt):
    out = {name: nf.to_numpy(p.data).copy() for name, p in model.named_parameters()}
    out.update({f"opt/{k}": v.copy() for k, v in opt.state_dict().items()})
    return out


def _assert_same(a, b, exact):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_step_is_the_eager_sequence(backend, optimizer, dtype):
    """Over batch sizes that vary. Bit for bit on NumPy (the eager plan itself); to rounding on the GPU and on
    Numba, whose fused plan performs the same operations in the same order but compiles the softmax-CE, whose
    sum of exponentials is reassociated, into its own unit (see tests/test_numba_train_step.py)."""
    name = backend.name
    eager = _setup(backend, optimizer, dtype)
    fused = _setup(backend, optimizer, dtype)
    step = nf.TrainStep(*fused)
    for batch, count in ((8, 3), (3, 2), (8, 2)):
        for x, labels in _batches(count, batch, seed=batch, dtype=dtype):
            expected = nf.to_numpy(_eager_step(*eager, x, labels))
            got = nf.to_numpy(step(x, labels))
            assert got.shape == () and got.dtype == np.dtype(dtype)
            _assert_same({"loss": got}, {"loss": expected}, exact=name == "numpy")
    _assert_same(_state(*fused[::2]), _state(*eager[::2]), exact=name == "numpy")
    assert all(p.grad is None for p in fused[0].parameters())
    assert fused[2].step_count == 7


def test_a_non_finite_loss_changes_nothing(backend):
    model, loss_fn, opt = _setup(backend, "adam")
    step = nf.TrainStep(model, loss_fn, opt)
    (x, labels), = _batches(1, 6)
    step(x, labels)
    before = _state(model, opt)
    x[2, 3] = np.nan
    loss = step(x, labels)
    assert np.isnan(nf.to_numpy(loss))
    _assert_same(_state(model, opt), before, exact=True)
    assert opt.step_count == 1
    assert all(p.grad is None for p in model.parameters())


def test_a_bad_label_raises_and_changes_nothing(backend):
    model, loss_fn, opt = _setup(backend)
    step = nf.TrainStep(model, loss_fn, opt)
    (x, labels), = _batches(1, 6)
    before = _state(model, opt)
    labels[4] = 5  # 5 classes: 0..4
    with pytest.raises(ValueError, match=r"labels: .* got 5 at row 4"):
        nf.to_numpy(step(x, labels))
    _assert_same(_state(model, opt), before, exact=True)
    labels[4] = 0
    step(x, labels)  # and the step is usable afterwards
    assert opt.step_count == 1


def test_plans_are_remade_when_arrays_or_settings_change(backend):
    name = backend.name
    eager = _setup(backend, "adam")
    fused = _setup(backend, "adam")
    step = nf.TrainStep(*fused)
    batches = list(_batches(4, 5))
    _eager_step(*eager, *batches[0])
    step(*batches[0])
    for _, _, opt in (eager, fused):
        opt.lr = 0.05  # a changed hyperparameter takes effect
    _eager_step(*eager, *batches[1])
    step(*batches[1])
    _assert_same(_state(*fused[::2]), _state(*eager[::2]), exact=name == "numpy")
    # Arrays replaced behind the step's back (what nf.load does): the next step uses the new ones.
    _eager_step(*eager, *batches[2])
    _eager_step(*eager, *batches[3])
    for p, q in zip(fused[0].parameters(), eager[0].parameters()):
        p.data = fused[0].backend.asarray(nf.to_numpy(q.data).copy())
    fused[2].load_state_dict({k[4:]: v for k, v in _state(*eager[::2]).items() if k.startswith("opt/")})
    assert fused[2].step_count == 4
    step(*batches[0])
    _eager_step(*eager, *batches[0])
    _assert_same(_state(*fused[::2]), _state(*eager[::2]), exact=name == "numpy")


def test_one_plan_per_batch_size_and_a_bounded_number(backend):
    step = nf.TrainStep(*_setup(backend))
    for batch in range(1, MAX_PLANS + 3):
        step(*next(_batches(1, batch)))
    assert len(step.plan_names) == MAX_PLANS
    assert step.plan_names[-1].endswith(f"(batch {MAX_PLANS + 2})")


def test_inputs_are_converted_like_the_layers_convert_them(backend):
    model, loss_fn, opt = _setup(backend)
    step = nf.TrainStep(model, loss_fn, opt)
    (x, labels), = _batches(1, 4)
    loss = step(x.astype(np.float64).tolist(), labels.tolist())  # lists, float64 -> the model's float32
    assert nf.to_numpy(loss).dtype == np.float32


@pytest.mark.parametrize("x, labels, error, match", [
    (np.zeros((4, 11), np.float32), np.zeros(4, np.int64), ValueError, r"x: expected shape \(batch, 12\)"),
    (np.zeros((0, 12), np.float32), np.zeros(0, np.int64), ValueError, "x: expected a non-empty batch"),
    (np.zeros((4, 12), np.int32), np.zeros(4, np.int64), TypeError, "x: expected floating-point data"),
    (np.zeros((4, 12), np.float32), np.zeros(3, np.int64), ValueError, r"labels: expected shape \(4,\)"),
    (np.zeros((4, 12), np.float32), np.zeros(4, np.float32) + 0.5, TypeError, "labels: expected integer"),
])
def test_bad_inputs_are_refused_before_anything_runs(backend, x, labels, error, match):
    model, loss_fn, opt = _setup(backend)
    step = nf.TrainStep(model, loss_fn, opt)
    before = _state(model, opt)
    with pytest.raises(error, match=match):
        step(x, labels)
    _assert_same(_state(model, opt), before, exact=True)


def test_bad_construction_is_refused():
    model, loss_fn, opt = _setup("numpy")
    other, _, other_opt = _setup("numpy")
    with pytest.raises(TypeError, match="model: expected an nnfast Module"):
        nf.TrainStep(object(), loss_fn, opt)
    with pytest.raises(TypeError, match="loss_fn: expected an nnfast SoftmaxCrossEntropy"):
        nf.TrainStep(model, lambda a, b: None, opt)
    with pytest.raises(TypeError, match="optimizer: expected an nnfast Optimizer"):
        nf.TrainStep(model, loss_fn, None)
    with pytest.raises(ValueError, match=r"optimizer: must update exactly model.parameters\(\)"):
        nf.TrainStep(model, loss_fn, other_opt)
    with pytest.raises(ValueError, match=r"optimizer: must update exactly model.parameters\(\)"):
        nf.TrainStep(model, loss_fn, nf.SGD(model.parameters()[:2], lr=0.1))
    with nf.use_backend("numpy"), pytest.raises(TypeError, match="first layer is a Linear"):
        nf.TrainStep(nf.Sequential(nf.Tanh(), *other.layers), loss_fn, other_opt)
    if "numba" in nf.available_backends():
        numba_model, numba_loss, numba_opt = _setup("numba")
        with pytest.raises(ValueError, match="loss_fn: lives on backend 'numba', the model on 'numpy'"):
            nf.TrainStep(model, numba_loss, opt)


def test_prepare_makes_the_plans_and_changes_nothing(backend):
    model, loss_fn, opt = _setup(backend, "adam")
    step = nf.TrainStep(model, loss_fn, opt)
    before = _state(model, opt)
    step.prepare(8, 3, 8)
    assert [name.split(" (")[1] for name in step.plan_names] == ["batch 8)", "batch 3)"]
    _assert_same(_state(model, opt), before, exact=True)
    assert opt.step_count == 0 and all(p.grad is None for p in model.parameters())
    eager = _setup(backend, "adam")
    prepared = dict(step._plans)
    for x, labels in _batches(2, 3):  # the prepared plan is the one that runs, and runs right
        step(x, labels)
        _eager_step(*eager, x, labels)
    assert all(step._plans[key] is plan for key, plan in prepared.items())
    _assert_same(_state(model, opt), _state(*eager[::2]), exact=backend.name == "numpy")


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "8"])
def test_prepare_refuses_a_bad_batch_size(bad):
    step = nf.TrainStep(*_setup("numpy"))
    with pytest.raises(ValueError, match=f"batch_sizes: expected positive integers, got {bad!r}"):
        step.prepare(8, bad)
