"""Checkpoints under faults: SIGKILL while saving, damaged files, files that try to run code.

* A process SIGKILLed at any point of ``nf.save`` leaves the previous or the
  new checkpoint, loadable and byte-exact -- never a corrupt or missing one.
  Kill points: every Python-level event of the file-system half of ``save``
  (``mkstemp``, ``write``, ``fsync``, ``os.replace``, directory ``fsync``),
  an even spread over the archive-building half, and kills from outside
  after random delays (``fuzz_kill_child.py`` does the killing).
* Truncated, corrupted (every byte flipped in turn), wrong-version and
  wrong-architecture files raise ``ValueError`` and change nothing.
* ``load`` never runs code from a file: pickled object arrays are refused
  without being unpickled.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import nnfast as nf
from nnfast.data import load_path
from nnfast.serialization import FORMAT_VERSION

from fuzz_helpers import expect_error, fingerprint, module_state, optimizer_state

HERE = Path(__file__).resolve().parent
CHILD = HERE / "fuzz_kill_child.py"
SPREAD = 160  # kill points spread evenly over the whole save
# Byte offsets damaged: every one under the thorough profile; by default every one in the zip's
# central directory (the file's tail) and every 3rd elsewhere, to keep the run short.
EXHAUSTIVE = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"


def _offsets(data: bytes) -> list[int]:
    if EXHAUSTIVE:
        return list(range(len(data)))
    tail = data.find(b"PK\x01\x02")  # the first central-directory entry
    tail = tail if tail > 0 else len(data) * 3 // 4
    return sorted(set(range(0, tail, 3)) | set(range(tail - 40, len(data))))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill driver forks (POSIX only)")


def _driver(*args: str, timeout: float = 120) -> list[dict]:
    env = dict(os.environ, NNFAST_BACKEND="numpy", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_sigkill_at_every_point_of_save_leaves_old_or_new_checkpoint(tmp_path):
    (info,) = _driver("count", str(tmp_path))
    assert info["state"] == "new"
    total = info["events"]
    points = sorted(set(info["io_events"]) | {1 + i * total // SPREAD for i in range(SPREAD)}
                    | set(range(max(total - 60, 1), total + 1)) | {2 * total})  # the last lines; past the end
    results = _driver("trace", str(tmp_path), ",".join(map(str, points)))
    assert [r["kill_at"] for r in results] == points
    bad = [r for r in results if r["state"] not in ("old", "new")]
    assert not bad, f"{len(bad)} of {len(points)} kill points left a broken checkpoint: {bad[:5]}"
    killed = [r for r in results if r["outcome"] == "killed"]
    assert len(killed) == len(points) - 1 and results[-1]["outcome"] == "finished"
    states = [r["state"] for r in killed]
    # Killed early: the old checkpoint; once os.replace has run: the new one. Both must occur.
    assert states[0] == "old" and states[-1] == "new", states
    flips = sum(a != b for a, b in zip(states, states[1:]))
    assert flips == 1, "the checkpoint switched from old to new more than once (the write is not atomic)"
    # A killed write can leave its temporary file behind, never anything under the checkpoint's name.
    for r in killed:
        assert all(name.startswith(".model.npz.") and name.endswith(".tmp") for name in r["leftovers"]), r
    print(f"{len(points)} kill points over {total} trace events: "
          f"{states.count('old')} left the old checkpoint, {states.count('new')} the new one")


def test_sigkill_after_random_delays_leaves_old_or_new_checkpoint(tmp_path):
    results = _driver("timed", str(tmp_path), "40", "7")
    assert len(results) == 40 and all(r["outcome"] == "killed" for r in results)
    bad = [r for r in results if r["state"] not in ("old", "new")]
    assert not bad, bad[:5]


# ================================================================= damaged files
def _model_and_opt(seed=0, sizes=(6, 8, 3), dtype="float32", optimizer="adam"):
    model = nf.MLP(list(sizes), activation="relu", dtype=dtype, seed=seed)
    opt = nf.Adam(model.parameters(), lr=0.01) if optimizer == "adam" else nf.SGD(model.parameters(), lr=0.1,
                                                                                   momentum=0.9)
    rng = np.random.default_rng(seed)
    y = model.forward(rng.standard_normal((4, sizes[0])))
    model.backward(rng.standard_normal(tuple(y.shape)))
    opt.step()
    return model, opt


def _state(model, opt):
    return lambda: (module_state(model), optimizer_state(opt))


@pytest.fixture
def saved(tmp_path):
    model, opt = _model_and_opt(seed=1)
    path = nf.save(tmp_path / "ckpt.npz", model, opt, extra={"note": "hello"})
    return path, path.read_bytes(), model, opt


def test_every_truncation_is_a_clear_error(saved, tmp_path):
    path, good, _, _ = saved
    model, opt = _model_and_opt(seed=2)
    state = _state(model, opt)
    bad = tmp_path / "bad.npz"
    for length in _offsets(good):
        bad.write_bytes(good[:length])
        expect_error(lambda: nf.load(bad, model, opt), "path", types=(ValueError,), states=(state,))


def test_every_single_byte_corruption_is_an_error_or_harmless(saved, tmp_path):
    """Flip each byte in turn: ``load`` raises ``ValueError`` or returns exactly the saved values."""
    path, good, ref_model, ref_opt = saved
    values = lambda m, o: ([fingerprint(p.data) for p in m.parameters()], fingerprint(o.state_dict()))  # noqa: E731
    expected = values(ref_model, ref_opt)
    model, opt = _model_and_opt(seed=2)
    state = _state(model, opt)
    bad = tmp_path / "bad.npz"
    harmless = 0
    offsets = _offsets(good)
    for offset in offsets:
        damaged = bytearray(good)
        damaged[offset] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        before = state()
        try:
            nf.load(bad, model, opt)
        except ValueError as err:
            assert str(err).startswith(("path:", "model:", "optimizer")), err
            assert state() == before, f"a failed load at offset {offset} changed the model"
            continue
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"offset {offset}: undocumented {type(err).__name__}: {err}") from err
        harmless += 1  # e.g. a zip field nobody reads; the data must then be intact
        assert values(model, opt) == expected, f"offset {offset} loaded wrong data"
        nf.load(path, model, opt)
    assert harmless < len(offsets) // 4


def _rewrite(path: Path, out: Path, change) -> Path:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, -1, 99, "1", 1.0, 1.5, True, [1], None])
def test_wrong_format_version_is_refused(saved, tmp_path, version):
    path, _, _, _ = saved
    model, opt = _model_and_opt(seed=2)

    def change(arrays):
        if version is None:
            del arrays["nnfast/format_version"]
        else:
            arrays["nnfast/format_version"] = np.asarray(version)

    bad = _rewrite(path, tmp_path / "v.npz", change)
    expect_error(lambda: nf.load(bad, model, opt), "path", types=(ValueError,), states=(_state(model, opt),))


@pytest.mark.parametrize("make,name", [
    (lambda: _model_and_opt(sizes=(6, 9, 3)), "model"),
    (lambda: _model_and_opt(sizes=(6, 8, 8, 3)), "model"),
    (lambda: _model_and_opt(sizes=(6, 3)), "model"),
    (lambda: _model_and_opt(sizes=(7, 8, 3)), "model"),
    (lambda: _model_and_opt(dtype="float64"), "model"),
    (lambda: _model_and_opt(optimizer="sgd"), "optimizer"),
    (lambda: (nf.Sequential(nf.Linear(6, 8, bias=False), nf.ReLU(), nf.Linear(8, 3)), None), "model"),
])
def test_wrong_architecture_is_refused(saved, make, name):
    path, _, _, _ = saved
    model, opt = make()
    states = (_state(model, opt),) if opt is not None else (lambda: module_state(model),)
    expect_error(lambda: nf.load(path, model, opt), name, types=(ValueError,), states=states)


@pytest.mark.parametrize("change,name", [
    (lambda a: a.__setitem__("optim/step", np.asarray(-1)), "optimizer"),
    (lambda a: a.__setitem__("optim/step", np.asarray(2.5)), "optimizer"),
    (lambda a: a.__setitem__("optim/step", np.asarray([1, 2])), "optimizer"),
    (lambda a: a.__setitem__("optim/exp_avg.0", np.zeros((2, 2), np.float32)), "optimizer"),
    (lambda a: a.__setitem__("optim/exp_avg.0", a["optim/exp_avg.0"].astype(np.float64)), "optimizer"),
    (lambda a: a.pop("optim/exp_avg_sq.1"), "optimizer"),
    (lambda a: a.__setitem__("optim/class", np.asarray("SGD")), "optimizer"),
    (lambda a: a.pop("param/0.W"), "model"),
    (lambda a: a.__setitem__("param/0.W", a["param/0.W"].astype(np.int32)), "model"),
    (lambda a: a.__setitem__("param/0.W", a["param/0.W"].T.copy()), "model"),
    (lambda a: a.__setitem__("param/9.W", np.zeros(3, np.float32)), "model"),
])
def test_inconsistent_contents_are_refused(saved, tmp_path, change, name):
    path, _, _, _ = saved
    model, opt = _model_and_opt(seed=2)
    bad = _rewrite(path, tmp_path / "c.npz", change)
    expect_error(lambda: nf.load(bad, model, opt), name, types=(ValueError,), states=(_state(model, opt),))


def test_header_claiming_a_huge_array_is_refused(saved, tmp_path):
    """An .npy member whose header claims 8 TB must give ValueError, not MemoryError."""
    path, good, _, _ = saved
    model, opt = _model_and_opt(seed=2)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    member = buf.getvalue() + bytes(64)
    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, member if item.filename == "param/0.W.npy" else src.read(item))
    expect_error(lambda: nf.load(bad, model, opt), "path", types=(ValueError,), states=(_state(model, opt),))


# ================================================================= no code execution
class _Trap:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("key", ["param/0.W", "nnfast/format_version", "optim/step", "extra/note", "zz/unused"])
def test_load_never_unpickles(saved, tmp_path, key):
    path, _, _, _ = saved
    marker = tmp_path / "PWNED"
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(str(marker))
    bad = _rewrite(path, tmp_path / "evil.npz", lambda a: a.__setitem__(key, trap))
    # Sanity: the trap works when a reader does unpickle.
    with np.load(bad, allow_pickle=True) as f:
        f[key]
    assert marker.exists()
    marker.unlink()
    model, opt = _model_and_opt(seed=2)
    expect_error(lambda: nf.load(bad, model, opt), "path", types=(ValueError,), states=(_state(model, opt),))
    assert not marker.exists(), "load() ran code from the checkpoint"


def test_pickle_files_are_refused_without_running(tmp_path):
    marker = tmp_path / "PWNED"
    payloads = {"raw.npz": pickle.dumps(_Trap(str(marker))), "arr.npz": None}
    (tmp_path / "raw.npz").write_bytes(payloads["raw.npz"])
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(str(marker))
    np.save(tmp_path / "arr.npy", trap, allow_pickle=True)
    os.replace(tmp_path / "arr.npy", tmp_path / "arr.npz")
    model, opt = _model_and_opt()
    for name in payloads:
        expect_error(lambda: nf.load(tmp_path / name, model, opt), "path", types=(ValueError,),
                     states=(_state(model, opt),))
        expect_error(lambda: load_path(tmp_path / name), "data", types=(ValueError,))
        assert not marker.exists(), f"{name}: code from the file ran"
    # A data set whose arrays are pickled objects.
    np.savez(tmp_path / "data.npz", x_train=trap, y_train=np.array([0]), x_test=np.ones((1, 1)), y_test=np.array([0]))
    expect_error(lambda: load_path(tmp_path / "data.npz"), "data", types=(ValueError,))
    assert not marker.exists()


def test_atomic_save_leaves_no_file_when_writing_fails(tmp_path, monkeypatch):
    """A write that fails (disk full) raises, keeps the old checkpoint and removes its temporary file."""
    model, opt = _model_and_opt(seed=1)
    path = nf.save(tmp_path / "c.npz", model, opt)
    good = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    other, other_opt = _model_and_opt(seed=5)
    with pytest.raises(OSError, match="No space left"):
        nf.save(path, other, other_opt)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
