"""The Numba backend's fused training step: the eager step's results, for every setting it takes.

``tests/test_train_step.py`` runs the contract on every backend; here the
fused plan is driven through what the contract's small model does not reach:
other activations (one whose derivative needs the input, a hidden identity, a
last layer with an activation), layers without bias, every optimizer option,
every loss option, a batch spanning several K blocks of the weight gradient
and several row blocks of the bias gradient, and the parallel step.

The fused step performs every operation of the eager step in the same order,
but one of them is not bit-reproducible across compiled units: the softmax-CE
sums its exponentials with ``fastmath`` reassociation, so the order of that
sum is whatever vectorisation LLVM picks where the CE is compiled -- once on
its own for the eager op, once inside the fused step. The loss and the
logits' gradient may then differ in the last bit (seen: 1 ulp of a float64
loss) and so may everything after; hence a tolerance of a few ulps per step
(:func:`assert_close`), not equality.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import nnfast as nf  # noqa: E402
from nnfast.backends.numba_kernels import gemm  # noqa: E402
from nnfast.backends.numba_kernels import train_step as kernels  # noqa: E402
from nnfast.train_step import numba_fused  # noqa: E402
from test_train_step import _eager_step  # noqa: E402


def _model(layers, dtype, seed=0):
    rng = np.random.default_rng(seed)
    built = []
    for spec in layers:
        if isinstance(spec, tuple):
            n_in, n_out, act, bias = spec
            built.append(nf.Linear(n_in, n_out, activation=act, bias=bias, dtype=dtype, seed=rng))
        else:  # an activation layer class
            built.append(spec())
    return nf.Sequential(*built)


def _pair(layers, optimizer, dtype, loss_options):
    """Two identical (model, loss, optimizer) triples on the Numba backend."""
    out = []
    with nf.use_backend("numba"):
        for _ in range(2):
            model = _model(layers, dtype)
            kind, options = optimizer
            opt = (nf.SGD if kind == "sgd" else nf.Adam)(model.parameters(), **options)
            out.append((model, nf.SoftmaxCrossEntropy(**loss_options), opt))
    return out


def assert_close(got, expected, err_msg=""):
    """Equal to rounding: the few ulps a reassociated softmax-CE sum can move a step."""
    tight = {np.dtype(np.float32): (2e-5, 1e-7), np.dtype(np.float64): (1e-12, 1e-15)}
    rtol, atol = tight.get(np.asarray(expected).dtype, (0, 0))  # integers (the step count): equal
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=err_msg)


def _same_steps(layers, optimizer, dtype="float32", batches=(8, 8, 5), loss_options=None, ignore=False):
    loss_options = loss_options or {}
    (em, el, eo), (fm, fl, fo) = _pair(layers, optimizer, dtype, loss_options)
    step = nf.TrainStep(fm, fl, fo)
    rng = np.random.default_rng(1)
    n_in, classes = layers[0][0], [s for s in layers if isinstance(s, tuple)][-1][1]
    for batch in batches:
        x = rng.standard_normal((batch, n_in)).astype(dtype)
        labels = rng.integers(0, classes, size=batch)
        if ignore:
            labels[::3] = loss_options.get("ignore_index", -100)
        expected = nf.to_numpy(_eager_step(em, el, eo, x, labels))
        got = nf.to_numpy(step(x, labels))
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert_close(got, expected)
    assert all(name.startswith("fused") for name in step.plan_names), step.plan_names
    for (name, p), q in zip(fm.named_parameters(), em.parameters()):
        assert_close(nf.to_numpy(p.data), nf.to_numpy(q.data), err_msg=name)
    for key, value in fo.state_dict().items():
        assert_close(value, eo.state_dict()[key], err_msg=key)
    return step


MOMENTUM = ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3})


@pytest.mark.parametrize("layers", [
    [(10, 16, "relu", True), (16, 12, "relu", True), (12, 4, None, True)],
    [(10, 16, "gelu", True), (16, 4, None, True)],                       # derivative from the input
    [(10, 16, None, True), (16, 12, "tanh", False), (12, 4, "tanh", True)],  # identity, no bias, last act
    [(10, 4, None, False)],                                               # one layer, no bias
], ids=["relu", "gelu", "identity-nobias-lastact", "single"])
def test_layers_and_activations(layers):
    _same_steps(layers, MOMENTUM)


def test_separate_activation_layers_fuse():
    layers = [(10, 16, None, True), nf.ReLU, (16, 4, None, True)]
    _same_steps(layers, MOMENTUM)


@pytest.mark.parametrize("optimizer", [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("adam", {"lr": 1e-2}),
    ("adam", {"lr": 1e-2, "weight_decay": 1e-2, "decoupled": False}),
    ("adam", {"lr": 1e-2, "weight_decay": 1e-2}),
], ids=["sgd", "nesterov", "adam", "adam-l2", "adamw"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_optimizers(optimizer, dtype):
    _same_steps([(10, 16, "tanh", True), (16, 4, None, True)], optimizer, dtype)


@pytest.mark.parametrize("loss_options, ignore", [
    ({"label_smoothing": 0.1}, False),
    ({"ignore_index": 2}, True),
    ({"ignore_index": -100}, True),
    ({"reduction": "sum"}, False),
    ({"reduction": "none"}, False),
], ids=["smoothing", "ignore-class", "ignore-all-of-some", "sum", "none"])
def test_loss_options(loss_options, ignore):
    step = _same_steps([(10, 16, "relu", True), (16, 4, None, True)], MOMENTUM, loss_options=loss_options,
                       ignore=ignore)
    assert step.loss_fn.reduction == loss_options.get("reduction", "mean")


def test_large_batch_spans_k_and_row_blocks():
    """Batch 300: two K blocks of the weight gradient (its partial sums kept between them), 19 db row blocks."""
    _same_steps([(20, 24, "relu", True), (24, 6, None, True)], MOMENTUM, batches=(300, 37))


def test_parallel_step(monkeypatch):
    """The parallel step (every GEMM split between workers, softmax-CE over row blocks) keeps the bits."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only")
    monkeypatch.setattr(numba_fused, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(gemm, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(kernels, "CE_PARALLEL_MIN", 0)
    step = _same_steps([(30, 70, "relu", True), (70, 40, "relu", True), (40, 5, None, True)], MOMENTUM,
                       batches=(64, 300))
    assert all(plan.parallel for plan in step._plans.values())


def test_models_it_does_not_take_run_eager():
    with nf.use_backend("numba"):
        model = nf.Sequential(nf.Linear(6, 8), nf.Tanh(), nf.Tanh(), nf.Linear(8, 3))
        step = nf.TrainStep(model, nf.SoftmaxCrossEntropy(), nf.SGD(model.parameters(), lr=0.1))
        step(np.ones((4, 6), np.float32), np.zeros(4, np.int64))
    assert step.plan_names == ["eager (batch 4)"]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 127, 128, 129, 255, 256, 1000, 4099])
def test_loss_sum_is_numpys(n):
    a = np.random.default_rng(n).standard_normal(n) * np.logspace(-3, 3, n)
    assert kernels.pairwise_sum(a) == a.sum()


class _Recorder:
    """Stands for a step kernel: records the signatures compiled and those called, and runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.compiled, self.called = kernel, [], []

    def compile(self, signature):
        self.compiled.append(signature)
        return self.kernel.compile(signature)

    def __call__(self, *args):
        self.called.append(tuple(numba.typeof(a) for a in args))
        return self.kernel(*args)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_prepare_compiles_what_the_step_calls(monkeypatch, parallel, reduction):
    """``TrainStep.prepare`` compiles the step kernel for exactly the argument types a step passes (a list or a
    non-contiguous input included), so the first step compiles nothing."""
    if parallel and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only")
    if parallel:
        monkeypatch.setattr(numba_fused, "PARALLEL_MIN_MACS", 0)
    recorders = {}

    def recorded(name):
        return recorders.setdefault(name, _Recorder(getattr(kernels, name)))

    for name in ("step_serial", "step_parallel"):
        monkeypatch.setattr(kernels, name, recorded(name))
    (em, el, eo), (fm, fl, fo) = _pair([(10, 16, "relu", True), (16, 4, None, True)], MOMENTUM, "float32",
                                       {"reduction": reduction})
    step = nf.TrainStep(fm, fl, fo)
    step.prepare(8, 5)
    recorder = recorders["step_parallel" if parallel else "step_serial"]
    assert len(recorder.compiled) == 2 and not recorder.called
    rng = np.random.default_rng(3)
    for batch in (8, 5):
        x = rng.standard_normal((batch, 20))[:, ::2]  # float64, strided: converted by the step
        labels = rng.integers(0, 4, size=batch).tolist()
        assert_close(nf.to_numpy(step(x, labels)), nf.to_numpy(_eager_step(em, el, eo, x.astype(np.float32), labels)))
    assert recorder.called == recorder.compiled


def test_subclasses_with_their_own_methods_run_eager():
    """The fused plan replaces the loss's, the optimizer's and the layers' methods: one of their own is called."""
    calls = []

    class CountedLoss(nf.SoftmaxCrossEntropy):
        def __call__(self, logits, labels):
            calls.append("loss")
            return super().__call__(logits, labels)

    class CountedSGD(nf.SGD):
        def step(self):
            calls.append("step")
            super().step()

    class CountedLinear(nf.Linear):
        def forward_with(self, x, activation, alpha):
            calls.append("forward")
            return super().forward_with(x, activation, alpha)

    x, labels = np.ones((4, 6), np.float32), np.zeros(4, np.int64)
    with nf.use_backend("numba"):
        for loss_class, opt_class, linear_class in ((CountedLoss, nf.SGD, nf.Linear),
                                                    (nf.SoftmaxCrossEntropy, CountedSGD, nf.Linear),
                                                    (nf.SoftmaxCrossEntropy, nf.SGD, CountedLinear)):
            model = nf.Sequential(linear_class(6, 8, activation="relu"), nf.Linear(8, 3))
            step = nf.TrainStep(model, loss_class(), opt_class(model.parameters(), lr=0.1))
            calls.clear()
            step(x, labels)
            assert step.plan_names == ["eager (batch 4)"] and calls, (loss_class, opt_class, linear_class)
        model = nf.Sequential(nf.Linear(6, 8, activation="relu"), nf.Linear(8, 3))
        step = nf.TrainStep(model, nf.SoftmaxCrossEntropy(), nf.SGD(model.parameters(), lr=0.1))
        step(x, labels)
    assert step.plan_names == ["fused (batch 4)"]
