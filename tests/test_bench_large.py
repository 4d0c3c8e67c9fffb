"""``nnfast bench --size large``: the GPU-sized cases, their work and memory models, and the refusals on a CPU.

The real run needs a GPU. Here: the case lists hold the shapes a large GPU
needs (inputs several times its 60 MB L2), the footprint model agrees with
the arrays the cases really make, input sets rotate where one would sit in
the cache, a run is refused on a CPU backend before it allocates anything,
and the whole GPU path (inputs made on the device, rotation, the memory
check, no NumPy reference) runs on a stand-in device at tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from nnfast import bench
from nnfast.bench import cases, device
from nnfast.bench import machine as bench_machine
from nnfast.ops import mlp_param_shapes

from test_bench_smoke import _check_figures, _fake_compute_types, _fake_cupy

L2 = cases.DEFAULT_L2_BYTES
GIB = 2**30


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnfast bench")
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _dims(op: str) -> list[tuple]:
    return [shape.dims for shape in cases.LARGE_SHAPES[op]]


def test_every_case_family_has_gpu_sized_shapes():
    assert set(cases.LARGE_SHAPES) == set(cases.OPS)
    for op, shapes in cases.LARGE_SHAPES.items():
        assert shapes and all(s.size == cases.LARGE for s in shapes), op
        assert len({s.label for s in shapes}) == len(shapes), op


def test_the_shapes_a_large_gpu_needs():
    for op in ("linear_forward", "linear_backward"):
        dims = _dims(op)
        assert (4096, 4096, 4096) in dims and (8192, 8192, 8192) in dims
        assert {(8192, 784, 4096), (8192, 4096, 4096), (8192, 4096, 10)} <= set(dims)  # the MLP's layers
    for op in ("activation_forward", "activation_backward"):
        assert [math.prod(d) * 4 for d in _dims(op)] == [GIB]  # 1 GiB of float32
    for op in ("softmax", "log_softmax", "softmax_cross_entropy"):
        dims = _dims(op)
        assert (8192, 32000) in dims and (32768, 32000) in dims and any(c >= 128000 for _, c in dims)
    for op in ("sgd_update", "adam_update"):
        (sizes,) = _dims(op)
        assert 100e6 <= sum(math.prod(s) for s in mlp_param_shapes(sizes)) < 110e6
    assert _dims("train_step") == [((784, 4096, 4096, 10), 8192)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_call_reads_several_times_the_l2(dtype):
    itemsize = np.dtype(dtype).itemsize
    for op, shapes in cases.LARGE_SHAPES.items():
        for shape in shapes:
            read, held = cases.footprint(cases.OPS[op], shape, itemsize)
            sets = cases.rotations(read, L2)
            assert read * sets >= 3 * L2, (op, shape.label)
            assert held >= read and sets * held * 6 < 140 * GIB, (op, shape.label)  # six implementations fit


def test_inputs_fitting_in_the_cache_rotate():
    assert cases.rotations(3 * L2, L2) == 1
    assert cases.rotations(L2, L2) == 3
    assert cases.rotations(L2 // 10, L2) == 16  # at most 16 sets
    (mlp_layer,) = [s for s in cases.LARGE_SHAPES["linear_forward"] if s.dims == (8192, 784, 4096)]
    assert cases.rotations(cases.footprint(cases.OPS["linear_forward"], mlp_layer, 4)[0], L2) > 1


@pytest.mark.parametrize("op", list(cases.OPS))
def test_the_footprint_model_counts_the_arrays_a_case_reads(op):
    """At a small shape, the model's input bytes are the bytes of the arrays the case really makes."""
    spec = cases.OPS[op]
    small = next(s for s in spec.shapes if s.size == "small")
    variant = spec.variants[0]
    data = cases.inputs(spec, variant, small, "float32")
    arrays = [a for v in data.values() for a in (v if isinstance(v, list) else [v]) if isinstance(a, np.ndarray)]
    read, held = cases.footprint(spec, small, 4)
    if op == "train_step":  # the parameters are made by the model, not the inputs
        read -= 4 * sum(math.prod(s) for s in mlp_param_shapes(small.dims[0]))
    assert sum(a.nbytes for a in arrays) == read
    assert held >= read


def test_work_models_at_the_large_shapes():
    linear = cases.OPS["linear_forward"]
    (big,) = [s for s in cases.LARGE_SHAPES["linear_forward"] if s.dims == (8192, 8192, 8192)]
    assert cases.work(linear, big, 4) == 2 * 8192**3
    assert cases.work(cases.OPS["linear_backward"], big, 4) == 4 * 8192**3
    act = cases.LARGE_SHAPES["activation_forward"][0]
    assert cases.work(cases.OPS["activation_forward"], act, 4) == 2 * GIB
    assert cases.work(cases.OPS["activation_backward"], act, 4) == 3 * GIB


def test_optimizer_state_is_never_zeros():
    for op in ("sgd_update", "adam_update"):
        spec = cases.OPS[op]
        data = cases.inputs(spec, "", spec.shapes[0], "float32")
        for name in ("velocities", "exp_avgs", "exp_avg_sqs"):
            assert all(np.count_nonzero(a) == a.size for a in data.get(name, [])), (op, name)


def test_seeds_give_different_input_sets():
    spec = cases.OPS["softmax"]
    a, b = (cases.inputs(spec, "", spec.shapes[0], "float32", seed)["x"] for seed in (0, 1))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_rotating_runs_each_set_in_turn():
    calls = []
    fn = device.rotating(lambda seed: (lambda: calls.append(seed)), 3)
    for _ in range(7):
        fn()
    assert calls == [0, 1, 2, 0, 1, 2, 0]


# ------------------------------------------------------------------ refusals
def test_a_large_run_is_refused_without_a_gpu(capsys, monkeypatch):
    from nnfast import backends

    monkeypatch.setattr(backends, "available_backends", lambda: ["numpy", "numba"])
    assert bench.run(_parse("--size", "large", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert "--size large is sized for a GPU" in err and "GiB of arrays" in err and "no GPU backend" in err


def test_a_large_run_is_refused_on_a_cpu_backend(capsys):
    assert bench.run(_parse("--size", "large", "--backend", "numpy", "--ops", "softmax", "--no-progress")) == 2
    err = capsys.readouterr().err
    assert "numpy runs on the CPU (use --backend cupy)" in err and "softmax 32768×32000 float32" in err


# ------------------------------------------------------------------ the GPU path on a stand-in device
@pytest.fixture
def stand_in_gpu(monkeypatch):
    """A NumPy-backed 'cupy' backend, tiny large shapes, and a device of ``free`` bytes."""
    from nnfast import backends
    from nnfast.backends.numpy_backend import NumpyBackend

    cupy = _fake_cupy()
    monkeypatch.setitem(__import__("sys").modules, "cupy", cupy)
    _fake_compute_types(monkeypatch)
    monkeypatch.setattr(bench_machine, "GPU_COPY_BYTES", 4 * 2**20)
    monkeypatch.setitem(bench.GEMM_REF, "gpu", (64, 64, 64))
    tiny = {"linear_forward": (cases._gemm(33, 20, 12),), "softmax": (cases._large(9, 70),),
            "adam_update": (cases._large(30, 20, 10),)}
    monkeypatch.setattr(cases, "LARGE_SHAPES", {**cases.LARGE_SHAPES, **tiny})
    monkeypatch.setattr(bench.command, "LARGE_SHAPES", cases.LARGE_SHAPES)
    state = {"free": 100 * GIB, "built": []}
    monkeypatch.setattr(device, "free_bytes", lambda xp: state["free"])
    monkeypatch.setattr(device, "l2_bytes", lambda xp: 2**20)  # every tiny case rotates

    class FakeGpuBackend(NumpyBackend):
        name = "cupy"

    FakeGpuBackend.xp = cupy
    gpu = FakeGpuBackend()
    real_backend_for = backends.backend_for
    monkeypatch.setattr(backends, "available_backends", lambda: ["numpy", "numba", "cupy"])
    monkeypatch.setattr(backends, "backend_for", lambda name: gpu if name == "cupy" else real_backend_for(name))
    real_inputs = cases.inputs

    def spy(spec, variant, shape, dtype, seed=0, device=None):
        state["built"].append((spec.name, seed, device))
        return real_inputs(spec, variant, shape, dtype, seed, device)

    monkeypatch.setattr(cases, "inputs", spy)
    state["gpu"] = gpu
    return state


def test_the_large_path_on_a_stand_in_device(stand_in_gpu, tmp_path):
    out = tmp_path / "bench.json"
    args = _parse("--size", "large", "--quick", "--ops", "linear_forward,softmax,adam_update", "--no-torch",
                  "--no-progress", "--json", str(out))
    assert bench.run(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["errors"] == [] and report["settings"]["size"] == "large"
    assert report["settings"]["backends"] == ["cupy"]  # no NumPy reference, no CPU backend
    assert "--size large" in report["command"]
    assert {r["op"] for r in report["results"]} == {"linear_forward", "softmax", "adam_update"}
    for row in report["results"]:
        gemm = row["metric"] == "GFLOP/s"  # float32 GEMM rows run at matmul precision "high" too
        assert row["size"] == cases.LARGE and set(row["impls"]) == ({"cupy", "cupy-tf32"} if gemm else {"cupy"})
        for impl in row["impls"].values():
            assert impl["limit_fraction"] > 0 and "speedup_vs_numpy" not in impl
    _check_figures(report)
    built = stand_in_gpu["built"]
    assert built and all(dev is stand_in_gpu["gpu"] for name, seed, dev in built)  # made on the device
    assert {seed for _, seed, _ in built} == set(range(16))  # tiny inputs: 16 rotating sets


def test_a_case_the_device_cannot_hold_is_skipped(stand_in_gpu, tmp_path, capsys):
    stand_in_gpu["free"] = 1000
    out = tmp_path / "bench.json"
    assert bench.run(_parse("--size", "large", "--quick", "--ops", "softmax", "--no-torch", "--no-progress",
                            "--json", str(out))) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["results"] == [] and stand_in_gpu["built"] == []
    (skip,) = report["skipped"]
    assert skip["case"] == "softmax 9×70 float32" and "MiB of device memory, 0.0 MiB free" in skip["reason"]
