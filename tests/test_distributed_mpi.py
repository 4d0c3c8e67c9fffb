"""Data-parallel training on real MPI: ``mpiexec -n 2`` (the mpich wheel) on the CPU backends.

* exactness: 2 ranks follow the single-process trajectory (numpy and numba,
  SGD and Adam, a global batch of 7 split 4 + 3, a last batch of 1 row that
  leaves rank 1 empty) and hold bit-identical parameters and optimizer state;
* the CLI: only rank 0 prints and writes the checkpoint, which records the
  world size and global batch, and one process resumes it as it resumes a
  checkpoint of its own (a mid-epoch stop resumed on one process lands on the
  uninterrupted trajectory);
* faults: a rank killed, raising (inside or outside the CLI's guard) or
  hanging ends the job with an error within seconds, never a hang; Ctrl-C
  to mpiexec stops every rank after the same step and rank 0 saves.

Each test launches one job; the ranks run one thread each. Skipped, with
the reason, where mpi4py or an mpiexec is missing (``pip install -e ".[test]"``
installs both).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nnfast as nf
from nnfast.cli import main

from distributed_rank import CASES, config, make_data, run

HERE = Path(__file__).resolve().parent
RANK = HERE / "distributed_rank.py"
BOUND = 60.0  # seconds: a failed job must be over well within this (they take a few)

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py: pip install -e '.[test]' (or '.[mpi]')")


def _mpiexec() -> str:
    from nnfast.distributed import mpiexec_path

    try:
        return mpiexec_path()
    except nf.BackendError as err:
        pytest.skip(str(err))


def launch(ranks: int, *args: str, timeout: float = 300, env: dict | None = None) -> tuple[int, str, str, float]:
    """Run ``mpiexec -n ranks <python> args...``; (exit status, stdout, stderr, seconds).

    The job runs in its own process group, killed whole if it outlives ``timeout``.
    """
    environment = dict(os.environ, NNFAST_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    environment.update(env or {})
    environment = {k: v for k, v in environment.items() if v != ""}  # an empty value in ``env`` unsets
    began = time.monotonic()
    with subprocess.Popen([_mpiexec(), "-n", str(ranks), sys.executable, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=environment,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the job did not end within {timeout} s (a hang)\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err, time.monotonic() - began


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trajectories")
    code, stdout, stderr, _ = launch(2, str(RANK), "trajectories", str(out))
    assert code == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_follow_the_single_process_trajectory(trajectories, case):
    settings, _ = CASES[case]
    if settings["backend"] not in nf.available_backends():
        pytest.skip(f"backend {settings['backend']} is not available here")
    reference, reference_state = run(config(case))
    ranks = [_read(trajectories / f"{case}.rank{r}.npz") for r in range(2)]
    # float64: reduction order only; float32: its rounding, amplified over 15 steps.
    rtol = 1e-10 if settings["dtype"] == "float64" else 2e-5
    expected = {f"param/{name}": nf.to_numpy(p.data) for name, p in reference.model.named_parameters()}
    expected.update({f"optim/{k}": v for k, v in reference_state.items()})
    expected["loss"] = np.array([e.loss for e in reference.history])
    for key, value in expected.items():
        np.testing.assert_allclose(ranks[0][key], value, rtol=rtol, atol=rtol, err_msg=key)
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:  # every rank holds the same bits: parameters and optimizer state
        assert np.array_equal(ranks[0][key], ranks[1][key]), key


def test_a_stop_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    code, stdout, stderr, _ = launch(2, str(RANK), "stop", str(tmp_path))
    assert code == 0, stderr
    stops = [json.loads((tmp_path / f"interrupted.rank{r}.json").read_text()) for r in range(2)]
    assert stops == [[1, 3], [1, 3]]
    assert (tmp_path / "stop.rank0.npz").exists() and not (tmp_path / "stop.rank1.npz").exists()
    # One process resumes the 2-rank checkpoint mid-epoch and lands on the uninterrupted trajectory.
    reference, _ = run(config("numpy-adam"))
    resumed, _ = run(config("numpy-adam", checkpoint=str(tmp_path / "stop.rank0.npz"), resume=True))
    np.testing.assert_allclose([e.loss for e in resumed.history], [e.loss for e in reference.history[1:]],
                               rtol=1e-10)
    for p, q in zip(resumed.model.parameters(), reference.model.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-10, atol=1e-12)


def _cli_args(tmp_path: Path, backend: str) -> list[str]:
    """``nnfast train`` on :func:`make_data` written as .npz; ends with ``--checkpoint`` (add a path)."""
    data = make_data()
    np.savez(tmp_path / "data.npz", x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
             y_test=data.y_test)
    return ["train", "--backend", backend, "--data", str(tmp_path / "data.npz"), "--hidden", "16,8",
            "--batch-size", "7", "--dtype", "float64", "--optimizer", "adam", "--lr", "0.01", "--no-progress",
            "--checkpoint"]


def _assert_same_checkpoint_state(path: Path, expected_path: Path, rtol: float) -> None:
    """Parameters and optimizer state of two checkpoints agree; ``path`` was written by one process."""
    with np.load(path) as got, np.load(expected_path) as expected:
        assert int(got["extra/world_size"]) == 1
        for key in expected.files:
            if key.startswith(("param/", "optim/")) and expected[key].dtype.kind == "f":
                np.testing.assert_allclose(got[key], expected[key], rtol=rtol, atol=rtol / 100, err_msg=key)


def test_cli_rank_zero_prints_and_checkpoints_and_one_process_resumes(tmp_path, capsys):
    args = _cli_args(tmp_path, "numpy") + [str(tmp_path / "ck.npz")]
    code, stdout, stderr, _ = launch(2, "-m", "nnfast.cli", *args, "--epochs", "2", "--distributed")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert sum(line.startswith("epoch") for line in lines) == 2, stdout
    assert sum(line.startswith("final test accuracy") for line in lines) == 1, stdout
    assert "data parallel over 2 ranks (mpi)" in lines[0] and "global batch 7" in lines[0]
    with np.load(tmp_path / "ck.npz") as f:
        assert int(f["extra/world_size"]) == 2 and int(f["extra/global_batch"]) == 7

    # One process resumes the 2-rank checkpoint exactly as it resumes its own one.
    assert main([*args[:-1], str(tmp_path / "one.npz"), "--epochs", "2"]) == 0
    for name in ("ck", "one"):
        assert main([*args[:-1], str(tmp_path / f"{name}.npz"), "--epochs", "3", "--resume"]) == 0
    capsys.readouterr()
    _assert_same_checkpoint_state(tmp_path / "ck.npz", tmp_path / "one.npz", rtol=1e-10)


@pytest.mark.parametrize("scenario,expect", [
    ("kill", "KILLED BY SIGNAL: 9|Killed \\(signal 9\\)|EXIT CODE: 9"),
    ("raise", "nnfast: error: rank 1 of 2: Traceback.*RuntimeError: injected failure on rank 1"),
    ("raise-unguarded", "RuntimeError: injected failure on rank 1.*nnfast: rank 1 of 2 failed; aborting the job"),
    # A per-step collective (which one depends on how far MPI progressed rank 1's last requests).
    ("hang", "nnfast: error: rank 0 of 2: (all-reduce|agreement)[^\\n]+ did not complete within [0-9.]+ s: "
             "another rank has died, hangs or left training early \\(the limit is NNFAST_DIST_TIMEOUT=5 s\\)\n"
             "nnfast: aborting"),
])
def test_a_failing_rank_ends_the_job_with_an_error(tmp_path, scenario, expect):
    # Only the hang needs the deadline; the others must end the job without it.
    env = {"NNFAST_DIST_TIMEOUT": "5" if scenario == "hang" else str(10 * BOUND)}
    code, stdout, stderr, seconds = launch(2, str(RANK), scenario, str(tmp_path), timeout=BOUND * 2, env=env)
    assert code != 0
    assert seconds < BOUND, f"the job took {seconds:.1f} s to end"
    output = stderr + stdout  # mpiexec reports a killed rank on its stdout
    assert re.search(expect, output, flags=re.S), output
    assert not list(tmp_path.glob("finished.rank*")), "a rank finished training although its peer had failed"


def test_ctrl_c_to_mpiexec_stops_every_rank_and_rank_zero_saves(tmp_path):
    args = _cli_args(tmp_path, "numpy") + [str(tmp_path / "ck.npz"), "--epochs", "100000", "--distributed"]
    env = dict(os.environ, NNFAST_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    with subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, "-m", "nnfast.cli", *args], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                          start_new_session=True) as proc:
        try:
            assert proc.stdout.readline().startswith("training"), "rank 0 did not start training"
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does to mpiexec; it passes it to every rank
            out, err = proc.communicate(timeout=BOUND)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    assert proc.returncode == 130, err
    assert err.count("nnfast: interrupted in epoch") == 1 and "--resume" in err, err  # rank 0 alone
    with np.load(tmp_path / "ck.npz") as f:
        assert int(f["extra/world_size"]) == 2 and int(f["extra/batch"]) >= 1  # a mid-epoch save


def test_ranks_of_a_node_share_its_cores_between_their_threads(tmp_path):
    env = {"NNFAST_NUM_THREADS": ""}  # unset below: init() decides
    code, _, stderr, _ = launch(2, str(RANK), "threads", str(tmp_path), env=env)
    assert code == 0, stderr
    expected = str(max(1, os.cpu_count() // 2))
    assert [json.loads((tmp_path / f"threads.rank{r}.json").read_text()) for r in range(2)] == [expected] * 2


def test_a_launcher_of_another_mpi_is_detected(tmp_path):
    # An Open MPI launcher's variables with MPICH underneath: each process would be a world of one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_"))}
    env.update(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0", NNFAST_BACKEND="numpy")
    proc = subprocess.run([sys.executable, "-m", "nnfast.cli", "train", "--distributed", "--epochs", "1"],
                          capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "the launcher started 2 processes but mpi4py's MPI sees a world of 1" in proc.stderr


def _nccl_unavailable() -> str | None:
    from nnfast.backends.cupy_backend import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    if reason is not None:
        return f"no usable GPU: {reason}"
    from nnfast.distributed.nccl_engine import _load_cupy_nccl

    try:
        _load_cupy_nccl()
    except nf.BackendError as err:
        return str(err)
    return None


@pytest.mark.gpu
def test_nccl_world_of_one_follows_the_single_process_trajectory(tmp_path, capsys):
    """The NCCL engine end to end on one GPU: ``mpiexec -n 1 ... --distributed --backend cupy``."""
    reason = _nccl_unavailable()
    if reason is not None:
        pytest.skip(reason)
    args = _cli_args(tmp_path, "cupy")
    code, stdout, stderr, _ = launch(1, "-m", "nnfast.cli", *args, str(tmp_path / "nccl.npz"), "--epochs", "2",
                                     "--distributed")
    assert code == 0, stderr
    assert main([*args, str(tmp_path / "plain.npz"), "--epochs", "2"]) == 0
    capsys.readouterr()
    _assert_same_checkpoint_state(tmp_path / "nccl.npz", tmp_path / "plain.npz", rtol=1e-12)


def test_scaling_benchmark_runs():
    """benchmarks/distributed_scaling.py, on its small model: one process and 2 ranks (a smoke check)."""
    import importlib.util

    _mpiexec()
    spec = importlib.util.spec_from_file_location("distributed_scaling", HERE.parent / "benchmarks" /
                                                  "distributed_scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    for ranks in (None, 2):
        result = scaling.measure("numpy", "[64,128,10] b64", ranks, steps=3, warmup=1)
        assert result["rank"] == 0 and result["world_size"] == (ranks or 1)
        assert result["step_ms"] > 0 and result["cpu_ms"] > 0 and result["buckets"] == (1 if ranks else 0)
