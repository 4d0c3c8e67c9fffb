"""The `nnfast` command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nnfast.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "nnfast 0.1.0" in out and "numpy " in out
    for name in ("numpy", "numba", "cupy"):
        assert f"backend {name}: " in out
    assert "gpu: " in out and "cpu cores" in out
    if "backend numba: available" in out:
        assert "numba kernel cache: warm" in out or "numba kernel cache: cold" in out


def test_train_prints_epoch_lines(capsys):
    code = main(["train", "--backend", "numpy", "--epochs", "2", "--hidden", "16", "--no-progress",
                 "--optimizer", "adam", "--activation", "tanh", "--label-smoothing", "0.1"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2
    assert all(k in lines[0] for k in ("loss", "test acc", " s ", "samples/s"))
    assert "final test accuracy" in out


@pytest.mark.parametrize("argv,message", [
    (["train", "--hidden", "0,4"], "expected positive layer sizes"),
    (["train", "--epochs", "-1"], "expected a positive integer"),
    (["train", "--lr", "nan"], "expected a finite number >= 0"),
    (["train", "--label-smoothing", "2"], r"expected a number in \[0, 1\]"),
    (["train", "--activation", "swish"], "invalid choice"),
    (["train", "--backend", "jax"], "invalid choice"),
])
def test_bad_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--backend", "numpy"]) == 2
    assert "nnfast: error: data:" in capsys.readouterr().err
    assert main(["train", "--resume", "--backend", "numpy"]) == 2
    assert "resume: needs a checkpoint path" in capsys.readouterr().err


def test_console_script_entry_point_runs():
    env = dict(os.environ, NNFAST_BACKEND="numpy")
    proc = subprocess.run([sys.executable, "-m", "nnfast.cli", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout and "bench" in proc.stdout


def test_info_survives_numba_cache_internals_it_cannot_read(monkeypatch, capsys):
    numba_backend = pytest.importorskip("nnfast.backends.numba_backend")

    def unreadable():
        raise AttributeError("'FunctionCache' object has no attribute '_cache_path'")

    monkeypatch.setattr(numba_backend, "kernel_cache_status", unreadable)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numba kernel cache: unknown (AttributeError: 'FunctionCache' object has no attribute" in out
