"""Training health: a NaN/Inf loss stops training naming the step, or skips it on request.

The non-finite loss is produced three ways: a loss function patched to
return NaN/Inf at chosen steps (exact control over where), a poisoned
sample in the data, and a learning rate so large that training diverges.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import nnfast as nf
import nnfast.train as train_module
from nnfast.cli import main
from nnfast.data import Dataset, load_digits
from nnfast.train import NonFiniteLossError, TrainConfig, train

from op_table import AVAILABLE

BATCH = 256


@functools.lru_cache(maxsize=1)
def _digits() -> Dataset:
    """The digits, loaded when a test needs them (scikit-learn is not imported at collection)."""
    return load_digits()


def _batches() -> int:
    """Steps per epoch."""
    return math.ceil(_digits().x_train.shape[0] / BATCH)


def _cfg(backend="numpy", **kw):
    base = dict(backend=backend, hidden=(16,), epochs=2, batch_size=BATCH, lr=0.1, progress=False)
    return TrainConfig(**(base | kw))


class _Poison:
    """Patch the training loss so that the given (1-based) steps return ``value``; capture the model."""

    def __init__(self, monkeypatch, steps, value=float("nan")):
        self.steps, self.calls, self.models, self.value = set(steps), 0, [], value
        self.losses = []  # (loss, batch size) of every step
        poison = self

        class PoisonedLoss(nf.SoftmaxCrossEntropy):
            def __call__(self, logits, labels):
                loss, dlogits = super().__call__(logits, labels)
                poison.calls += 1
                if poison.calls in poison.steps:
                    loss = loss * loss.dtype.type(0) + loss.dtype.type(poison.value)
                poison.losses.append((float(nf.to_numpy(loss)), int(labels.shape[0])))
                return loss, dlogits

        real_build = train_module.build_model

        def build_model(cfg, data):
            model, opt = real_build(cfg, data)
            poison.models.append((model, opt))
            return model, opt

        monkeypatch.setattr(train_module, "SoftmaxCrossEntropy", PoisonedLoss)
        monkeypatch.setattr(train_module, "build_model", build_model)

    @property
    def model(self):
        return self.models[-1][0]


def _params(model):
    return [nf.to_numpy(p.data).copy() for p in model.parameters()]


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path, monkeypatch, name, value):
    bad_step = _batches() + 3  # epoch 2, batch index 2
    poison = _Poison(monkeypatch, [bad_step], value)
    ckpt = tmp_path / "run.npz"
    snapshots = {}

    def on_step(epoch, batch):
        if epoch == 1 and batch == 0:
            snapshots["checkpoint"] = ckpt.read_bytes()  # written at the end of epoch 1
        if (epoch, batch) == (1, 1):
            snapshots["params"] = _params(poison.model)

    with pytest.raises(NonFiniteLossError) as info:
        train(_cfg(name, checkpoint=str(ckpt), epochs=3), log=lambda _: None, on_step=on_step)
    message = str(info.value)
    assert f"at epoch 2, batch 2 (step {bad_step})" in message, message
    assert f"loss is {value}" in message and str(ckpt) in message and "untouched" in message
    assert ckpt.read_bytes() == snapshots["checkpoint"], "the last good checkpoint was changed"
    # The offending step's update was not applied.
    for before, after in zip(snapshots["params"], _params(poison.model)):
        np.testing.assert_array_equal(after, before)
    # ... and the checkpoint is a good one: it loads and resumes to the end.
    resumed = train(_cfg(name, checkpoint=str(ckpt), epochs=3, resume=True), log=lambda _: None)
    assert len(resumed.history) == 2 and all(math.isfinite(s.loss) for s in resumed.history)
    assert not list(tmp_path.glob(".*.tmp")), "a temporary checkpoint file was left behind"


def test_stop_without_checkpoint_says_so(monkeypatch):
    _Poison(monkeypatch, [1])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, batch 0 \(step 1\)"):
        train(_cfg(), log=lambda _: None)


@pytest.mark.parametrize("name", AVAILABLE)
def test_skip_skips_exactly_the_bad_steps(monkeypatch, name):
    bad = {2, 4, _batches() + 5}
    poison = _Poison(monkeypatch, bad)
    seen, before = [], {}

    def on_step(epoch, batch):
        step = epoch * _batches() + batch + 1
        if step + 1 in bad:
            before[step + 1] = _params(poison.model)
        if step in bad:  # the skipped step changed nothing
            for a, b in zip(_params(poison.model), before[step]):
                np.testing.assert_array_equal(a, b)
            assert all(p.grad is None for p in poison.model.parameters())
        seen.append(step)

    lines = []
    result = train(_cfg(name, on_nonfinite="skip"), log=lines.append, on_step=on_step)
    assert seen == list(range(1, 2 * _batches() + 1))
    assert [s.skipped_steps for s in result.history] == [2, 1]
    assert all(math.isfinite(s.loss) for s in result.history)
    assert "(2 steps skipped: non-finite loss)" in lines[-2] and "(1 steps skipped" in lines[-1]


def test_skip_on_every_step_finishes_and_changes_nothing(monkeypatch):
    poison = _Poison(monkeypatch, range(1, 10 * _batches()))
    initial = []
    result = train(_cfg(on_nonfinite="skip"), log=lambda _: None,
                   on_step=lambda e, b: initial.append(_params(poison.model)) if not initial else None)
    assert [s.skipped_steps for s in result.history] == [_batches(), _batches()]
    for a, b in zip(_params(poison.model), initial[0]):
        np.testing.assert_array_equal(a, b)
    assert all(s.loss == 0.0 for s in result.history)  # nothing averaged, not NaN


def test_mean_loss_counts_skipped_samples_exactly(monkeypatch):
    """Skipping the last, short batch: the epoch loss is the mean over the samples actually used."""
    assert _digits().x_train.shape[0] % BATCH, "the digits split should end in a short batch"
    poison = _Poison(monkeypatch, [_batches()])  # the short batch
    stats = train(_cfg(epochs=1, on_nonfinite="skip"), log=lambda _: None).history[0]
    assert stats.skipped_steps == 1
    used = [(loss, n) for loss, n in poison.losses if math.isfinite(loss)]
    assert len(used) == _batches() - 1
    expected = sum(loss * n for loss, n in used) / sum(n for _, n in used)
    assert stats.loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", AVAILABLE)
def test_poisoned_sample_stops_or_is_skipped(name):
    x = _digits().x_train.copy()
    x[17, 5] = np.nan
    data = Dataset("poisoned", x, _digits().y_train, _digits().x_test, _digits().y_test)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, batch \d+ \(step \d+\)"):
        train(_cfg(name), log=lambda _: None, data=data)
    result = train(_cfg(name, on_nonfinite="skip", epochs=3, lr=0.3), log=lambda _: None, data=data)
    assert [s.skipped_steps for s in result.history] == [1, 1, 1]
    assert result.test_accuracy > 0.5
    assert all(np.isfinite(nf.to_numpy(p.data)).all() for p in result.model.parameters())


@pytest.mark.parametrize("name", AVAILABLE)
def test_divergence_stops_cleanly(name, tmp_path):
    ckpt = tmp_path / "c.npz"
    with pytest.raises(NonFiniteLossError, match=r"\(step \d+\)"):
        train(_cfg(name, lr=1e30, momentum=0.0, checkpoint=str(ckpt)), log=lambda _: None)
    assert not ckpt.exists()  # no epoch completed, so nothing (and nothing broken) was written


def test_cli_on_nonfinite_stop_and_skip(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "cli.npz"
    argv = ["train", "--backend", "numpy", "--epochs", "2", "--hidden", "8", "--batch-size", str(BATCH),
            "--no-progress", "--checkpoint", str(ckpt)]
    _Poison(monkeypatch, [_batches() + 2])
    assert main(argv) == 1
    out = capsys.readouterr()
    assert f"nnfast: error: loss is nan at epoch 2, batch 1 (step {_batches() + 2})" in out.err
    assert "Traceback" not in out.err
    good = ckpt.read_bytes()
    nf.load(ckpt, nf.MLP([64, 8, 10]))  # the epoch-1 checkpoint is intact and loads

    _Poison(monkeypatch, [_batches() + 2])
    assert main(argv + ["--on-nonfinite", "skip", "--overwrite"]) == 0  # a new run over the old checkpoint
    out = capsys.readouterr().out
    assert "(1 steps skipped: non-finite loss)" in out and "final test accuracy" in out
    assert ckpt.read_bytes() != good  # the finished run saved its own
