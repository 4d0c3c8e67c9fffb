"""``nnfast bench``: the memory limit of each case, and ``--contended``.

What is checked is what the numbers are made of (the traffic the limit
streams, the process that competes, the report's structure), never a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time

import numpy as np
import pytest

from nnfast import bench
from nnfast.bench.cases import OPS, work
from nnfast.bench.contention import Spinner
from nnfast.bench.machine import limit_candidates
from nnfast.bench.stream import bytes_per_element, describe, make_stream, stream, stream_arrays
from nnfast.ops import mlp_param_shapes

pytest.importorskip("numba")

GB_OPS = [spec for spec in OPS.values() if spec.metric == "GB/s"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nnfast bench")
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("streams", [(1, 1, 0), (2, 1, 0), (1, 0, 2), (1, 0, 3), (3, 2, 1)])
@pytest.mark.parametrize("threads", ["all", "one"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stream_touches_every_element_of_every_array(streams, threads, dtype):
    """The limit's loop reads, writes and updates every element (n not a multiple of its block)."""
    n = 3 * 4096 + 77
    src, dst, upd = stream_arrays(streams, n, dtype)
    assert (src.shape, dst.shape, upd.shape) == ((streams[0], n), (streams[1], n), (streams[2], n))
    before = upd.copy()
    stream(src, dst, upd, threads)
    total = src.sum(axis=0)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for row in dst:
        np.testing.assert_allclose(row, total, rtol=rtol)
    for row, old in zip(upd, before):
        np.testing.assert_allclose(row, total - old, rtol=rtol, atol=rtol)
    assert describe(streams).split() == [f"{c}{tag}" for c, tag in zip(streams, ("R", "W", "RW")) if c]


def test_stream_needs_an_array_to_read():
    with pytest.raises(ValueError, match="streams"):
        make_stream((0, 1, 0), 16, "float32", "one")
    make_stream((1, 0, 0), 16, "float32", "one")()  # a read-only pattern runs


def _elements(spec, shape) -> int:
    """The elements of the arrays a GB/s op streams: its tensor, or every parameter of the MLP."""
    if spec.group == "optim":
        return sum(math.prod(s) for s in mlp_param_shapes(shape.dims))
    return math.prod(shape.dims)


@pytest.mark.parametrize("spec", GB_OPS, ids=lambda s: s.name)
def test_each_memory_bound_case_has_a_limit_of_its_own_traffic(spec):
    """The limit streams the op's arrays at the case's size: its bytes are the op's work model.

    (The cross-entropy's work also counts its int64 labels: its limit's arrays
    are longer by that much.)
    """
    for shape in spec.shapes:
        for dtype in ("float32", "float64"):
            itemsize = np.dtype(dtype).itemsize
            candidates = limit_candidates(spec, shape, dtype, "cpu")
            assert [c[0] for c in candidates] == ["limit-cpu-all", "limit-cpu-one"]
            for key, what, amount, build in candidates:
                assert what.startswith(f"stream {describe(spec.streams)}, "), what
                # the bytes credited to the limit are the kernel's (its work model)
                assert amount == pytest.approx(work(spec, shape, itemsize), rel=2e-3)
                n = round(amount / (bytes_per_element(spec.streams) * itemsize))
                extra = 8 * shape.dims[0] / itemsize / bytes_per_element(spec.streams) \
                    if spec.name == "softmax_cross_entropy" else 0
                assert n == pytest.approx(_elements(spec, shape) + extra, abs=1), (spec.name, shape.label)


def test_compute_bound_cases_keep_the_gemm_limit():
    spec = OPS["linear_forward"]
    ((key, what, amount, _),) = limit_candidates(spec, spec.shapes[0], "float32", "cpu")
    assert key == "limit-cpu" and what.startswith("numpy.matmul") and amount == 2.0 * math.prod(spec.shapes[0].dims)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat") or not hasattr(signal, "SIGSTOP"),
                    reason="reads process states from /proc")
def test_spinner_runs_only_when_on_and_ends_on_close():
    with Spinner() as spinner:
        pid = spinner._proc.pid
        assert _state(pid) == "T"  # created paused
        spinner.on()
        deadline = time.monotonic() + 10
        while _state(pid) not in "RS" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(pid) in "RS"
        assert os.getsid(pid) == pid  # a session of its own
        if spinner.cpu is not None:
            assert os.sched_getaffinity(pid) == {spinner.cpu}
        spinner.off()
        assert _state(pid) == "T"
    assert spinner._proc.poll() is not None


def test_bench_contended_reports_quiet_and_contended_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    args = _parse("--quick", "--backend", "numpy,numba", "--ops", "activation_forward,sgd_update", "--contended",
                  "--no-torch", "--no-progress", "--json", str(out), "--markdown", str(md))
    assert bench.run(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["errors"] == []
    assert report["settings"]["contended"] is True and "busy-looping" in report["settings"]["spinner"]["what"]
    assert "--contended" in report["command"]
    assert report["machine"]["numba_threading_layer"] in ("tbb", "omp", "workqueue")
    for row in report["results"]:
        assert row["limits"]["cpu"]["what"].startswith("stream ")
        for key in ("numpy", "numba"):
            fig = row["impls"][key]
            busy = fig["contended"]
            assert busy["samples"] >= 3 and busy["min_s"] <= busy["median_s"]
            assert fig["kept"] == pytest.approx(fig["median_s"] / busy["median_s"])
    text = md.read_text(encoding="utf-8")
    assert "### Under contention" in text and "| numba quiet | numba contended | numba kept |" in text
