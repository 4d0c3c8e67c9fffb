"""Before training on numba: compiling (or loading) the kernels, saying so on a cold cache, and the TBB layer."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import nnfast as nf  # noqa: E402
from nnfast.backends.numba_kernels import gemm, train_step as ts  # noqa: E402
from nnfast.backends import numba_backend, numba_compile  # noqa: E402
from nnfast.train_step import numba_fused  # noqa: E402
from nnfast.train import TrainConfig, train  # noqa: E402


def _setup():
    with nf.use_backend("numba"):
        model = nf.MLP([12, 16, 5], activation="gelu", seed=0)
        loss_fn = nf.SoftmaxCrossEntropy()
        return model, loss_fn, nf.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("warm", [False, True])
def test_warm_up_makes_the_plans_and_announces_a_cold_cache(monkeypatch, warm):
    monkeypatch.setattr(numba_backend, "kernel_cache_status", lambda: (warm, "somewhere"))
    started = []

    @contextlib.contextmanager
    def beside(*args):  # no child: this process compiles everything
        started.append(args)
        yield None

    monkeypatch.setattr(numba_compile, "beside", beside)
    model, loss_fn, opt = _setup()
    step = nf.TrainStep(model, loss_fn, opt)
    said = []
    seconds = numba_backend.warm_up(step, (8, 5), announce=said.append, after=600.0)
    assert seconds > 0
    assert said == ([] if warm else [numba_backend.COMPILING])
    assert started == ([] if warm else [(np.float32, ["step_serial"])])
    assert step.plan_names == ["fused (batch 8)", "fused (batch 5)"]
    assert opt.step_count == 0


def test_kernels_are_those_the_plans_run(monkeypatch):
    model, loss_fn, opt = _setup()
    made, steps = numba_fused.kernels(model, opt, np.float32, (8, 5))
    assert steps == ["step_serial"]
    kernels = [make() for make in made]
    step = nf.TrainStep(model, loss_fn, opt)
    step.prepare(8)
    plan, = step._plans.values()
    descs, _, info, _, _ = plan._args
    addresses = {k.address for k in kernels}
    assert {int(info[ts.I_TASK]), int(info[ts.I_UPDATE]), int(descs[0, gemm.ACT]),
            int(descs[3 + ts.DXR, gemm.BWD])} == addresses  # task, update, gelu forward and backward
    monkeypatch.setattr(numba_fused, "PARALLEL_MIN_MACS", 8 * (12 * 16 + 16 * 5))
    parallel = numba.config.NUMBA_NUM_THREADS > 1 and numba.get_num_threads() > 1
    assert numba_fused.kernels(model, opt, np.float32, (8, 5))[1] == (
        ["step_parallel", "step_serial"] if parallel else ["step_serial"])
    with nf.use_backend("numba"):
        other = nf.Sequential(nf.Linear(6, 8), nf.Tanh(), nf.Tanh(), nf.Linear(8, 3))
    assert numba_fused.kernels(other, nf.SGD(other.parameters(), lr=0.1), np.float32, (4,)) == ([], [])


def test_a_second_process_compiles_what_the_step_and_evaluation_load(tmp_path):
    """The child's kernels are the ones a run then calls: loaded from the cache, none compiled again."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NNFAST_BACKEND", None)
    child = subprocess.run([sys.executable, "-m", "nnfast.backends.numba_compile", "float32", "step_serial"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr
    code = ("import numpy as np, nnfast as nf\n"
            "model = nf.MLP([12, 16, 5], activation='gelu', seed=0)\n"
            "step = nf.TrainStep(model, nf.SoftmaxCrossEntropy(), nf.SGD(model.parameters(), lr=0.1))\n"
            "step(np.zeros((3, 12), np.float32), np.zeros(3, np.int64))\n"
            "model.forward(np.zeros((3, 12), np.float32))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(env, NNFAST_BACKEND="numba", NUMBA_DEBUG_CACHE="1"))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for kernel in ("train_step.step_serial", "gemm._gemm_op"):
        assert any("data loaded from" in line and f"/{kernel}-" in line for line in lines), run.stdout
        assert not any("saved" in line and f"/{kernel}-" in line for line in lines), run.stdout


def test_the_serial_step_compiles_no_parallel_region(tmp_path):
    """A small model's step runs on the calling thread: compiling its kernel compiles no parallel driver,
    and only float32 code for a float32 step."""
    code = ("import numpy as np\n"
            "from nnfast.backends.numba_kernels import gemm, train_step as ts, softmax_ce\n"
            "from nnfast.train_step.numba_fused import step_types\n"
            "ts.step_serial.compile(step_types(np.float32))\n"
            "print([len(d.signatures) for d in (gemm.run_serial, gemm.run_parallel, ts._ce_serial,"
            " ts._ce_parallel)], {str(s[0].dtype) for s in softmax_ce._ce_rows.signatures})\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NNFAST_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "[1, 0, 1, 0] {'float32'}"


def test_warm_up_announces_when_it_takes_long(monkeypatch):
    """A warm cache that still leaves work (another dtype, a new activation): said once ``after`` has passed."""
    monkeypatch.setattr(numba_backend, "kernel_cache_status", lambda: (True, "somewhere"))
    model, loss_fn, opt = _setup()
    step = nf.TrainStep(model, loss_fn, opt)
    prepare = step.prepare
    monkeypatch.setattr(step, "prepare", lambda *sizes: (__import__("time").sleep(0.5), prepare(*sizes)))
    said = []
    numba_backend.warm_up(step, (4,), announce=said.append, after=0.05)
    assert said == [numba_backend.COMPILING]


def test_warm_up_leaves_what_the_backward_pass_reads():
    """Its forward pass of a dummy row must not replace the caches of a forward pass already made."""
    (model, loss_fn, opt), (ref, ref_loss, _) = _setup(), _setup()
    x = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32)
    labels = np.arange(6) % 5
    grads = []
    for m, fn, warm in ((model, loss_fn, True), (ref, ref_loss, False)):
        _, dlogits = fn(m.forward(x), labels)
        if warm:
            numba_backend.warm_up(nf.TrainStep(m, fn, opt), (6,))
        m.backward(dlogits, need_input_grad=False)
        grads.append([nf.to_numpy(p.grad) for p in m.parameters()])
    for got, expected in zip(*grads):
        np.testing.assert_array_equal(got, expected)


def test_cache_is_warm_once_a_step_has_run():
    model, loss_fn, opt = _setup()
    step = nf.TrainStep(model, loss_fn, opt)
    step(np.zeros((3, 12), np.float32), np.zeros(3, np.int64))
    model.forward(np.zeros((3, 12), np.float32))
    warm, folder = numba_backend.kernel_cache_status()
    assert Path(folder).is_dir() and any(Path(folder).iterdir())
    assert warm, f"no step or GEMM entries in {folder}"


def test_info_reports_a_cold_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NNFAST_BACKEND="numba")
    proc = subprocess.run([sys.executable, "-m", "nnfast.cli", "info"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line, = [line for line in proc.stdout.splitlines() if line.startswith("numba kernel cache: ")]
    assert line.startswith("numba kernel cache: cold") and str(tmp_path) in line


def test_training_says_it_compiles_before_the_first_epoch(monkeypatch):
    monkeypatch.setattr(numba_backend, "kernel_cache_status", lambda: (False, "somewhere"))
    lines = []
    train(TrainConfig(backend="numba", hidden=(16,), epochs=1, batch_size=100, progress=False), log=lines.append)
    said = [i for i, line in enumerate(lines) if line == numba_backend.COMPILING]
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch"))
    assert len(said) == 1 and said[0] < first_epoch


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"),
                    reason="the tbb wheel is a dependency on x86-64 Linux only")
def test_parallel_regions_run_on_tbb():
    """pyproject installs the tbb wheel here; nnfast.backends.numba_kernels makes Numba find it."""
    code = ("import numba, numpy as np\n"
            "import nnfast.backends.numba_backend\n"
            "f = numba.njit(parallel=True)(lambda a: (a * 2).sum())\n"
            "f(np.ones(1000))\n"
            "print(numba.threading_layer())")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tbb"]
