"""The `nnfast` command line."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

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
    (["train", "--hidden", "64,,32"], r"expected comma-separated layer sizes like 256,256, got '64,,32' \(an empty size\)"),
    (["train", "--hidden", "64,"], r"got '64,' \(an empty size\)"),
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
    assert re.search(message, capsys.readouterr().err)


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


# ----------------------------------------------------------------- NNFAST_BACKEND on the command line
BAD_BACKEND_LINE = ("nnfast: error: NNFAST_BACKEND: unknown backend 'bogus'; valid choices are "
                    "numpy, numba, cupy, auto\n")


def _commands() -> list[list[str]]:
    """The two ways to start the command: the installed console script and ``python -m nnfast.cli``."""
    try:
        importlib.metadata.distribution("nnfast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nnfast is not installed in this environment (pip install -e .), so it has no console script")
    script = Path(sys.executable).parent / ("nnfast.exe" if os.name == "nt" else "nnfast")
    assert script.exists(), f"nnfast is installed but its console script {script} is missing"
    return [[str(script)], [sys.executable, "-m", "nnfast.cli"]]


def _run(command, args, backend_variable, cwd):
    env = dict(os.environ, NNFAST_BACKEND=backend_variable)
    return subprocess.run(command + args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args", [[], ["--help"], ["info"], ["train"], ["train", "--help"], ["bench", "--quick"],
                                  ["train", "--hidden", "64,,32"], ["frobnicate"]])
def test_bad_backend_variable_is_one_line_and_exit_2(args, tmp_path):
    for command in _commands():
        proc = _run(command, args, "bogus", tmp_path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", BAD_BACKEND_LINE), (command, args)


@pytest.mark.parametrize("backend_flag", [["--backend", "numpy"], ["--backend=numpy"], ["--back", "numpy"]])
def test_backend_flag_wins_over_a_bad_variable(backend_flag, tmp_path):
    for command in _commands():
        proc = _run(command, ["train", *backend_flag, "--epochs", "1", "--hidden", "8", "--no-progress"],
                    "bogus", tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "backend numpy" in proc.stdout and "final test accuracy" in proc.stdout and proc.stderr == ""


def test_library_import_still_raises_for_a_bad_variable(tmp_path):
    for code in ("import nnfast", "import nnfast.cli"):  # not the command: the documented BackendError
        proc = _run([sys.executable, "-c", code], [], "bogus", tmp_path)
        assert proc.returncode == 1
        assert "nnfast.errors.BackendError: NNFAST_BACKEND: unknown backend 'bogus'" in proc.stderr


def test_good_backend_variable_is_left_alone(tmp_path):
    (command, *_) = _commands()
    proc = _run(command, ["info"], "NumPy", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "NNFAST_BACKEND=NumPy" in proc.stdout and "default backend: numpy" in proc.stdout


# ----------------------------------------------------------------- help text
def test_train_help_shows_defaults_in_the_form_accepted(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--hidden SIZES hidden layer sizes, comma-separated (default: 256,256)" in text
    assert "(256, 256)" not in text
    assert re.search(r"--dtype \{float32,float64\} floating-point type of the parameters .*\(default: float32\)",
                     text)
    for flag in ("--overwrite", "--resume", "--checkpoint"):
        assert re.search(rf"{flag}\b[^-]*\w+ \w+", text), flag


# ----------------------------------------------------------------- checkpoints and outputs
SMALL = ["train", "--backend", "numpy", "--epochs", "2", "--hidden", "8", "--no-progress"]


def test_resume_of_a_finished_run_reports_the_stored_model(tmp_path, capsys):
    ckpt = str(tmp_path / "c.npz")
    assert main(SMALL + ["--checkpoint", ckpt]) == 0
    first = capsys.readouterr().out
    assert main(SMALL + ["--checkpoint", ckpt, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing left to train" in out and "nan" not in out
    final = re.search(r"final test accuracy: (\d+\.\d+)%", out).group(1)
    assert f"final test accuracy: {final}%" in first


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path, capsys):
    ckpt = tmp_path / "c.npz"
    assert main(SMALL + ["--checkpoint", str(ckpt)]) == 0
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(SMALL + ["--checkpoint", str(ckpt), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--resume" in err and "--overwrite" in err
    assert ckpt.read_bytes() == before
    assert main(SMALL + ["--checkpoint", str(ckpt), "--seed", "3", "--overwrite"]) == 0
    assert ckpt.read_bytes() != before
    assert main(SMALL + ["--checkpoint", str(ckpt), "--resume", "--overwrite"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_missing_checkpoint_directory_fails_before_training(tmp_path, capsys):
    missing = tmp_path / "no" / "dir"
    assert main(SMALL + ["--checkpoint", str(missing / "run.npz")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"nnfast: error: checkpoint: cannot write {str(missing / 'run.npz')!r}: "
                                 f"directory {str(missing.parent.resolve() / 'dir')!r} does not exist "
                                 "(nnfast does not create it)\n")
    assert list(tmp_path.iterdir()) == []


def test_text_files_are_named_as_not_data_and_not_checkpoints(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert main(SMALL + ["--data", str(text)]) == 2
    err = capsys.readouterr().err
    assert "is not a data file nnfast reads (expected an .npz file with arrays x_train" in err
    assert main(SMALL + ["--checkpoint", str(text), "--resume"]) == 2
    err2 = capsys.readouterr().err
    assert "is not an nnfast checkpoint (expected an .npz file written by nnfast.save" in err2
    for message in (err, err2):
        assert message.count("\n") == 1 and "pickle=" not in message and "it is not an .npz (zip) archive" in message


BENCH = ["bench", "--quick", "--backend", "numpy", "--ops", "softmax", "--no-torch", "--no-progress"]


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_bench_refuses_a_missing_output_directory(flag, tmp_path, capsys):
    target = tmp_path / "missing" / "report"
    assert main(BENCH + [flag, str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"nnfast bench: error: {flag}: cannot write ")
    assert "does not exist (nnfast does not create it)" in err
    assert list(tmp_path.iterdir()) == []


def test_bench_says_where_each_file_was_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(BENCH + ["--json", "r.json", "--markdown", "r.md"]) == 0
    out = capsys.readouterr().out
    assert f"wrote the JSON report to {tmp_path / 'r.json'}\n" in out
    assert f"wrote the Markdown tables to {tmp_path / 'r.md'}\n" in out
    assert (tmp_path / "r.json").stat().st_size > 0 and (tmp_path / "r.md").stat().st_size > 0


def test_info_survives_numba_cache_internals_it_cannot_read(monkeypatch, capsys):
    numba_backend = pytest.importorskip("nnfast.backends.numba_backend")

    def unreadable():
        raise AttributeError("'FunctionCache' object has no attribute '_cache_path'")

    monkeypatch.setattr(numba_backend, "kernel_cache_status", unreadable)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numba kernel cache: unknown (AttributeError: 'FunctionCache' object has no attribute" in out
