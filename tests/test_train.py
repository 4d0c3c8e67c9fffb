"""The main job: training on digits, exact resume, Ctrl-C, data loaders."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import nnfast as nf
from nnfast import data as data_module
from nnfast.data import load_dataset, load_path, read_idx
from nnfast.train import Interrupted, TrainConfig, default_checkpoint_path, train


def test_default_training_on_digits_reaches_97_percent():
    result = train(TrainConfig(backend="numpy", progress=False), log=lambda _: None)
    assert result.test_accuracy >= 0.97
    losses = [e.loss for e in result.history]
    assert losses[-1] < losses[0] / 10


def _quick(**kw):
    base = dict(backend="numpy", hidden=(32,), epochs=3, batch_size=50, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_continues_the_same_trajectory(tmp_path, optimizer):
    full = train(_quick(optimizer=optimizer), log=lambda _: None)
    ckpt = str(tmp_path / "run.npz")
    stop_at = (1, 10)  # epoch 2, batch 10

    class Stop:
        def __init__(self):
            self.event = __import__("threading").Event()

        def __call__(self, epoch, batch):
            if (epoch, batch) == stop_at:
                self.event.set()

    stopper = Stop()
    with pytest.raises(Interrupted, match="interrupted in epoch 2 after batch 11"):
        train(_quick(optimizer=optimizer, checkpoint=ckpt), log=lambda _: None, stop=stopper.event,
              on_step=stopper)
    resumed = train(_quick(optimizer=optimizer, checkpoint=ckpt, resume=True), log=lambda _: None)
    assert [e.epoch for e in resumed.history] == [2, 3]
    for a, b in zip(full.history[1:], resumed.history):
        assert a.loss == b.loss and a.test_accuracy == b.test_accuracy
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        np.testing.assert_array_equal(nf.to_numpy(p.data), nf.to_numpy(q.data))


def _assert_same_run(a, b, epochs):
    """``b``'s history equals ``a``'s for ``epochs`` (1-based), and the models are bit for bit equal."""
    by_epoch = {e.epoch: e for e in a.history}
    assert [e.epoch for e in b.history] == list(epochs)
    for e in b.history:
        assert (e.loss, e.test_accuracy) == (by_epoch[e.epoch].loss, by_epoch[e.epoch].test_accuracy)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        np.testing.assert_array_equal(nf.to_numpy(p.data), nf.to_numpy(q.data))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("first", [1, 2])
def test_extending_a_finished_run_equals_a_longer_run(tmp_path, optimizer, first):
    straight = train(_quick(optimizer=optimizer, epochs=3), log=lambda _: None)
    ckpt = str(tmp_path / "run.npz")
    train(_quick(optimizer=optimizer, epochs=first, checkpoint=ckpt), log=lambda _: None)
    extended = train(_quick(optimizer=optimizer, epochs=3, checkpoint=ckpt, resume=True), log=lambda _: None)
    _assert_same_run(straight, extended, range(first + 1, 4))


def test_extending_a_checkpoint_without_rng_state_replays_the_shuffles(tmp_path):
    """Checkpoints written at an epoch end without the shuffling RNG's state still extend exactly."""
    straight = train(_quick(epochs=3), log=lambda _: None)
    ckpt = tmp_path / "run.npz"
    train(_quick(epochs=2, checkpoint=str(ckpt)), log=lambda _: None)
    with np.load(ckpt) as f:
        arrays = dict(f)
    assert arrays["extra/rng_state"].item() != ""
    arrays["extra/rng_state"] = np.asarray("")
    np.savez(ckpt, **arrays)
    extended = train(_quick(epochs=3, checkpoint=str(ckpt), resume=True), log=lambda _: None)
    _assert_same_run(straight, extended, [3])


def test_resuming_a_finished_run_evaluates_the_stored_model(tmp_path):
    ckpt = str(tmp_path / "run.npz")
    done = train(_quick(epochs=2, checkpoint=ckpt), log=lambda _: None)
    before = (tmp_path / "run.npz").read_bytes()
    lines = []
    again = train(_quick(epochs=2, checkpoint=ckpt, resume=True), log=lines.append)
    assert again.history == [] and again.test_accuracy == done.test_accuracy == done.history[-1].test_accuracy
    assert any(line.startswith("nothing left to train:") and "2 epochs" in line for line in lines), lines
    fewer = train(_quick(epochs=1, checkpoint=ckpt, resume=True), log=lambda _: None)
    assert fewer.history == [] and fewer.test_accuracy == done.test_accuracy
    assert (tmp_path / "run.npz").read_bytes() == before


def test_checkpoint_directory_is_checked_before_training(tmp_path):
    lines = []
    with pytest.raises(FileNotFoundError, match=r"checkpoint: cannot write .*directory .*missing' does not exist"):
        train(_quick(checkpoint=str(tmp_path / "missing" / "run.npz")), log=lines.append)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="checkpoint: .* is not a directory"):
        train(_quick(checkpoint=str(tmp_path / "file" / "run.npz")), log=lines.append)
    with pytest.raises(IsADirectoryError, match="checkpoint: .* is a directory"):
        train(_quick(checkpoint=str(tmp_path)), log=lines.append)
    assert lines == []  # nothing was trained (the first log line announces training)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_new_run_refuses_to_replace_a_checkpoint_unless_asked(tmp_path):
    ckpt = tmp_path / "run.npz"
    first = train(_quick(epochs=1, checkpoint=str(ckpt)), log=lambda _: None)
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match=r"run.npz' already exists; continue that run with --resume"):
        train(_quick(epochs=1, checkpoint=str(ckpt), seed=1), log=lambda _: None)
    assert ckpt.read_bytes() == before
    other = train(_quick(epochs=1, checkpoint=str(ckpt), seed=1, overwrite=True), log=lambda _: None)
    extra = nf.load(ckpt, other.model)
    assert int(extra["epoch"]) == 1 and ckpt.read_bytes() != before
    assert first.history[0].loss != other.history[0].loss
    with pytest.raises(ValueError, match="overwrite: cannot be combined with resume"):
        _quick(checkpoint=str(ckpt), resume=True, overwrite=True)


def test_ctrl_c_without_checkpoint_never_replaces_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_checkpoint_path(None) == str(tmp_path / "nnfast-digits.npz")
    (tmp_path / "nnfast-digits.npz").write_text("an earlier run")
    (tmp_path / "nnfast-digits-2.npz").write_text("another")
    assert default_checkpoint_path(None) == str(tmp_path / "nnfast-digits-3.npz")
    assert default_checkpoint_path("/data/mnist.npz") == str(tmp_path / "nnfast-mnist.npz")


def test_resume_refuses_other_settings(tmp_path):
    ckpt = str(tmp_path / "run.npz")
    train(_quick(epochs=1, checkpoint=ckpt), log=lambda _: None)
    with pytest.raises(ValueError, match=r"other settings: hidden=\[32\] \(now \[16\]\)"):
        train(_quick(hidden=(16,), checkpoint=ckpt, resume=True), log=lambda _: None)
    with pytest.raises(ValueError, match="resume: needs a checkpoint"):
        TrainConfig(resume=True)


def test_ctrl_c_saves_checkpoint_and_exits_cleanly(tmp_path):
    ckpt = tmp_path / "c.npz"
    env = dict(os.environ, NNFAST_BACKEND="numpy", PYTHONUNBUFFERED="1")
    with subprocess.Popen(
            [sys.executable, "-m", "nnfast.cli", "train", "--epochs", "100000", "--hidden", "8", "--no-progress",
             "--checkpoint", str(ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            line = proc.stdout.readline()
            while line and not line.startswith("epoch"):
                line = proc.stdout.readline()
            assert line.startswith("epoch"), proc.stderr.read()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"checkpoint saved to {ckpt}" in err and "--resume" in err
    model = nf.MLP([64, 8, 10], seed=123)
    extra = nf.load(ckpt, model)
    assert int(extra["epoch"]) >= 1


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    # `with`: from Python 3.12 an unclosed GzipFile is not flushed when the statement ends.
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_loads_like_mnist(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4))
    labels = rng.integers(0, 10, 20)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images[:5], gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels[:5], gz)
    data = load_path(tmp_path)
    assert data.x_train.shape == (20, 16) and data.x_train.dtype == np.float32
    np.testing.assert_allclose(data.x_train, images.reshape(20, 16) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_test, labels[:5])
    result = train(TrainConfig(data=str(tmp_path), backend="numpy", hidden=(8,), epochs=1, progress=False),
                   log=lambda _: None)
    assert len(result.history) == 1


def test_npz_loads_keras_layout(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (12, 3, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 12, dtype=np.uint8), x_test=rng.integers(0, 256, (4, 3, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 4, dtype=np.uint8))
    data = load_path(tmp_path / "mnist.npz")
    assert data.x_train.shape == (12, 9) and data.x_train.max() <= 1.0 and data.y_train.dtype == np.int64


def test_bad_data_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_path(tmp_path / "nope")
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9]) + b"abc")
    with pytest.raises(ValueError, match="has 11 bytes, its header"):
        read_idx(short)
    with pytest.raises(ValueError, match="has no train-images-idx3-ubyte"):
        load_path(tmp_path)
    np.savez(tmp_path / "partial.npz", x_train=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"lacks arrays \['y_train', 'x_test', 'y_test'\]"):
        load_path(tmp_path / "partial.npz")


def test_files_that_are_not_data_say_what_is_accepted(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("x_train, y_train\n1, 2\n")
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1), x_test=np.zeros((1, 1)),
             y_test=np.zeros(1))
    for path, why in ((text, "it is not an .npz \\(zip\\) archive"), (objects, "it holds an array of Python objects")):
        with pytest.raises(ValueError) as info:
            load_path(path)
        message = str(info.value)
        assert re.match(rf"data: '.*{path.name}' is not a data file nnfast reads \(expected an .npz file with "
                        rf"arrays x_train, y_train, x_test, y_test, or a directory of MNIST-style IDX files .*\): "
                        rf"{why}", message), message
        assert "pickle=" not in message


def test_digits_split_is_fixed():
    a, b = load_dataset(), load_dataset()
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64) and a.classes == 10
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_digits_are_scikit_learns(monkeypatch):
    """Read from scikit-learn's CSV file, or with its loader where the file is missing: the same arrays."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    direct = data_module._digits()
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    for data, target in (direct, data_module._digits()):
        assert data.dtype == bunch.data.dtype and target.dtype == bunch.target.dtype
        np.testing.assert_array_equal(data, bunch.data)
        np.testing.assert_array_equal(target, bunch.target)


@pytest.mark.parametrize("name", [n for n in nf.available_backends() if n != "numpy"] or
                         [pytest.param("none", marks=pytest.mark.skip(reason="no fast backend can run here"))])
def test_fast_backend_trains_as_well_as_numpy(name):
    reference = train(TrainConfig(backend="numpy", progress=False), log=lambda _: None)
    fast = train(TrainConfig(backend=name, progress=False), log=lambda _: None)
    assert fast.test_accuracy >= 0.97
    assert abs(fast.test_accuracy - reference.test_accuracy) <= 0.005 + 1e-12
