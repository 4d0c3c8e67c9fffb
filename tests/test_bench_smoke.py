"""Smoke test of ``nnfast bench``: it runs, and its JSON report is well formed.

No timing thresholds: speed is measured in ``benchmarks/``, never asserted.
Each run is ``--quick`` on a few small kernels, so the file takes seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import nnfast as nf
from nnfast import bench
from nnfast.bench import machine as bench_machine

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = [b for b in ("numpy", "numba") if b in nf.available_backends()]
# Small element-wise / row / optimizer kernels on every CPU backend; the GEMM-based ones (linear,
# the training step) on NumPy only, since compiling Numba's GEMM costs more than this file may take.
OPS = "activation_backward,softmax_cross_entropy,sgd_update"
GEMM_OPS = "linear_forward,train_step"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnfast bench")
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _figures(node, path="report"):
    """Every number in a JSON tree, with where it is."""
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _figures(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _figures(value, f"{path}[{i}]")


def _check_report(report: dict, backends: list[str], ops: list[str]) -> None:
    assert report["schema"] == bench.SCHEMA
    for key in ("created", "command", "machine", "settings", "models", "limits", "results", "errors"):
        assert key in report, key
    assert report["errors"] == []
    machine = report["machine"]
    for key in ("cpu", "logical_cpus", "threads", "versions", "gpu"):
        assert key in machine, key
    assert machine["versions"]["numpy"]
    assert set(report["settings"]["backends"]) == set(backends)

    cpu = report["limits"]["cpu"]
    assert cpu["copy"]["rate"] > 0 and cpu["gemm"]["float32"]["rate"] > 0

    measured_ops = {row["op"] for row in report["results"]}
    layer_api = all(hasattr(nf, n) for n in ("MLP", "SGD", "SoftmaxCrossEntropy"))
    expected = {op for op in ops if op != "train_step" or layer_api}
    assert measured_ops == expected
    for row in report["results"]:
        assert row["metric"] in ("GFLOP/s", "GB/s")
        assert row["size"] == "small"  # --quick
        assert row["limits"]["cpu"]["rate"] > 0
        for backend in backends:
            fig = row["impls"][backend]
            assert fig["kind"] == "nnfast" and fig["device"] == "cpu"
            for key in ("median_s", "min_s", "rate", "speedup_vs_numpy", "limit_fraction"):
                assert key in fig, (row["op"], backend, key)
            assert fig["min_s"] <= fig["median_s"]
            assert fig["samples"] >= 3
        assert row["impls"]["numpy"]["speedup_vs_numpy"] == pytest.approx(1.0)

    _check_figures(report)


def _check_figures(report: dict) -> None:
    """Every figure finite and positive (the machine's load average may be 0)."""
    figures = list(_figures({k: v for k, v in report.items() if k != "machine"}))
    assert figures
    bad = [(where, value) for where, value in figures if not (math.isfinite(value) and value > 0)]
    bad += [(where, value) for where, value in _figures(report["machine"], "machine")
            if not (math.isfinite(value) and value >= 0)]
    assert bad == []


def test_bench_run_writes_json_markdown_and_prints_tables(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    args = _parse("--quick", "--backend", ",".join(BACKENDS), "--ops", OPS, "--no-torch", "--no-progress",
                  "--json", str(out), "--markdown", str(md))
    assert bench.run(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    _check_report(report, BACKENDS, OPS.split(","))

    printed = capsys.readouterr().out
    assert "softmax_cross_entropy" in printed and "numpy" in printed
    text = md.read_text(encoding="utf-8")
    assert "| kernel |" in text and "Reproduce: `nnfast bench" in text


def test_bench_gemm_kernels_and_training_step_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    args = _parse("--quick", "--backend", "numpy", "--ops", GEMM_OPS, "--no-torch", "--no-progress",
                  "--json", str(out), "--markdown", str(md))
    assert bench.run(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    _check_report(report, ["numpy"], GEMM_OPS.split(","))
    if any(row["op"] == "train_step" for row in report["results"]):
        rows = [r for r in report["results"] if r["op"] == "train_step"]
        assert [r["variant"] for r in rows] == ["TrainStep", "eager"]  # nf.TrainStep, and the eager loop beside it
        assert all(r["shape"] == {"sizes": [64, 128, 10], "batch": 64} for r in rows)
        text = md.read_text(encoding="utf-8")
        assert "Training step" in capsys.readouterr().out and "ms/step" in text
        assert "| [64,128,10] | TrainStep | 64 | float32 |" in text and "| [64,128,10] | eager | 64 | float32 |" in text


def test_bench_repeated_backend_option_and_groups(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--ops", "softmax_ce", "--ops", "optim", "--threads", "1", "--no-torch", "--no-progress",
            "--json", str(out)]
    for backend in BACKENDS:
        argv += ["--backend", backend]
    assert bench.run(_parse(*argv)) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert {row["op"] for row in report["results"]} == {
        "softmax", "log_softmax", "softmax_cross_entropy", "sgd_update", "adam_update"}
    assert report["settings"]["threads"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--ops", "gemm9"], "--ops: unknown 'gemm9'"),
    (["--dtype", "float16"], "--dtype"),
    (["--backend", "tpu"], "--backend: unknown 'tpu'"),
    (["--repeat", "0"], "--repeat"),
    (["--threads", "0"], "--threads"),
])
def test_bench_rejects_bad_options(argv, message, capsys):
    assert bench.run(_parse(*argv, "--no-progress")) == 2
    assert message in capsys.readouterr().err


def test_bench_plot_needs_matplotlib(tmp_path, capsys):
    png = tmp_path / "bench.png"
    args = _parse("--quick", "--backend", "numpy", "--ops", "softmax", "--no-torch", "--no-progress",
                  "--plot", str(png))
    if importlib.util.find_spec("matplotlib") is None:
        assert bench.run(args) == 2
        assert "--plot needs matplotlib" in capsys.readouterr().err
    else:
        assert bench.run(args) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nnfast_bench_cli(tmp_path):
    if importlib.util.find_spec("nnfast.cli") is None:
        pytest.skip("this build has no nnfast command line")
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "nnfast.cli", "bench", "--quick", "--backend", ",".join(BACKENDS),
         "--ops", "softmax_cross_entropy", "--no-torch", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "softmax_cross_entropy" in proc.stdout
    _check_report(json.loads(out.read_text(encoding="utf-8")), BACKENDS, ["softmax_cross_entropy"])


def test_update_readme_rewrites_only_the_marked_section(tmp_path):
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
    if spec is None:
        pytest.skip("benchmarks/update_readme.py is not in this tree")
    update_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update_readme)

    out = tmp_path / "bench.json"
    args = _parse("--quick", "--backend", "numpy", "--ops", "linear_forward,train_step", "--no-torch",
                  "--no-progress", "--json", str(out))
    assert bench.run(args) == 0
    head, tail = "# nnfast\n\n## Performance\n\n", "\n\n## Next\n\nkept as is\n"
    readme = tmp_path / "README.md"
    readme.write_text(head + "<!-- bench:start -->\nold table\n<!-- bench:end -->" + tail, encoding="utf-8")
    assert update_readme.main(["--json", str(out), "--readme", str(readme), "--all-rows"]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(head + "<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->" + tail)
    assert "old table" not in text and "| linear_forward relu |" in text and "Reproduce: `nnfast bench" in text

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n", encoding="utf-8")
    assert update_readme.main(["--json", str(out), "--readme", str(plain)]) == 1
    assert plain.read_text(encoding="utf-8") == "no markers\n"


def _fake_cupy():
    """A stand-in for CuPy backed by NumPy, with CUDA events timed by the wall clock.

    It runs the report's GPU paths (CUDA-event clock, cuBLAS and device-copy
    limits, GPU machine info) on a machine without a GPU.
    """
    import time
    import types

    import numpy as np

    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0.0-fake"
    cupy.__getattr__ = lambda name: getattr(np, name)

    class Event:
        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    props = {"name": b"Fake GPU", "totalGlobalMem": 2**34, "multiProcessorCount": 8, "major": 9, "minor": 0}
    cupy.cuda = types.SimpleNamespace(
        Event=Event,
        get_elapsed_time=lambda start, end: (end.t - start.t) * 1e3,
        Device=lambda: types.SimpleNamespace(id=0),
        runtime=types.SimpleNamespace(deviceSynchronize=lambda: None, getDeviceProperties=lambda i: props,
                                      runtimeGetVersion=lambda: 12000, driverGetVersion=lambda: 12000),
    )
    return cupy


def _fake_compute_types(monkeypatch) -> list[int]:
    """A stand-in for CuPy's float32 compute type, which the TF32 limit sets to TF32 around its cuBLAS
    call; the list of the types set."""
    compute_types: list[int] = []
    linalg = types.SimpleNamespace(COMPUTE_TYPE_TF32=7, get_compute_type=lambda dtype: 0,
                                   set_compute_type=lambda dtype, kind: compute_types.append(kind))
    monkeypatch.setitem(sys.modules, "cupy._core", types.SimpleNamespace(_routines_linalg=linalg))
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    return compute_types


def test_bench_gpu_paths_with_a_stand_in_device(tmp_path, monkeypatch, capsys):
    from nnfast import backends
    from nnfast.backends.numpy_backend import NumpyBackend

    cupy = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    compute_types = _fake_compute_types(monkeypatch)
    monkeypatch.setattr(bench_machine, "GPU_COPY_BYTES", 16 * 2**20)  # host memory stands in for the device's
    monkeypatch.setitem(bench.GEMM_REF, "gpu", (256, 256, 256))

    class FakeGpuBackend(NumpyBackend):
        name = "cupy"

    FakeGpuBackend.xp = cupy
    gpu = FakeGpuBackend()
    real_backend_for = backends.backend_for
    monkeypatch.setattr(backends, "available_backends", lambda: ["numpy", "cupy"])
    monkeypatch.setattr(backends, "backend_for", lambda name: gpu if name == "cupy" else real_backend_for(name))

    out = tmp_path / "bench.json"
    args = _parse("--quick", "--ops", "linear_forward,softmax", "--no-torch", "--no-progress", "--json", str(out))
    assert bench.run(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["errors"] == []
    assert report["machine"]["gpu"]["name"] == "Fake GPU"
    assert report["limits"]["gpu"]["copy"]["rate"] > 0 and report["limits"]["gpu"]["gemm"]["float32"]["rate"] > 0
    for row in report["results"]:
        fig = row["impls"]["cupy"]
        assert fig["device"] == "gpu" and fig["limit_fraction"] > 0 and fig["speedup_vs_numpy"] > 0
        assert row["limits"]["gpu"]["what"].startswith("cupy.")
        # A float32 GEMM row also runs at matmul precision "high", against cuBLAS in TF32.
        gemm_row = row["op"] == "linear_forward"
        assert ("cupy-tf32" in row["impls"]) == gemm_row
        if gemm_row:
            tf32 = row["impls"]["cupy-tf32"]
            assert tf32["device"] == "gpu-tf32" and tf32["limit_fraction"] > 0
            assert row["limits"]["gpu-tf32"]["what"].endswith("float32 TF32")
    assert report["limits"]["gpu"]["gemm"]["float32 TF32"]["rate"] > 0
    assert compute_types and set(compute_types[0::2]) == {7} and set(compute_types[1::2]) == {0}  # set, put back
    assert "GPU TF32 GEMM" in capsys.readouterr().out
    _check_figures(report)
