"""The CuPy backend's TrainStep plan (nnfast/train_step/cuda_graph.py) on the CPU emulation of CUDA.

The emulated CuPy has no graphs by default, so the plan makes its recorded launches directly: the
same launch sequence a GPU captures once and replays. With ``graphs=True`` its streams capture
kernel launches into an emulated graph, which checks the plan's capture-once-then-replay logic
(tests/test_train_step_gpu.py checks real capture and replay on a GPU). Everything else is the
plan's own: the recording, the fixed buffers, the guard
kernel and the guarded updates, the device-side step count, the label checks behind the step.
The reference is the eager plan (nnfast/train_step/eager.py) on the same emulated backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emu
import nnfast as nf
from nnfast.backends import cuda_launch
from nnfast.train_step import PlanKey
from nnfast.train_step.eager import EagerPlan

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"no CUDA emulation here: {emu.unavailable_reason()}")

STEP = cuda_launch.STEP_CONTROL["step"]
SKIP = cuda_launch.STEP_CONTROL["skip"]

OPTIMIZERS = {
    "sgd": lambda ps: nf.SGD(ps, lr=0.1),
    "sgd-momentum-decay": lambda ps: nf.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda ps: nf.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3),
    "adam-l2": lambda ps: nf.Adam(ps, lr=1e-2, weight_decay=1e-2, decoupled=False),
    "adamw": lambda ps: nf.Adam(ps, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-1),
}


@pytest.fixture
def gpu(kernel_modules):
    with emu.emulated_cupy_backend() as backend, nf.use_backend(backend):
        yield backend


def _trio(optimizer="adamw", sizes=(13, 40, 33, 7), dtype=np.float32, activation="gelu", seed=0, **loss):
    model = nf.MLP(list(sizes), activation=activation, dtype=dtype, seed=seed)
    return model, nf.SoftmaxCrossEntropy(**loss), OPTIMIZERS[optimizer](model.parameters())


def _data(batch, sizes=(13, 40, 33, 7), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, sizes[0])).astype(dtype), rng.integers(0, sizes[-1], size=batch)


class _Eager:
    """The reference: the eager plan (guarded on the host), one per batch size."""

    def __init__(self, trio):
        self.trio, self.plans = trio, {}

    def __call__(self, x, labels):
        key = PlanKey(x.shape[0], np.dtype(x.dtype))
        plan = self.plans.setdefault(key, EagerPlan(*self.trio, key))
        return plan(x, labels)


def _state(model, opt):
    out = {name: nf.to_numpy(p.data) for name, p in model.named_parameters()}
    out.update({f"opt/{k}": v for k, v in opt.state_dict().items()})
    return out


def _assert_state(got, expected, dtype):
    assert got.keys() == expected.keys()
    rtol, atol = (1e-5, 1e-6) if np.dtype(dtype) == np.float32 else (1e-12, 1e-14)
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


def _run_both(eager, fused, x, labels, dtype):
    """One step of each; a bad label must raise in both, when the loss is read."""
    try:
        expected = nf.to_numpy(eager(x, labels))
    except ValueError as err:
        with pytest.raises(ValueError, match=str(err).split("got")[1]):
            nf.to_numpy(fused(x, labels))
        return
    got = nf.to_numpy(fused(x, labels))
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-5 if np.dtype(dtype) == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_recorded_step_is_the_eager_step(gpu, optimizer, dtype):
    """Batches with partial tiles (1, 37 and 130 rows: several bias-gradient splits), a step with a
    NaN input and one with a bad label (both skipped on the device), batch sizes that come back."""
    eager_trio, fused_trio = _trio(optimizer, dtype=dtype), _trio(optimizer, dtype=dtype)
    eager, fused = _Eager(eager_trio), nf.TrainStep(*fused_trio)
    steps = [(37, None), (130, None), (1, None), (37, "nan"), (37, None), (130, "bad"), (130, None), (1, None)]
    for i, (batch, trouble) in enumerate(steps):
        x, labels = _data(batch, dtype=dtype, seed=i)
        if trouble == "nan":
            x[batch // 2, 3] = np.nan
        if trouble == "bad":
            labels[batch - 2] = 7
        _run_both(eager, fused, x, labels, dtype)
    assert fused.plan_names == ["cuda launches (batch 37)", "cuda launches (batch 130)", "cuda launches (batch 1)"]
    _assert_state(_state(*fused_trio[::2]), _state(*eager_trio[::2]), dtype)
    assert fused_trio[2].step_count == eager_trio[2].step_count == 6
    assert all(p.grad is None for p in fused_trio[0].parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_reduction_with_smoothing_and_ignored_rows(gpu, reduction):
    loss_options = dict(reduction=reduction, label_smoothing=0.1, ignore_index=3)
    eager_trio = _trio("sgd-momentum-decay", activation="silu", **loss_options)
    fused_trio = _trio("sgd-momentum-decay", activation="silu", **loss_options)
    eager, fused = _Eager(eager_trio), nf.TrainStep(*fused_trio)
    for i in range(3):
        x, labels = _data(33, seed=10 + i)  # labels == 3 are ignored
        _run_both(eager, fused, x, labels, np.float32)
    x[4, 0] = np.inf  # one row's loss is NaN: with "none" every loss value is checked, the step skipped
    _run_both(eager, fused, x, labels, np.float32)
    assert fused_trio[2].step_count == 3
    _assert_state(_state(*fused_trio[::2]), _state(*eager_trio[::2]), np.float32)


def test_the_plan_launches_what_the_eager_step_launches_plus_the_guard(gpu):
    model, loss_fn, opt = _trio("adamw")
    x, labels = _data(37)
    with gpu.recording() as eager:
        opt.zero_grad()
        loss, dlogits = loss_fn(model.forward(gpu.asarray(x)), gpu.asarray(labels))
        model.backward(dlogits, need_input_grad=False)
        opt.step()
        opt.zero_grad()
    opt.step_count = 0
    step = nf.TrainStep(model, loss_fn, opt)
    step(x, labels)
    plan, = step._plans.values()
    names = [launch.function.name for launch in plan.launches]
    expected = [launch.function.name for launch in eager.launches]
    guard = expected.index("ce_reduce<float>") + 1
    assert names == expected[:guard] + ["step_guard<float>"] + expected[guard:]
    assert names[-1] == "adam_multi<float>"


def test_a_skipped_step_changes_nothing_on_the_device(gpu):
    model, loss_fn, opt = _trio("sgd-nesterov")
    step = nf.TrainStep(model, loss_fn, opt)
    x, labels = _data(8)
    step(x, labels)
    before = _state(model, opt)
    control = opt._device_steps.control
    x[0, 0] = np.nan
    loss = step(x, labels)
    assert np.isnan(nf.to_numpy(loss))
    assert nf.to_numpy(control)[SKIP] == 1 and nf.to_numpy(control)[STEP] == 1
    _assert_state(_state(model, opt), before, np.float32)
    x[0, 0] = 0.0
    step(x, labels)
    assert nf.to_numpy(control)[SKIP] == 0 and opt.step_count == 2


def test_the_step_count_lives_on_the_device(gpu):
    """Read and written through the optimizer; kept by every plan; advanced by a step made by hand."""
    eager_trio, fused_trio = _trio("adamw"), _trio("adamw")
    eager, fused = _Eager(eager_trio), nf.TrainStep(*fused_trio)
    opt = fused_trio[2]
    for batch in (8, 5):
        _run_both(eager, fused, *_data(batch, seed=batch), np.float32)
    counter = opt._device_steps
    assert counter is not None and opt.step_count == 2 and opt.state_dict()["step"] == 2
    # Set on the host (as load_state_dict does): the device's count follows, and so do Adam's
    # bias corrections of the next step.
    for o in (opt, eager_trio[2]):
        o.step_count = 40
    assert nf.to_numpy(counter.control)[STEP] == 40
    _run_both(eager, fused, *_data(8, seed=3), np.float32)
    assert opt.step_count == 41
    # An update by hand between steps (the eager path, through the same count).
    for model, loss_fn, o in (eager_trio, fused_trio):
        x, labels = _data(5, seed=4)
        o.zero_grad()
        _, dlogits = loss_fn(model.forward(x), labels)
        model.backward(dlogits)
        o.step()
        o.zero_grad()
    assert opt.step_count == 42
    _run_both(eager, fused, *_data(5, seed=5), np.float32)
    assert opt.step_count == 43 and opt._device_steps is counter
    _assert_state(_state(*fused_trio[::2]), _state(*eager_trio[::2]), np.float32)


def test_settings_and_checkpoints_between_calls(gpu, tmp_path):
    """A changed learning rate makes a new plan; nf.save / nf.load round-trip the exact state and
    count, and a run resumed from a checkpoint follows the run that went on."""
    eager_trio, fused_trio = _trio("adam-l2"), _trio("adam-l2")
    eager, fused = _Eager(eager_trio), nf.TrainStep(*fused_trio)
    for i in range(2):
        _run_both(eager, fused, *_data(9, seed=i), np.float32)
    for _, _, opt in (eager_trio, fused_trio):
        opt.lr = 3e-3
    x, labels = _data(9, seed=2)
    x[0, 0] = np.nan  # a skipped step: the count the checkpoint holds is 3, not 4
    _run_both(eager, fused, x, labels, np.float32)
    _run_both(eager, fused, *_data(9, seed=3), np.float32)
    path = nf.save(tmp_path / "fused.npz", fused_trio[0], fused_trio[2])
    resumed_trio = _trio("adam-l2", seed=99)
    resumed_trio[2].lr = 3e-3
    nf.load(path, resumed_trio[0], resumed_trio[2])
    assert resumed_trio[2].step_count == fused_trio[2].step_count == 3
    resumed = nf.TrainStep(*resumed_trio)
    for i in range(4, 6):
        data = _data(9, seed=i)
        _run_both(eager, fused, *data, np.float32)
        resumed(*data)
    _assert_state(_state(*fused_trio[::2]), _state(*eager_trio[::2]), np.float32)
    _assert_state(_state(*resumed_trio[::2]), _state(*fused_trio[::2]), np.float32)
    # nf.load into the running step: its arrays are replaced, the next call makes a new plan.
    nf.load(path, fused_trio[0], fused_trio[2])
    nf.load(path, eager_trio[0], eager_trio[2])
    _run_both(eager, fused, *_data(9, seed=7), np.float32)
    _assert_state(_state(*fused_trio[::2]), _state(*eager_trio[::2]), np.float32)
    assert fused_trio[2].step_count == 4


def test_each_call_returns_its_own_loss(gpu):
    step = nf.TrainStep(*_trio("sgd"))
    first = step(*_data(6, seed=1))
    value = float(nf.to_numpy(first))
    second = step(*_data(6, seed=2))
    assert float(nf.to_numpy(first)) == value != float(nf.to_numpy(second))


def test_a_bad_label_is_raised_by_a_later_read_with_its_row(gpu):
    """Not read at once: the next step, synchronize() or any read raises it, naming the row and the
    label even though the plan's label buffer holds the next batch by then."""
    model, loss_fn, opt = _trio("sgd")
    step = nf.TrainStep(model, loss_fn, opt)
    x, labels = _data(12)
    labels[9] = -4
    step(x, labels)
    labels[9] = 0
    with pytest.raises(ValueError, match=r"got -4 at row 9"):
        step(x, labels)  # the earlier step's check has landed: looked at before this one runs
    assert opt.step_count == 0
    labels[2] = 70
    step(x, labels)
    with pytest.raises(ValueError, match=r"got 70 at row 2"):
        gpu.synchronize()
    assert opt.step_count == 0


@pytest.mark.parametrize("model", ["standalone activation", "sequential subclass", "strided weight"])
def test_other_models_run_the_eager_plan(gpu, model):
    if model == "standalone activation":
        net = nf.Sequential(nf.Linear(13, 16, activation="relu"), nf.Tanh(), nf.Linear(16, 7))
    elif model == "sequential subclass":
        class Scaled(nf.Sequential):
            def forward(self, x):
                return super().forward(x * 2.0)

        net = Scaled(nf.Linear(13, 7))
    else:
        net = nf.MLP([13, 16, 7], seed=0)
        wide = gpu.zeros((13, 32), np.float32)
        wide[:, ::2] = net[0].W.data
        net[0].W.data = wide[:, ::2]  # a strided view: updated through a copy, as the eager path does
    step = nf.TrainStep(net, nf.SoftmaxCrossEntropy(), nf.SGD(net.parameters(), lr=0.1))
    loss = step(*_data(4))
    assert np.isfinite(nf.to_numpy(loss))
    assert step.plan_names == ["eager (batch 4)"]


def test_an_mlp_with_fused_activation_layers_is_recorded(gpu):
    net = nf.Sequential(nf.Linear(13, 16), nf.ReLU(), nf.Linear(16, 16), nf.GELU(approximate="tanh"),
                        nf.Linear(16, 7))
    same = nf.Sequential(nf.Linear(13, 16), nf.ReLU(), nf.Linear(16, 16), nf.GELU(approximate="tanh"),
                         nf.Linear(16, 7))
    for p, q in zip(same.parameters(), net.parameters()):
        p.data[...] = q.data
    eager = _Eager((same, nf.SoftmaxCrossEntropy(), nf.SGD(same.parameters(), lr=0.1, momentum=0.5)))
    fused = nf.TrainStep(net, nf.SoftmaxCrossEntropy(), nf.SGD(net.parameters(), lr=0.1, momentum=0.5))
    for i in range(3):
        _run_both(eager, fused, *_data(10, seed=i), np.float32)
    assert fused.plan_names == ["cuda launches (batch 10)"]
    _assert_state(_state(net, fused.optimizer), _state(same, eager.trio[2]), np.float32)


@pytest.fixture
def graph_gpu(kernel_modules):
    """The emulated backend whose streams capture graphs (kernel launches only: a copy raises)."""
    with emu.emulated_cupy_backend(graphs=True) as backend, nf.use_backend(backend):
        yield backend


def test_the_step_is_captured_once_and_replayed(graph_gpu, monkeypatch):
    """The first call launches directly, the second captures the recorded launches (and nothing
    else) and launches the graph, later calls replay that graph; every call equals, bit for bit,
    the same plan made as direct launches, through a NaN step and a bad label."""
    graph_trio, direct_trio = _trio("adamw"), _trio("adamw")
    monkeypatch.setenv("NNFAST_CUDA_GRAPH", "0")
    direct = nf.TrainStep(*direct_trio)
    direct(*_data(37))
    monkeypatch.delenv("NNFAST_CUDA_GRAPH")
    graph = nf.TrainStep(*graph_trio)
    graph(*_data(37))
    plan, = graph._plans.values()
    assert plan.graph is None and graph.plan_names == ["cuda graph (batch 37)"]
    assert direct.plan_names == ["cuda launches (batch 37)"]
    captured = None
    for i in range(1, 7):
        x, labels = _data(37, seed=i)
        if i == 3:
            x[5, 2] = np.nan
        if i == 5:
            labels[36] = 7
        try:
            expected = nf.to_numpy(direct(x, labels))
        except ValueError as err:
            with pytest.raises(ValueError, match="at row 36"):
                nf.to_numpy(graph(x, labels))
            assert "at row 36" in str(err)
        else:
            np.testing.assert_array_equal(nf.to_numpy(graph(x, labels)), expected)
        captured = captured or plan.graph
        assert plan.graph is captured and len(captured.kernels) == len(plan.launches)
        assert captured.launches == i
    assert graph_trio[2].step_count == direct_trio[2].step_count == 5
    got, expected = _state(*graph_trio[::2]), _state(*direct_trio[::2])
    for k in got:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
