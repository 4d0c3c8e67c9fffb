"""Checkpoints: round trip, atomic writes, clear errors, no pickle."""

from __future__ import annotations

import os

import numpy as np
import pytest

import nnfast as nf


def _trained(seed=0, optimizer="adam"):
    model = nf.MLP([4, 6, 3], activation="relu", seed=seed)
    opt = nf.Adam(model.parameters(), lr=0.01) if optimizer == "adam" else nf.SGD(model.parameters(), lr=0.1,
                                                                                   momentum=0.9)
    loss_fn = nf.SoftmaxCrossEntropy()
    rng = np.random.default_rng(seed)
    for _ in range(3):
        _, d = loss_fn(model.forward(rng.standard_normal((5, 4))), rng.integers(0, 3, 5))
        model.backward(d)
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_round_trip_restores_model_and_optimizer(tmp_path, backend, optimizer):
    model, opt = _trained(0, optimizer)
    path = nf.save(tmp_path / "ckpt.npz", model, opt, extra={"epoch": 7, "note": "hi"})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temporary left behind
    fresh, fresh_opt = _trained(1, optimizer)
    extra = nf.load(path, fresh, fresh_opt)
    assert int(extra["epoch"]) == 7 and str(extra["note"]) == "hi"
    for a, b in zip(model.parameters(), fresh.parameters()):
        np.testing.assert_array_equal(nf.to_numpy(a.data), nf.to_numpy(b.data))
    assert fresh_opt.step_count == opt.step_count == 3
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(fresh_opt.state_dict()[k], v)


def test_file_holds_only_plain_arrays(tmp_path):
    model, opt = _trained()
    nf.save(tmp_path / "c.npz", model, opt)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:
        assert int(f["nnfast/format_version"]) == 1
        assert all(f[k].dtype != object for k in f.files)


def _assert_unchanged(model, before):
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(nf.to_numpy(p.data), b)


def test_bad_files_raise_clear_errors_and_change_nothing(tmp_path):
    model, opt = _trained()
    good = tmp_path / "good.npz"
    nf.save(good, model, opt)
    target, target_opt = _trained(5)
    before = [nf.to_numpy(p.data).copy() for p in target.parameters()]

    with pytest.raises(FileNotFoundError, match="path: no checkpoint"):
        nf.load(tmp_path / "missing.npz", target)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not an nnfast checkpoint .*: it is a damaged .npz archive"):
        nf.load(truncated, target)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not an nnfast checkpoint .*: it is not an .npz"):
        nf.load(garbage, target)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.ones(3))
    with pytest.raises(ValueError, match="not an nnfast checkpoint"):
        nf.load(other, target)
    with np.load(good) as f:
        arrays = dict(f)
    arrays["nnfast/format_version"] = np.asarray(99)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        nf.load(tmp_path / "future.npz", target)
    with pytest.raises(ValueError, match="a different architecture"):
        nf.load(good, nf.MLP([4, 7, 3], seed=0))
    with pytest.raises(ValueError, match="optimizer: checkpoint holds Adam state, got a SGD"):
        nf.load(good, target, nf.SGD(target.parameters(), lr=0.1, momentum=0.9))
    _assert_unchanged(target, before)


def test_save_replaces_atomically(tmp_path, monkeypatch):
    model, opt = _trained()
    path = tmp_path / "c.npz"
    nf.save(path, model, opt)
    original = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    model.parameters()[0].data[...] = 0
    with pytest.raises(OSError, match="disk full"):
        nf.save(path, model, opt)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]


def test_save_rejects_bad_arguments(tmp_path):
    model, _ = _trained()
    with pytest.raises(TypeError, match="model: expected an nnfast Module"):
        nf.save(tmp_path / "x.npz", "model")
    with pytest.raises(TypeError, match="optimizer: expected an nnfast Optimizer"):
        nf.save(tmp_path / "x.npz", model, optimizer=3)
