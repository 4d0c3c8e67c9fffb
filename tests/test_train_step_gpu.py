"""``nf.TrainStep`` on a real GPU: the captured CUDA graph against the eager step and the direct launches.

Marked ``gpu``: skipped (with the reason) where CuPy finds no usable device. The CPU emulation
(tests/test_train_step_cuda.py) runs the same recorded launches without graphs; here the graph
itself is captured and replayed, on the default stream and on a non-blocking one, and the step is
timed (benchmarks/gpu/train_step.py; printed, never asserted).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

import nnfast as nf
from nnfast.backends.cupy_backend import cupy_unavailable_reason
from nnfast.train_step import PlanKey
from nnfast.train_step.eager import EagerPlan

REASON = cupy_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"no usable GPU: {REASON}")]

SIZES = (784, 256, 256, 10)


def _trio(optimizer, seed=0):
    model = nf.MLP(list(SIZES), activation="relu", seed=seed)
    opt = (nf.Adam(model.parameters(), lr=1e-3, weight_decay=1e-2) if optimizer == "adam"
           else nf.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4))
    return model, nf.SoftmaxCrossEntropy(label_smoothing=0.05), opt


def _batches(count, batch, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
        labels = rng.integers(0, SIZES[-1], size=batch)
        if i == 3:
            x[5, 7] = np.nan
        if i == 5:
            labels[batch - 1] = SIZES[-1]
        out.append((x, labels))
    return out


def _state(model, opt):
    out = {name: nf.to_numpy(p.data) for name, p in model.named_parameters()}
    out.update({f"opt/{k}": v for k, v in opt.state_dict().items()})
    return out


def _run(step, x, labels):
    """The loss as a float, or the text of the bad-label error raised when it is read."""
    try:
        return float(nf.to_numpy(step(x, labels)))
    except ValueError as err:
        return str(err)


def _same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.fixture
def gpu():
    with nf.use_backend("cupy") as backend:
        yield backend


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_graph_replay_is_the_eager_step(gpu, optimizer):
    eager_trio, graph_trio = _trio(optimizer), _trio(optimizer)
    eager_plans = {}
    graph = nf.TrainStep(*graph_trio)
    for batch in (128, 37):
        key = PlanKey(batch, np.dtype(np.float32))
        eager = eager_plans.setdefault(key, EagerPlan(*eager_trio, key))
        for x, labels in _batches(8, batch, seed=batch):
            expected, got = _run(eager, x, labels), _run(graph, x, labels)
            if isinstance(expected, str):
                assert got == expected
            else:
                assert math.isclose(got, expected, rel_tol=1e-4) or (math.isnan(got) and math.isnan(expected))
    assert graph.plan_names == ["cuda graph (batch 128)", "cuda graph (batch 37)"]
    got, expected = _state(*graph_trio[::2]), _state(*eager_trio[::2])
    assert got["opt/step"] == expected["opt/step"] == 12
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_graph_replay_is_the_direct_launches_bit_for_bit(gpu, monkeypatch):
    graph_trio, direct_trio = _trio("adam"), _trio("adam")
    graph = nf.TrainStep(*graph_trio)
    monkeypatch.setenv("NNFAST_CUDA_GRAPH", "0")
    direct = nf.TrainStep(*direct_trio)
    direct(*_batches(1, 128)[0])
    monkeypatch.delenv("NNFAST_CUDA_GRAPH")
    graph(*_batches(1, 128)[0])
    for x, labels in _batches(8, 128, seed=1):
        got, expected = _run(graph, x, labels), _run(direct, x, labels)
        assert _same(got, expected), (got, expected)
    assert direct.plan_names == ["cuda launches (batch 128)"] and graph.plan_names == ["cuda graph (batch 128)"]
    got, expected = _state(*graph_trio[::2]), _state(*direct_trio[::2])
    for k in got:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    plan, = graph._plans.values()
    captured = plan.graph
    graph(*_batches(1, 128)[0])
    assert plan.graph is captured  # captured once


def test_steps_on_a_non_blocking_stream(gpu):
    import cupy

    default_trio, stream_trio = _trio("sgd"), _trio("sgd")
    on_default = nf.TrainStep(*default_trio)
    on_stream = nf.TrainStep(*stream_trio)
    stream = cupy.cuda.Stream(non_blocking=True)
    results = []
    for i, (x, labels) in enumerate(_batches(8, 64, seed=2)):
        expected = _run(on_default, x, labels)
        if i % 2:
            with stream:
                results.append((_run(on_stream, x, labels), expected))
        else:  # alternate: the plan orders itself after the other stream's work
            results.append((_run(on_stream, x, labels), expected))
    for got, expected in results:
        assert _same(got, expected), (got, expected)
    assert any(isinstance(got, str) and "at row 63" in got for got, _ in results)
    got, expected = _state(*stream_trio[::2]), _state(*default_trio[::2])
    for k in got:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_a_checkpoint_round_trip_keeps_the_device_count(gpu, tmp_path):
    model, loss_fn, opt = _trio("adam")
    step = nf.TrainStep(model, loss_fn, opt)
    for x, labels in _batches(5, 128):  # one NaN step: four updates
        _run(step, x, labels)
    path = nf.save(tmp_path / "c.npz", model, opt)
    other = _trio("adam", seed=1)
    nf.load(path, other[0], other[2])
    assert other[2].step_count == opt.step_count == 4


def test_warm_up_compiles_for_this_device_and_launches_load_from_it(gpu, tmp_path, monkeypatch):
    from nnfast.backends import cuda_compile, cupy_backend

    monkeypatch.setenv("NNFAST_KERNEL_CACHE", str(tmp_path))
    result = cupy_backend.warm_up(["sgd_multi<float>", "ce_prepare"], processes=2)
    assert (result["compiled"], result["arch"]) == (2, cuda_compile.device_arch())
    monkeypatch.setattr(cupy_backend, "_functions", {})
    monkeypatch.setattr(cuda_compile, "_nvrtc", lambda: pytest.fail("compiled again instead of loading"))
    p, g = gpu.asarray(np.ones(5, np.float32)), gpu.asarray(np.full(5, 2.0, np.float32))
    gpu.sgd_update([p], [g], [], lr=0.25)
    np.testing.assert_array_equal(gpu.to_numpy(p), np.full(5, 0.5, np.float32))


def test_the_step_is_timed():
    """Prints the table of benchmarks/gpu/train_step.py (target: graph replay <= 60 us and >= 5x
    torch eager for [784, 256, 256, 10], batch 128); asserts only that every mode ran and which
    modes wait for the device (the eager plan on every call, the recorded step never)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "train_step.py"
    spec = importlib.util.spec_from_file_location("gpu_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for optimizer in ("adam", "sgd"):
        rows = bench.measure(steps=100, repeats=3, optimizer=optimizer)
        print(f"\ntraining step {list(bench.SIZES)}, batch {bench.BATCH}, {optimizer}")
        print(bench.table(rows))
        modes = {r["mode"] for r in rows}
        assert {"eager", "eager plan", "launches", "graph", "graph replay"} <= modes
        assert all(r["us_per_step"] > 0 and r["host_us_per_call"] > 0 for r in rows)
        syncs = {r["mode"]: r["syncs_per_step"] for r in rows}
        assert syncs["eager plan"] == 1.0  # it reads the loss: every call waits for the busy device
        assert syncs["launches"] == syncs["graph"] == syncs["graph replay"] == 0.0, syncs  # none waits
