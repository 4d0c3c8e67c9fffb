"""Data-parallel training without MPI or a GPU: ranks as threads, NCCL through stand-ins.

The real MPI runs are in test_distributed_mpi.py; these tests check the
logic they share (sharding, weighting, buckets, the order in which
collectives start, rank-0-only checkpoints, resuming on another world size,
the NCCL engine's stream/event/NCCL calls and its watchdog) quickly and
deterministically.
"""

from __future__ import annotations

import threading
from fractions import Fraction

import numpy as np
import pytest

import nnfast as nf
from nnfast.cli import main
from nnfast.distributed import (
    CollectiveTimeout,
    DataParallel,
    SingleProcess,
    abort_on_error,
    plan_buckets,
    shard_bounds,
)
from nnfast.distributed import nccl_engine
from nnfast.distributed.engine import timeout_from_env, wait_until
from nnfast.distributed.launch import announced_world_size, launched_by_mpi
from nnfast.train import Interrupted

from distributed_rank import CASES, Keep, config, run
from fake_collectives import FakeCuda, FakeEngine, FakeNccl, ThreadWorld


# ---------------------------------------------------------------- sharding
def test_shards_partition_every_batch_and_weights_sum_to_one():
    for rows in range(1, 41):
        for size in range(1, 8):
            bounds = [shard_bounds(rows, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, disjoint
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert sum(Fraction(s, rows) for s in sizes) == 1


def test_an_empty_shard_computes_one_row_with_weight_zero():
    dp = DataParallel(FakeEngine(ThreadWorld(3), 2))
    rows = dp.shard(np.array([5, 9]))  # 2 rows, 3 ranks: rank 2 has none
    assert rows.tolist() == [5] and dp._weight == 0.0


# ---------------------------------------------------------------- buckets
def test_buckets_follow_backward_order_and_respect_the_cap():
    with nf.use_backend("numpy"):
        model = nf.MLP([12, 300, 7, 3], dtype="float32", seed=0)
    named = model.named_parameters()
    groups = plan_buckets(named, 4000)
    flat = [name for group in groups for name, _ in group]
    assert flat == [name for name, _ in reversed(named)]
    for group in groups:
        nbytes = sum(p.data.nbytes for _, p in group)
        assert nbytes <= 4000 or len(group) == 1
    # float32 bytes: 2.b 12, 2.W 84, 1.b 28, 1.W 8400 (over the cap: alone), 0.b 1200, 0.W 14400.
    assert [[name for name, _ in g] for g in groups] == [["2.b", "2.W", "1.b"], ["1.W"], ["0.b"], ["0.W"]]
    assert [name for name, _ in plan_buckets(named, 1 << 30)[0]] == [name for name, _ in reversed(named)]


def test_buckets_never_mix_dtypes():
    with nf.use_backend("numpy"):
        a, b = nf.Linear(4, 3, dtype="float32", seed=0), nf.Linear(3, 2, dtype="float64", seed=0)
    groups = plan_buckets([("a.W", a.W), ("a.b", a.b), ("b.W", b.W), ("b.b", b.b)], 1 << 20)
    assert [[n for n, _ in g] for g in groups] == [["b.b", "b.W"], ["a.b", "a.W"]]


# ------------------------------------------------------- trajectories (threads)
def _threaded(size: int, cfg_for_rank, bucket_bytes: int, **kwargs):
    world = ThreadWorld(size)

    def rank_run(rank: int):
        return run(cfg_for_rank(rank), parallel=DataParallel(FakeEngine(world, rank), bucket_bytes), **kwargs)

    return world.run(rank_run)


def _assert_same_trajectory(reference, results, rtol: float) -> None:
    (ref, ref_state) = reference
    for result, state in results:
        np.testing.assert_allclose([e.loss for e in result.history], [e.loss for e in ref.history], rtol=rtol)
        for (name, p), (_, q) in zip(result.model.named_parameters(), ref.model.named_parameters()):
            np.testing.assert_allclose(nf.to_numpy(p.data), nf.to_numpy(q.data), rtol=rtol, atol=rtol, err_msg=name)
        for key in ref_state:
            np.testing.assert_allclose(state[key], ref_state[key], rtol=rtol, atol=rtol, err_msg=key)


def _assert_ranks_identical(results) -> None:
    (first, first_state), *others = results
    for result, state in others:
        for (name, p), (_, q) in zip(result.model.named_parameters(), first.model.named_parameters()):
            assert np.array_equal(nf.to_numpy(p.data), nf.to_numpy(q.data)), name
        assert state.keys() == first_state.keys()
        for key in state:
            assert np.array_equal(state[key], first_state[key]), key


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("case", ["numpy-sgd", "numpy-adam"])
@pytest.mark.parametrize("bucket_bytes", [256, 1 << 20])
def test_threaded_ranks_follow_the_single_process_trajectory(case, size, bucket_bytes):
    reference = run(config(case))
    results = _threaded(size, lambda rank: config(case), bucket_bytes)
    _assert_same_trajectory(reference, results, rtol=1e-10)
    _assert_ranks_identical(results)


def test_rank_zero_broadcasts_its_parameters_and_optimizer_state():
    class Perturbed(Keep):
        def attach(self, model, optimizer, stop):
            if self.inner.rank == 1:  # rank 1 starts from other weights and another optimizer state
                for p in model.parameters():
                    p.data += 1.0
                for states in optimizer.state.values():
                    for state in states:
                        state += 0.5
                optimizer.step_count = 11
            super().attach(model, optimizer, stop)

    world = ThreadWorld(2)
    results = world.run(lambda rank: run(config("numpy-adam"), parallel=Perturbed(
        DataParallel(FakeEngine(world, rank), 256))))
    _assert_same_trajectory(run(config("numpy-adam")), results, rtol=1e-10)
    _assert_ranks_identical(results)


def test_a_stop_on_one_rank_stops_all_after_the_same_step_and_resumes_on_another_world_size(tmp_path):
    stop_events = [threading.Event(), threading.Event()]
    interrupted = [None, None]

    def rank_run(rank: int):
        def on_step(epoch: int, batch: int) -> None:
            if rank == 1 and (epoch, batch) == (1, 1):
                stop_events[1].set()

        engine = FakeEngine(world, rank)
        cfg = config("numpy-adam", checkpoint=str(tmp_path / f"rank{rank}.npz"))
        try:
            run(cfg, parallel=DataParallel(engine, 256), stop=stop_events[rank], on_step=on_step)
        except Interrupted as err:
            interrupted[rank] = (err.epoch, err.batch)

    world = ThreadWorld(2)
    world.run(rank_run)
    # Rank 1 asked after step (1, 1); the vote of step (1, 2) carries it: both stop after batch 3.
    assert interrupted == [(1, 3), (1, 3)]
    assert (tmp_path / "rank0.npz").exists() and not (tmp_path / "rank1.npz").exists()
    with np.load(tmp_path / "rank0.npz") as f:
        assert int(f["extra/world_size"]) == 2 and int(f["extra/global_batch"]) == 7

    # Resume on three ranks (each reads rank 0's file) and on one: both continue the same trajectory.
    reference = run(config("numpy-adam"))
    for r in range(3):
        (tmp_path / f"three{r}.npz").write_bytes((tmp_path / "rank0.npz").read_bytes())
    world = ThreadWorld(3)
    resumed = world.run(lambda rank: run(config("numpy-adam", checkpoint=str(tmp_path / f"three{rank}.npz"),
                                                resume=True), parallel=DataParallel(FakeEngine(world, rank), 256)))
    single = run(config("numpy-adam", checkpoint=str(tmp_path / "rank0.npz"), resume=True))
    for result, _ in [*resumed, single]:
        assert [e.epoch for e in result.history] == [2, 3]
        np.testing.assert_allclose([e.loss for e in result.history], [e.loss for e in reference[0].history[1:]],
                                   rtol=1e-10)
        for p, q in zip(result.model.parameters(), reference[0].model.parameters()):
            np.testing.assert_allclose(p.data, q.data, rtol=1e-10, atol=1e-12)
    _assert_ranks_identical(resumed)


def test_single_process_checkpoints_record_world_size_one(tmp_path):
    run(config("numpy-sgd", epochs=1, checkpoint=str(tmp_path / "c.npz")))
    with np.load(tmp_path / "c.npz") as f:
        assert int(f["extra/world_size"]) == 1 and int(f["extra/global_batch"]) == 7


# ------------------------------------------------------------ overlap order
def test_a_bucket_is_reduced_as_soon_as_its_layers_backward_is_done():
    with nf.use_backend("numpy"):
        model = nf.MLP([12, 16, 16, 4], dtype="float64", seed=0)
        opt = nf.SGD(model.parameters(), lr=0.1)
        engine = FakeEngine(ThreadWorld(1), 0)
        # float64: layer 2 is 2.b + 2.W = 544 bytes, 1.b 128, 1.W 2048, 0.b 128, 0.W 1536.
        dp = DataParallel(engine, bucket_bytes=600)
        dp.attach(model, opt, threading.Event())
        assert [b.names for b in dp.buckets] == [["2.b", "2.W"], ["1.b"], ["1.W"], ["0.b"], ["0.W"]]
        layers = {id(layer): i for i, layer in enumerate(model.layers)}

        def after_layer(layer):
            engine.calls.append(("layer done", str(layers[id(layer)])))
            dp.after_layer(layer)

        x, labels = np.random.default_rng(0).normal(size=(5, 12)), np.array([0, 1, 2, 3, 0])
        for _ in range(2):  # the second step reuses the buckets
            engine.calls.clear()
            loss, dlogits = dp.global_loss(*nf.SoftmaxCrossEntropy()(model.forward(x[dp.shard(np.arange(5))]),
                                                                      labels))
            model.backward(dlogits, need_input_grad=False, after_layer=after_layer)
            dp.reduce_gradients()
            opt.step()
            opt.zero_grad()
            started = [what.split(" (")[0] if kind == "allreduce" else f"layer {what}"
                       for kind, what in engine.calls]
            assert started == ["agreement on stopping", "all-reduce of the loss",
                               "layer 2", "all-reduce of gradient bucket 0",
                               "layer 1", "all-reduce of gradient bucket 1", "all-reduce of gradient bucket 2",
                               "layer 0", "all-reduce of gradient bucket 3", "all-reduce of gradient bucket 4"]
            assert dp.stop_requested() is False


def _attached(dtype="float64"):
    with nf.use_backend("numpy"):
        model = nf.MLP([6, 5, 3], dtype=dtype, seed=0)
        opt = nf.SGD(model.parameters(), lr=0.1)
    dp = DataParallel(FakeEngine(ThreadWorld(1), 0), bucket_bytes=64)
    dp.attach(model, opt, threading.Event())
    return model, opt, dp


def _backward(model, dp):
    x, labels = np.ones((4, 6)), np.array([0, 1, 2, 0])
    loss, dlogits = dp.global_loss(*nf.SoftmaxCrossEntropy()(model.forward(x), labels))
    model.backward(dlogits, need_input_grad=False, after_layer=dp.after_layer)


def test_gradients_not_cleared_between_steps_are_refused():
    model, opt, dp = _attached()
    _backward(model, dp)
    dp.reduce_gradients()
    opt.step()  # no zero_grad: the next backward would add to the reduced gradient
    with pytest.raises(RuntimeError, match=r"previous step's reduced gradient.*zero_grad"):
        _backward(model, dp)


def test_a_parameter_without_gradient_is_refused():
    model, opt, dp = _attached()
    with pytest.raises(RuntimeError, match="parameter 1.b has no gradient after backward"):
        dp.reduce_gradients()


def test_ranks_with_different_models_are_refused():
    world = ThreadWorld(2, timeout=5)

    def rank_run(rank: int):
        with nf.use_backend("numpy"):
            model = nf.MLP([6, 5 if rank == 0 else 4, 3], dtype="float64", seed=0)
            DataParallel(FakeEngine(world, rank)).attach(model, nf.SGD(model.parameters(), lr=0.1),
                                                         threading.Event())

    with pytest.raises(ValueError, match=r"rank 1 of 2: this rank's training set-up differs from rank 0's: "
                                         r"parameters: .*\(6, 5\).* on rank 0, .*\(6, 4\).* here"):
        world.run(rank_run)


def test_bad_set_ups_are_refused():
    with pytest.raises(ValueError, match="bucket_bytes: expected a positive int, got 0"):
        DataParallel(FakeEngine(ThreadWorld(1), 0), bucket_bytes=0)
    with nf.use_backend("numpy"):
        model, other = nf.MLP([3, 2], seed=0), nf.MLP([3, 2], seed=0)
        engine = FakeEngine(ThreadWorld(1), 0)
        with pytest.raises(ValueError, match="optimizer: updates parameters that are not the model's"):
            DataParallel(engine).attach(model, nf.SGD(other.parameters(), lr=0.1), threading.Event())
        engine.host_memory = False  # a device (NCCL) engine cannot reduce NumPy arrays
        with pytest.raises(nf.BackendError, match="the fake engine cannot reduce arrays of the 'numpy' backend"):
            DataParallel(engine).attach(model, nf.SGD(model.parameters(), lr=0.1), threading.Event())


# ------------------------------------------------------------------ faults
def test_abort_on_error_aborts_the_job_with_a_clear_message(capsys):
    engine = FakeEngine(ThreadWorld(1), 0)
    with pytest.raises(ValueError):
        with abort_on_error(engine):
            raise ValueError("data: bad file")
    assert engine.aborted == 2
    assert "nnfast: error: rank 0 of 1: data: bad file\nnnfast: aborting the job" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        with abort_on_error(engine):
            raise RuntimeError("unexpected")
    assert engine.aborted == 1 and "Traceback" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        with abort_on_error(engine):
            raise KeyboardInterrupt  # a second Ctrl-C: no agreed stop, the job ends now
    assert engine.aborted == 130 and "rank 0 of 1: interrupted" in capsys.readouterr().err
    with pytest.raises(CollectiveTimeout):
        with abort_on_error(engine):
            raise engine.timed_out("all-reduce of the loss", 3.0)
    err = capsys.readouterr().err
    assert engine.aborted == 1 and err.startswith("nnfast: error: rank 0 of 1: all-reduce of the loss did not")
    assert "Traceback" not in err
    engine.aborted = None
    with pytest.raises(Interrupted):
        with abort_on_error(engine, (Interrupted,)):
            raise Interrupted(0, 1, "x.npz")
    assert engine.aborted is None


def test_a_wait_has_a_deadline():
    engine = FakeEngine(ThreadWorld(1), 0)
    engine.timeout = 0.05
    with pytest.raises(CollectiveTimeout, match=r"rank 0 of 1: all-reduce of the loss did not complete within "
                                                r"0.0\d+ s: another rank has died, hangs or left training early"):
        wait_until(lambda: False, 0.05, lambda waited: engine.timed_out("all-reduce of the loss", waited))


@pytest.mark.parametrize("raw,expected", [("", 300.0), ("2.5", 2.5)])
def test_timeout_from_env(monkeypatch, raw, expected):
    monkeypatch.setenv("NNFAST_DIST_TIMEOUT", raw)
    assert timeout_from_env() == expected


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "inf", "nan"])
def test_bad_timeout_is_refused(monkeypatch, raw):
    monkeypatch.setenv("NNFAST_DIST_TIMEOUT", raw)
    with pytest.raises(nf.BackendError, match=f"NNFAST_DIST_TIMEOUT: expected a positive number of seconds, "
                                              f"got '{raw}'"):
        timeout_from_env()


# ------------------------------------------------------------ NCCL engine
class HostNccl(nccl_engine.NcclEngine):
    host_memory = True  # the stand-in NCCL sums NumPy arrays


@pytest.fixture
def pointers(monkeypatch):
    """Device pointers of the stand-in: NumPy addresses, remembered so the fake NCCL finds the array."""
    arrays: dict[int, np.ndarray] = {}

    def pointer(array):
        arrays[array.ctypes.data] = array
        return array.ctypes.data

    monkeypatch.setattr(nccl_engine, "_device_pointer", pointer)
    return arrays


def _nccl_world(size, pointers, **kwargs):
    world = ThreadWorld(size)
    nccl = FakeNccl(world, pointers)
    cudas = [FakeCuda() for _ in range(size)]
    hosts = [FakeEngine(world, r) for r in range(size)]
    engines = world.run(lambda r: HostNccl(hosts[r], device=r, cuda=cudas[r], nccl=nccl, **kwargs))
    return world, nccl, cudas, hosts, engines


def test_nccl_engine_shares_rank_zeros_unique_id(pointers):
    world, nccl, cudas, hosts, engines = _nccl_world(2, pointers)
    assert nccl.unique_ids_made == 1
    for rank, (engine, cuda) in enumerate(zip(engines, cudas)):
        assert (engine.comm.ndev, engine.comm.unique_id, engine.comm.rank) == (2, bytes(range(128)), rank)
        assert cuda.devices_used[0] == rank
        engine.close()
        assert engine.comm is None


def test_nccl_allreduce_is_ordered_by_events_on_its_own_stream(pointers):
    world, nccl, (cuda,), (host,), (engine,) = _nccl_world(1, pointers)
    buffer = np.arange(6, dtype=np.float32)
    work = engine.allreduce(buffer, "all-reduce of gradient bucket 0")
    comm = engine.comm
    assert comm.calls == [("allReduce", buffer.ctypes.data, buffer.ctypes.data, 6, 7, 0, 2)]
    (kind1, stream1, ready), (kind2, stream2, waited), (kind3, stream3, done) = cuda.log
    assert (kind1, stream1) == ("record", "compute")       # the gradients written so far
    assert (kind2, stream2) == ("wait", "nccl") and waited is ready  # NCCL starts after them
    assert (kind3, stream3) == ("record", "nccl")           # completion, on NCCL's stream
    work.wait()
    assert cuda.log[-1] == ("wait", "compute", done)        # the compute stream waits; the host does not
    engine.broadcast(np.zeros(3), root=0)
    assert comm.calls[-1] == ("bcast", comm.calls[-1][1], 3, 8, 0, 2)
    with pytest.raises(TypeError, match="the NCCL engine reduces float32 or float64 arrays, got int64"):
        engine.allreduce(np.zeros(3, dtype=np.int64), "all-reduce")
    engine.close()


@pytest.mark.parametrize("size", [2, 3])
def test_nccl_engine_trains_the_single_process_trajectory(pointers, size):
    world, nccl, cudas, hosts, engines = _nccl_world(size, pointers)
    results = world.run(lambda rank: run(config("numpy-sgd"), parallel=DataParallel(engines[rank], 256)))
    _assert_same_trajectory(run(config("numpy-sgd")), results, rtol=1e-10)
    _assert_ranks_identical(results)
    kinds = [call[0] for call in engines[0].comm.calls]
    # Set-up: 6 parameters and their 6 momentum buffers from rank 0; then only all-reduces on the device.
    assert kinds[:12] == ["bcast"] * 12 and set(kinds[12:]) == {"allReduce"}
    for engine in engines:
        engine.close()


def test_nccl_watchdog_aborts_a_hung_collective(pointers, capsys):
    world, nccl, (cuda,), (host,), (engine,) = _nccl_world(1, pointers, timeout=0.2, poll_interval=0.02)
    comm = engine.comm
    cuda.never_complete = True
    engine.allreduce(np.zeros(4), "all-reduce of gradient bucket 3")
    engine._watchdog.join(timeout=10)
    assert not engine._watchdog.is_alive()
    err = capsys.readouterr().err
    assert "nnfast: error: rank 0 of 1: all-reduce of gradient bucket 3 (NCCL) did not complete within" in err
    assert "aborting the job" in err
    assert comm.aborted and host.aborted == 1


def test_nccl_watchdog_reports_asynchronous_errors(pointers):
    messages = []
    world, nccl, (cuda,), (host,), (engine,) = _nccl_world(1, pointers, timeout=5, poll_interval=0.02,
                                                          on_failure=messages.append)
    nccl.async_error = RuntimeError("NCCL error: remote process exited")
    engine._watchdog.join(timeout=10)
    assert messages == ["rank 0 of 1: NCCL reported an error: NCCL error: remote process exited"]


def test_the_stand_ins_use_only_what_cupy_has():
    """The NCCL engine runs here only against the stand-ins: they must mirror CuPy's real names."""
    cupy = pytest.importorskip("cupy")
    import inspect
    import warnings

    cuda = cupy.cuda
    assert isinstance(inspect.getattr_static(cuda.Event, "done"), property)
    assert "disable_timing" in inspect.signature(cuda.Event).parameters
    assert callable(cuda.Event.record) and callable(cuda.Stream.wait_event) and callable(cuda.get_current_stream)
    assert "non_blocking" in inspect.signature(cuda.Stream).parameters
    assert callable(cuda.Device.use) and callable(cuda.runtime.getDeviceCount)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("libnccl is not installed here: NcclCommunicator's methods cannot be inspected")
    for name in ("allReduce", "bcast", "check_async_error", "abort", "destroy"):
        assert callable(getattr(nccl.NcclCommunicator, name)), name
    assert (nccl.NCCL_SUM, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64) == (FakeNccl.NCCL_SUM, FakeNccl.NCCL_FLOAT32,
                                                                      FakeNccl.NCCL_FLOAT64)


def test_nccl_engine_without_nccl_says_what_to_install():
    cupy = pytest.importorskip("cupy")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl
    if nccl.available:
        pytest.skip(f"NCCL loads here (CuPy {cupy.__version__})")
    with pytest.raises(nf.BackendError, match=r"CuPy cannot load NCCL .*pip install nvidia-nccl-cu12"):
        nccl_engine._load_cupy_nccl()


# -------------------------------------------------------------------- CLI
_LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_RANK", "PMIX_RANK")


def test_launcher_detection(monkeypatch):
    assert not launched_by_mpi({}) and announced_world_size({}) is None
    assert launched_by_mpi({"PMIX_RANK": "0"}) and announced_world_size({"PMIX_RANK": "0"}) is None
    assert announced_world_size({"PMI_RANK": "1", "PMI_SIZE": "4"}) == 4
    assert announced_world_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2


def test_cli_distributed_refuses_without_a_launcher(monkeypatch, capsys):
    for name in _LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--distributed", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "nnfast: error: --distributed: this process was not started by an MPI launcher" in err
    assert "mpiexec -n N nnfast train --distributed" in err


def test_cli_distributed_without_mpi4py_names_the_extra(monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(__import__("sys").modules, "mpi4py", None)  # import mpi4py -> ImportError
    assert main(["train", "--distributed", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "--distributed needs mpi4py" in err and "pip install 'nnfast[mpi]'" in err


def test_single_process_hook_changes_nothing():
    hook = SingleProcess()
    idx = np.arange(5)
    assert hook.shard(idx) is idx and hook.after_layer is None and hook.is_main
    stop = threading.Event()
    hook.attach(None, None, stop)
    assert not hook.stop_requested()
    stop.set()
    assert hook.stop_requested()
    assert Keep(hook).shard(idx) is idx  # the test wrapper passes everything through
    assert set(CASES) >= {"numpy-sgd", "numpy-adam", "numba-sgd", "numba-adam"}
