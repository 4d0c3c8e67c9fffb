"""benchmarks/train_step_fusion.py keeps working: its ``--quick`` run, standalone, reports every configuration
with the plan it claims, and every nnfast configuration's first step gives the same loss. Figures are not checked."""

from __future__ import annotations

import json

import pytest

import nnfast as nf
from script_support import ROOT, run_script

SCRIPT = ROOT / "benchmarks" / "train_step_fusion.py"

pytestmark = pytest.mark.skipif("numba" not in nf.available_backends(), reason="the fused plan is Numba's")


def _run(*args, cwd):
    return run_script(SCRIPT, *args, cwd=cwd, numba_threads=2, timeout=600)


def test_the_quick_run_reports_every_configuration_at_each_thread_count(tmp_path):
    out = tmp_path / "rows.json"
    done = _run("--quick", "--no-torch", "--threads", "1,2", "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    plans = {(r["threads"], r["config"]): r["plan"] for r in rows}
    serial_and_eager = {"numpy eager loop": "–", "eager loop": "–", "TrainStep, eager plan": "eager",
                        "fused, serial": "fused serial"}
    assert plans == {
        **{(1, k): v for k, v in serial_and_eager.items()}, (1, "TrainStep"): "fused serial",
        **{(2, k): v for k, v in serial_and_eager.items()},
        (2, "fused, parallel"): "fused parallel", (2, "fused, parallel, every GEMM split"): "fused parallel",
        (2, "TrainStep"): "fused serial",  # the quick MLP is far below the parallel threshold
    }
    first = [r["first_loss"] for r in rows]
    assert max(first) - min(first) <= 1e-5 * abs(first[0])
    for r in rows:
        assert r["median_s"] > 0 and r["samples"] >= 3
        if r["config"] == "eager loop":
            assert r["vs_eager_loop"] == 1.0
    assert "fused, serial" in done.stdout and "quick: the figures mean nothing" in done.stdout


def test_bad_thread_counts_are_refused_by_name(tmp_path):
    done = _run("--quick", "--threads", "0", cwd=tmp_path)
    assert done.returncode != 0 and "--threads: expected positive counts like 1,2, got '0'" in done.stderr
