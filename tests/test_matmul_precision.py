"""The matmul precision switch: nf.set_matmul_precision, nf.matmul_precision, NNFAST_MATMUL_PRECISION.

PyTorch's meaning: "highest" (the default) keeps float32 matmuls in float32,
"high" lets the GPU run them on TF32 tensor cores. The CPU backends accept
both and compute the same bits under either. What "high" does on the CuPy
backend is tested on the CPU emulation (tests/test_cuda_tf32_gemm_emulation.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import nnfast as nf
from gemm_cases import linear_outputs, random_case
from nnfast import precision


def _run(args: list[str], value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NNFAST_MATMUL_PRECISION", "NNFAST_BACKEND")}
    if value is not None:
        env["NNFAST_MATMUL_PRECISION"] = value
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_default_is_highest_and_set_changes_it():
    assert nf.get_matmul_precision() == "highest"
    try:
        nf.set_matmul_precision("high")
        assert nf.get_matmul_precision() == "high"
    finally:
        nf.set_matmul_precision("highest")
    assert nf.get_matmul_precision() == "highest"


def test_the_context_nests_and_restores_even_after_an_exception():
    with nf.matmul_precision("high") as value:
        assert value == "high" and nf.get_matmul_precision() == "high"
        with nf.matmul_precision("highest"):
            assert nf.get_matmul_precision() == "highest"
        assert nf.get_matmul_precision() == "high"
        with pytest.raises(RuntimeError):
            with nf.matmul_precision("highest"):
                raise RuntimeError("inside")
        assert nf.get_matmul_precision() == "high"
    assert nf.get_matmul_precision() == "highest"


def test_the_context_is_per_thread():
    seen = []
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(10)
        seen.append(nf.get_matmul_precision())
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with nf.matmul_precision("high"):
        inside.set()
        done.wait(10)
    t.join()
    assert seen == ["highest"]


@pytest.mark.parametrize("bad,message", [
    ("medium", "got 'medium' (PyTorch's 'medium', bfloat16 matmuls, is not supported)"),
    ("HIGH", "got 'HIGH'"),
    ("tf32", "got 'tf32'"),
    (3, "got 3"),
    (None, "got None"),
])
def test_bad_values_raise_naming_the_choices(bad, message):
    with pytest.raises(ValueError) as err:
        nf.set_matmul_precision(bad)
    assert str(err.value) == f"precision: expected 'highest' or 'high', {message}"
    with pytest.raises(ValueError, match="precision"):
        with nf.matmul_precision(bad):
            pass
    assert nf.get_matmul_precision() == "highest"


@pytest.mark.parametrize("value,expected", [(None, "highest"), ("high", "high"), (" HIGH ", "high"),
                                            ("highest", "highest"), ("", "highest")])
def test_the_environment_variable_is_read_at_import(value, expected):
    proc = _run(["-c", "import nnfast as nf; print(nf.get_matmul_precision())"], value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_a_bad_environment_value_raises_at_import():
    proc = _run(["-c", "import nnfast"], "fast")
    assert proc.returncode != 0
    assert "ValueError: NNFAST_MATMUL_PRECISION: expected 'highest' or 'high', got 'fast'" in proc.stderr


def test_the_command_reports_a_bad_environment_value_in_one_line():
    for command in (["-m", "nnfast.cli", "info"], ["-m", "nnfast.cli", "train", "--help"]):
        proc = _run(command, "fast")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == "nnfast: error: NNFAST_MATMUL_PRECISION: expected 'highest' or 'high', got 'fast'\n"


def test_the_command_line_flag_overrides_the_environment():
    proc = _run(["-m", "nnfast.cli", "train", "--backend", "numpy", "--epochs", "1", "--hidden", "8",
                 "--no-progress", "--matmul-precision", "high"], "fast")
    assert proc.returncode == 0, proc.stderr
    assert "matmul precision high" in proc.stdout  # the run says what it used
    proc = _run(["-m", "nnfast.cli", "train", "--matmul-precision", "medium"], None)
    assert proc.returncode == 2 and "invalid choice: 'medium'" in proc.stderr


def test_info_shows_the_precision(capsys):
    from nnfast.cli import main

    with nf.matmul_precision("high"):
        assert main(["info"]) == 0
    assert "matmul precision: high" in capsys.readouterr().out


@pytest.mark.parametrize("name", [n for n in ("numpy", "numba") if n in nf.available_backends()])
def test_the_cpu_backends_compute_the_same_bits_under_either(name):
    backend = nf.backends.backend_for(name)
    x, W, b, dy = random_case(np.random.default_rng(0), (33, 70, 45), np.float32)
    runs = []
    for value in ("highest", "high"):
        with nf.matmul_precision(value):
            runs.append(linear_outputs(backend, x, W, b, "gelu", dy))
    for key, array in runs[0].items():
        assert array.tobytes() == runs[1][key].tobytes(), key


def test_a_train_step_makes_its_plans_anew_when_the_precision_changes(monkeypatch):
    with nf.use_backend("numpy"):
        model = nf.MLP([8, 16, 3], seed=0)
        step = nf.TrainStep(model, nf.SoftmaxCrossEntropy(), nf.SGD(model.parameters(), lr=0.1))
        built = []
        original = type(step)._build
        monkeypatch.setattr(type(step), "_build", lambda self, key: built.append(key) or original(self, key))
        x, labels = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32), np.arange(4) % 3
        step(x, labels)
        step(x, labels)
        with nf.matmul_precision("high"):
            step(x, labels)
        assert len(built) == 2


def test_the_module_lists_what_cuda_launch_accepts():
    from nnfast.backends import cuda_launch

    assert precision.PRECISIONS == ("highest", "high")
    for value in precision.PRECISIONS:
        cuda_launch.gemm_launch(8, 8, 8, np.float32, precision=value)
    with pytest.raises(ValueError, match="precision: expected one of 'highest', 'high', got 'medium'"):
        cuda_launch.gemm_launch(8, 8, 8, np.float32, precision="medium")
