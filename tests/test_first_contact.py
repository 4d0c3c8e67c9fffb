"""``benchmarks/gpu/first_contact.sh``: the one-call device script runs, end to end, on the CPU.

Its ``--dry-run`` runs every stage on the numba backend at tiny sizes, so the
script cannot rot between the rare runs on a GPU. Two more runs check the
time limits without waiting for them: a budget too small for any stage, and
a stage that hangs (a stand-in interpreter that sleeps) while the others fail
at once. The summary's reading of compute-sanitizer, pytest and training
logs is checked on logs written here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "first_contact.sh"
STAGES = ["environment", "warm-up", "selftest", "pytest-gpu", "memcheck", "racecheck", "bench", "train-step", "data",
          "train-digits", "train-synthetic", "torch-digits", "torch-synthetic"]
#: What comes back from the device machine: at most 6 files, named in letters, digits, '.', '_' and '-'.
MAX_FILES = 6

sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import sanitizer_driver  # noqa: E402
import summary  # noqa: E402


def _run(tmp_path: Path, *args: str, python: str = sys.executable, timeout: int = 400,
         **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    full_env = {**os.environ, "OUT": str(out), "PYTHON": python, "TMPDIR": str(tmp_path), **env}
    full_env.pop("NNFAST_BACKEND", None)
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, out


def _statuses(stdout: str) -> dict[str, str]:
    """The stage table printed last: stage -> status."""
    table = stdout[stdout.rindex("stage  "):].splitlines()[1:]
    return {line.split()[0]: re.split(r"\s{2,}", line)[1] for line in table if line.split()[0] in STAGES}


def _check_outputs(out: Path) -> None:
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"summary.md", "logs.tar.gz", "train.json"} <= set(files)


def test_dry_run_runs_every_stage(tmp_path):
    began = time.monotonic()
    proc, out = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    statuses = _statuses(proc.stdout)
    assert list(statuses) == STAGES, proc.stdout
    torch_ok = "ok" if _has_torch() else "unavailable"
    expected = {s: torch_ok if s.startswith("torch-") else "ok" for s in STAGES}
    assert statuses == expected, proc.stdout
    _check_outputs(out)
    assert {"selftest.json", "bench.json"} <= {p.name for p in out.iterdir()}
    selftest = json.loads((out / "selftest.json").read_text(encoding="utf-8"))
    assert selftest["passed"] and selftest["info"]["backend"] == "numba"
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert md.startswith("# nnfast on a GPU: first contact, no GPU (dry run")
    for line in ("- commit: ", "| selftest | ok |", "## Benchmark", "| train-digits | 1 |"):
        assert line in md, line
    train = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert set(train) >= {"train-digits", "train-synthetic"}
    assert proc.stdout.rstrip().splitlines()[-1] == "summary.py exit status 0"
    assert time.monotonic() - began < 240


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def test_no_stage_starts_without_time_for_it(tmp_path):
    proc, out = _run(tmp_path, "--dry-run", NNFAST_FIRST_CONTACT_BUDGET="24")  # the summary's 20 s, 4 left
    assert proc.returncode == 0, proc.stderr
    assert set(_statuses(proc.stdout).values()) == {"not run"}
    _check_outputs(out)
    assert "| bench | not run | 0.0 s | 0 s | no time left in the 24 s budget |" in (out / "summary.md").read_text()


def test_a_hanging_stage_is_stopped_and_the_rest_runs(tmp_path):
    """The environment stage hangs: it is stopped at its limit; every later stage still runs (and fails)."""
    shim = tmp_path / "python"
    shim.write_text("#!/usr/bin/env bash\n"
                    f'case "$*" in *summary.py*) exec {sys.executable} "$@" ;; *environment.py*) sleep 120 ;; '
                    "*) echo stand-in; exit 7 ;; esac\n")
    shim.chmod(0o755)
    _, summary_cap, floors = _script_numbers()
    budget = summary_cap + sum(floors.values()) - floors["environment"] + 6  # 6 s for the first stage
    began = time.monotonic()
    proc, out = _run(tmp_path, "--dry-run", python=str(shim), NNFAST_FIRST_CONTACT_BUDGET=str(budget))
    assert time.monotonic() - began < 60
    statuses = _statuses(proc.stdout)
    assert statuses["environment"] == "TIMED OUT", proc.stdout
    assert all(statuses[s] == "FAILED (exit 7)" for s in STAGES if s not in ("environment", "memcheck",
                                                                          "racecheck")), statuses
    _check_outputs(out)


def test_the_gpu_run_passes_each_stage_its_gpu_arguments(tmp_path):
    """Without --dry-run (no GPU needed: every command is a stand-in that writes down how it was called)."""
    calls = tmp_path / "calls.txt"
    shim = tmp_path / "python"
    shim.write_text("#!/usr/bin/env bash\n"
                    f'case "$*" in *summary.py*) exec {sys.executable} "$@" ;; esac\n'
                    f'echo "python $*" >> {calls}; echo stand-in; exit 7\n')
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text("#!/usr/bin/env bash\n"
                         'if [ "$1" = --help ]; then echo "--report-api-errors  --racecheck-report"; exit 0; fi\n'
                         f'echo "sanitizer $*" >> {calls}; echo "========= ERROR SUMMARY: 0 errors"\n')
    for f in (shim, sanitizer):
        f.chmod(0o755)
    proc, out = _run(tmp_path, python=str(shim), COMPUTE_SANITIZER=str(sanitizer), timeout=120)
    assert proc.returncode == 0, proc.stderr
    statuses = _statuses(proc.stdout)
    assert statuses["memcheck"] == statuses["racecheck"] == "ok", proc.stdout
    assert all(statuses[s] == "FAILED (exit 7)" for s in STAGES if s not in ("memcheck", "racecheck")), statuses
    lines = calls.read_text(encoding="utf-8").splitlines()
    expected = [
        "nnfast.cli selftest --backend cupy --dtype all --json",
        "pytest -m gpu",
        f"sanitizer --tool memcheck --error-exitcode 99 --report-api-errors no {shim} "
        "benchmarks/gpu/sanitizer_driver.py --no-pool",
        f"sanitizer --tool racecheck --error-exitcode 99 --racecheck-report hazard {shim} "
        "benchmarks/gpu/sanitizer_driver.py --quick --dtype float32",
        "nnfast.cli bench --backend cupy --size large --no-progress --json",
        "nnfast.cli train --backend cupy --no-progress",
        "torch_train.py --device cuda --epochs 3 --data"]
    for text in expected:
        assert any(text in line for line in lines), (text, lines)
    assert f"to record this run: cp {out}/summary.md benchmarks/gpu/RESULTS.md" in proc.stdout
    _check_outputs(out)


def _script_numbers() -> tuple[int, int, dict[str, int]]:
    """The script's default budget, the summary's cap and each stage's floor."""
    text = SCRIPT.read_text(encoding="utf-8")
    budget = int(re.search(r'BUDGET="\$\{NNFAST_FIRST_CONTACT_BUDGET:-(\d+)\}"', text).group(1))
    summary_cap = int(re.search(r"^SUMMARY_CAP=(\d+)$", text, re.M).group(1))
    floors = {k: int(v) for k, v in re.findall(r"\[([a-z-]+)\]=(\d+)", text[text.index("FLOOR=("):])}
    return budget, summary_cap, floors


def test_the_budget_fits_nine_minutes():
    budget, summary_cap, floors = _script_numbers()
    assert list(floors) == STAGES
    # The stages end by the budget less the summary's cap (+ 10 s for a stage killed after its TERM); then the
    # summary (+ 5 s if killed) and the tarball (5 s at most).
    assert (budget - summary_cap + 10) + (summary_cap + 5) + 5 <= 9 * 60
    assert sum(floors.values()) + summary_cap < budget


# ------------------------------------------------------------------ the sanitizer stages' driver
def test_the_sanitizer_driver_launches_every_family_and_every_forced_gemm_path():
    from nnfast.selftest import checks

    every = checks("float32")
    full = [c for c in every if sanitizer_driver.selected(quick=False)(c)]
    quick = [c for c in every if sanitizer_driver.selected(quick=True)(c)]
    assert {c.family for c in full} == {c.family for c in every} - {"train"}
    assert {c.family for c in quick} == {c.family for c in every} - {"train", "linear"}
    forced = {c.name for c in every if c.family == "gemm" and "default plan" not in c.name}
    assert len(forced) >= 12 and forced <= {c.name for c in quick}  # every tile on every path, even --quick
    assert not any("default plan" in c.name or "misaligned" in c.name and c.family == "activation" for c in quick)


def test_the_sanitizer_driver_turns_the_pool_off_before_the_run(monkeypatch):
    cupy = pytest.importorskip("cupy")
    from nnfast import selftest

    seen = {}

    def run(backend, dtypes, select, log):
        seen.update(backend=backend, dtypes=dtypes, allocator=cupy.cuda.get_allocator())
        return type("Report", (), {"ok": False})()

    monkeypatch.setattr(selftest, "run", run)
    before = cupy.cuda.get_allocator()
    try:
        assert sanitizer_driver.main(["--no-pool", "--dtype", "float64"]) == 1  # a failed check: exit 1
        assert seen["backend"] == "cupy" and seen["dtypes"] == ("float64",)
        assert seen["allocator"] is cupy.cuda.memory._malloc  # what CuPy uses without a pool: cudaMalloc itself
    finally:
        cupy.cuda.set_allocator(before)


# ------------------------------------------------------------------ the summary's reading of logs
def _stage(logs: Path, name: str, rc: int, log: str, note: str = "") -> dict:
    (logs / f"{name}.log").write_text(log, encoding="utf-8")
    return {"name": name, "rc": rc, "seconds": 1.0, "limit": 60, "note": note}


@pytest.mark.parametrize("rc, log, status, result", [
    (0, "... PASS\n========= ERROR SUMMARY: 0 errors\n", "ok", "0 errors"),
    (99, "========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n",
     "FAILED (exit 99)", "3 errors, most frequent: Invalid __global__ read of size 4 bytes"),
    (1, "========= Error: Device not supported\nCUDARuntimeError: cudaErrorUnknown\n", "refused",
     "could not instrument this device: Device not supported"),
    (0, "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
        "selftest passed: backend cupy, float32: 64 checks, 64 passed, 0 failed (9.0 s)\n", "ok",
     "0 hazards, driver: 64 checks, 0 failed"),
    (4, "compute-sanitizer not found\n", "unavailable", "compute-sanitizer not found"),
    (124, "PASS  gemm a\nFAIL  gemm b\nPASS  gemm c\n", "TIMED OUT",
     "stopped after its 60 s limit; driver: 3 checks done, 1 failed"),
])
def test_sanitizer_verdicts(tmp_path, rc, log, status, result):
    got_status, got_result = summary.verdict(_stage(tmp_path, "memcheck", rc, log), tmp_path, tmp_path)
    assert got_status == status and result in got_result


MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
PASS  softmax rows
========= Invalid __global__ read of size 4 bytes
=========     at void softmax_rows<float, 4>(const float *, float *, int, int)+0x1b0 in softmax.cu:88
=========     by thread (31,0,0) in block (2,0,0)
=========     Address 0x7f3c12000400 is out of bounds
========= Invalid __global__ read of size 4 bytes
=========     at void softmax_rows<float, 4>(const float *, float *, int, int)+0x1b0 in softmax.cu:88
=========     by thread (30,0,0) in block (2,0,0)
=========     Address 0x7f3c120003fc is out of bounds
========= Invalid __global__ write of size 16 bytes
=========     at void adam_multi<float>(...)+0x90 in optim.cu:40
========= Error: process didn't terminate successfully
========= ERROR SUMMARY: 3 errors
"""
RACECHECK_LOG = """\
========= Error: Race reported between Write access at void gemm<float, 64>(...)+0x2a0 in linear.cu:301
=========     and Read access at void gemm<float, 64>(...)+0x300 in linear.cu:288 [128 hazards]
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""


def test_sanitizer_findings_are_grouped_by_kind_and_place(tmp_path):
    assert summary.sanitizer_findings(MEMCHECK_LOG) == [
        "Invalid __global__ read of size 4 bytes at void softmax_rows<float, 4>(const float *, float *, int, int)"
        "+0x1b0 in softmax.cu:88 (×2)",
        "Invalid __global__ write of size 16 bytes at void adam_multi<float>(...)+0x90 in optim.cu:40"]
    assert summary.sanitizer_findings(RACECHECK_LOG) == [
        "Error: Race reported between Write access at void gemm<float, 64>(...)+0x2a0 in linear.cu:301 and "
        "Read access at void gemm<float, 64>(...)+0x300 in linear.cu:288 [128 hazards]"]
    assert summary.sanitizer_findings("========= ERROR SUMMARY: 0 errors\n") == []
    stage = _stage(tmp_path, "racecheck", 99, RACECHECK_LOG)
    status, result = summary.verdict(stage, tmp_path, tmp_path)
    assert status == "FAILED (exit 99)" and result.startswith("1 hazards, most frequent: Error: Race reported")


def test_the_summary_lists_the_sanitizer_findings(tmp_path):
    (tmp_path / "memcheck.log").write_text(MEMCHECK_LOG, encoding="utf-8")
    (tmp_path / "racecheck.log").write_text("========= RACECHECK SUMMARY: 0 hazards displayed\n", encoding="utf-8")
    (tmp_path / "stages.tsv").write_text("memcheck\t99\t12.0\t75\t\nracecheck\t0\t9.0\t75\t\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    summary.write(tmp_path, out, dry_run=False)
    md = (out / "summary.md").read_text(encoding="utf-8")
    section = md[md.index("## compute-sanitizer findings"):].split("\n## ")[0].strip().splitlines()
    assert section[2:] == ["- memcheck: Invalid __global__ read of size 4 bytes at void softmax_rows<float, 4>"
                           "(const float *, float *, int, int)+0x1b0 in softmax.cu:88 (×2)",
                           "- memcheck: Invalid __global__ write of size 16 bytes at void adam_multi<float>(...)"
                           "+0x90 in optim.cu:40"]
    assert ("| memcheck | FAILED (exit 99) | 12.0 s | 75 s | 3 errors, driver: 1 checks done, 0 failed, "
            "most frequent: Invalid __global__ read") in md


def test_pytest_training_and_skipped_verdicts(tmp_path):
    stage = _stage(tmp_path, "pytest-gpu", 1, "FAILED tests/x.py::t\n2 failed, 106 passed, 3 skipped in 41.20s\n")
    assert summary.verdict(stage, tmp_path, tmp_path) == ("FAILED (exit 1)", "2 failed, 106 passed, 3 skipped")
    log = ("training [64, 256, 256, 10] (relu) on digits\n"
           "epoch   1/2  loss 0.7499  test acc  95.26%    0.50 s       2899 samples/s\n"
           "epoch   2/2  loss 0.2023  test acc  96.38%    0.15 s       9381 samples/s\nfinal test accuracy: 96.38%\n")
    stage = _stage(tmp_path, "train-digits", 0, log)
    assert summary.verdict(stage, tmp_path, tmp_path) == (
        "ok", "test accuracy 96.38% after 2 epochs, last epoch 0.15 s (9381 samples/s)")
    assert summary.training(tmp_path)["train-digits"][1] == {
        "epoch": 2, "loss": 0.2023, "test_accuracy": 0.9638, "seconds": 0.15, "samples_per_second": 9381}
    skipped = {"name": "bench", "rc": -1, "seconds": 0.0, "limit": 0, "note": "no time left in the 520 s budget"}
    assert summary.verdict(skipped, tmp_path, tmp_path) == ("not run", "no time left in the 520 s budget")


def test_warm_up_verdicts(tmp_path):
    stage = _stage(tmp_path, "warm-up", 0, "warm-up: ...\n")
    (tmp_path / "warm_up.json").write_text(json.dumps({"files": [{"file": "linear.cu", "seconds": 18.0}],
                                                       "wall_s": 19.2, "serial_s": 23.4}))
    assert summary.verdict(stage, tmp_path, tmp_path) == ("ok", "19.2 s wall (serially 23.4 s)")
    (tmp_path / "warm_up.json").write_text(json.dumps({"files": [], "wall_s": 9.5, "backend": {
        "arch": "sm_90", "kernels": 1500, "compiled": 1400, "cached": 100, "seconds": 9.4}}))
    assert summary.verdict(stage, tmp_path, tmp_path) == ("ok", "9.5 s wall; 1400 of 1500 kernels compiled, 100 cached")


def test_bench_table_of_a_gpu_report():
    fig = {"median_s": 0.05, "rate": 44000.0, "limit_fraction": 0.8, "speedup_vs_torch": 0.9}
    report = {"settings": {"backends": ["cupy"]}, "results": [{
        "op": "linear_forward", "variant": "relu", "label": "8192×8192→8192", "dtype": "float32",
        "metric": "GFLOP/s", "limits": {"gpu": {"rate": 55000.0}},
        "impls": {"cupy": fig, "torch-cuda": {"rate": 49000.0}, "torch-cuda-tf32": {"rate": 350000.0}}}]}
    header, rule, row = summary.bench_table(report)
    assert row == ("| linear_forward relu | 8192×8192→8192 | float32 | 44 TFLOP/s | 50 ms | 55 TFLOP/s | 80% | "
                   "49 TFLOP/s | 350 TFLOP/s | 0.90× |")
