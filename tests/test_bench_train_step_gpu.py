"""benchmarks/gpu/train_step.py keeps working without a GPU: its ``--dry-run`` runs standalone
(a checkout on PYTHONPATH, as on a bare GPU machine) on a CPU backend; the figures are not checked."""

from __future__ import annotations

import json
import math

from script_support import ROOT, run_script

SCRIPT = ROOT / "benchmarks" / "gpu" / "train_step.py"


def _run(*args, cwd):
    return run_script(SCRIPT, *args, cwd=cwd, numba_threads=1)


def test_the_dry_run_reports_every_cpu_mode(tmp_path):
    out = tmp_path / "rows.json"
    done = _run("--dry-run", "--optimizer", "sgd", "--steps", "3", "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert (report["dry_run"], report["optimizer"], report["batch"]) == (True, "sgd", 8)
    rows = report["rows"]
    assert [r["mode"] for r in rows] == ["eager", "eager plan"]
    for r in rows:
        assert r["backend"] in ("numba", "numpy")
        assert r["us_per_step"] > 0 and math.isclose(r["steps_per_s"], 1e6 / r["us_per_step"])
        assert r["syncs_per_step"] is None  # no device: nothing to wait for
    assert "dry run" in done.stdout and "eager plan" in done.stdout and "syncs/step" in done.stdout


def test_a_bad_count_is_refused_by_name(tmp_path):
    done = _run("--dry-run", "--repeats", "0", cwd=tmp_path)
    assert done.returncode == 2 and "--repeats: expected a positive count, got 0" in done.stderr
