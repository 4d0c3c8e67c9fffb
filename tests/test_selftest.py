"""``nnfast selftest``: it passes on every backend here, covers both tables, and fails on a broken backend.

A self-test that cannot fail proves nothing, so most of this file breaks a
backend on purpose -- one kernel entry at a time, the way a real kernel bug
would (a wrong constant, an unwritten element, a bad label let through or
misreported, a GEMM path other than the one forced) -- and requires the
exit status 1 and the failing check by name, with the checks the bug does
not touch still passing. The CUDA branch (the forced GEMM paths checked
against the launches, the bad label read back from the device) runs on the
CPU emulation of the CUDA kernels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import cuda_emulation as emu
from nnfast import selftest
from nnfast.activations import ACTIVATIONS
from nnfast.backends import _instances, gemm_plan
from nnfast.backends.gemm_plan import GEMM_TILES
from nnfast.backends.numpy_backend import NumpyBackend
from nnfast.cli import main as cli
from nnfast.op_spec import REQUIRED
from nnfast.ops import OPS, REDUCTIONS
from nnfast.selftest.training import OPTIMIZER_SETTINGS

from op_table import AVAILABLE

DTYPES = ["float32", "float64"]


# ------------------------------------------------------------------ coverage
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_op_activation_and_gemm_tile_is_checked(dtype):
    checks = selftest.checks(dtype)
    assert {op for c in checks for op in c.ops} == set(OPS)
    for family in ("activation", "linear"):
        assert {a for c in checks if c.family == family for a in c.activations} == set(ACTIVATIONS), family
    fused = {a for c in checks if c.family == "linear" and "unfused" not in c.name for a in c.activations}
    unfused = {a for c in checks if c.family == "linear" and "unfused" in c.name for a in c.activations}
    assert fused == unfused == set(ACTIVATIONS)
    names = [c.name for c in checks]
    assert len(names) == len(set(names)), "check names are unique"
    ctype = "float" if dtype == "float32" else "double"
    for tile in GEMM_TILES[ctype]:
        for path in ("vector", "scalar", "misaligned", "split K"):
            assert any(n.startswith(f"gemm[{ctype} {tile} ") and f"] {path}" in n for n in names), (tile, path)
    for reduction in REDUCTIONS:
        assert any(n.startswith(f"cross_entropy[{reduction},") for n in names), reduction


def test_optimizer_settings_turn_every_flag_both_ways():
    for op, settings in OPTIMIZER_SETTINGS.items():
        for arg in OPS[op].args:
            if type(arg.check).__name__ == "Flag":
                seen = {s.get(arg.name, arg.default) for s in settings}
                assert seen == {True, False}, (op, arg.name, seen)
            elif arg.default is not REQUIRED and arg.name != "step" and isinstance(arg.default, float):
                assert any(s.get(arg.name, arg.default) != arg.default for s in settings), (op, arg.name)


# ------------------------------------------------------------------ passing
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", AVAILABLE)
def test_selftest_passes_on_every_backend(name, dtype):
    lines: list[str] = []
    report = selftest.run(name, (dtype,), log=lines.append)
    assert report.ok, "\n".join(lines)
    assert len(report.results) == len(selftest.checks(dtype))
    assert lines[0].startswith(f"nnfast selftest: backend {name}")
    assert lines[-1].startswith(f"selftest passed: backend {name}, {dtype}: {len(report.results)} checks")
    for result in report.results:
        assert 0 <= result.max_rel <= result.tolerance, result


def test_cli_prints_a_line_per_check_and_writes_json(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    assert cli(["selftest", "--backend", "numpy", "--dtype", "all", "-k", "softmax", "--json", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    checks = [line for line in out if line.startswith(("PASS", "FAIL"))]
    expected = [c.name for d in DTYPES for c in selftest.checks(d) if "softmax" in c.name]
    assert len(checks) == len(expected) > 10
    assert all(line.startswith("PASS") and " abs " in line and " rel " in line and " tol " in line
               for line in checks)
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["schema"] == selftest.SCHEMA and report["passed"] is True
    assert report["info"]["backend"] == "numpy" and report["dtypes"] == DTYPES
    assert [r["name"] for r in report["results"]] == expected
    for r in report["results"]:
        assert r["passed"] and r["max_rel"] <= r["tolerance"] and r["shape"]


def test_cli_refuses_a_backend_that_cannot_run(capsys):
    if "cupy" in AVAILABLE:
        pytest.skip("a GPU is usable here")
    assert cli(["selftest", "--backend", "cupy"]) == 2
    assert "backend 'cupy' cannot run here" in capsys.readouterr().err


def test_cli_refuses_a_json_path_it_cannot_write_before_checking(tmp_path, capsys):
    assert cli(["selftest", "--backend", "numpy", "--json", str(tmp_path / "missing" / "s.json")]) == 2
    captured = capsys.readouterr()
    assert "--json: cannot write" in captured.err and "does not exist" in captured.err
    assert "PASS" not in captured.out


def test_no_matching_check_is_a_failure(capsys):
    assert cli(["selftest", "--backend", "numpy", "-k", "no such check"]) == 1
    assert "no check ran" in capsys.readouterr().out


# ------------------------------------------------------------------ failing
def _off(a, by=1e-3):
    return a * a.dtype.type(1 + by)


class SoftmaxScaled(NumpyBackend):
    def _softmax(self, x):
        return _off(super()._softmax(x))


class LastElementUnwritten(NumpyBackend):
    def _log_softmax(self, x):
        y = super()._log_softmax(x)
        y.reshape(-1)[-1] = np.nan  # poison: what a kernel leaves in an element it forgets
        return y


class BiasGradientDropped(NumpyBackend):
    def _linear_backward(self, dy, x, W, saved, activation, alpha, has_bias, need_dx):
        dx, dW, db = super()._linear_backward(dy, x, W, saved, activation, alpha, has_bias, need_dx)
        if db is not None and db.size > 1:
            db[-1] = 0  # a column-sum that stops one column short
        return dx, dW, db


class GeluDerivativeApproximated(NumpyBackend):
    def _activation_backward(self, dy, saved, activation, alpha):
        return super()._activation_backward(dy, saved, "gelu_tanh" if activation == "gelu" else activation, alpha)


class BadLabelsIgnored(NumpyBackend):
    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):
        labels = np.where((labels < 0) | (labels >= logits.shape[1]), ignore_index, labels)
        return super()._softmax_cross_entropy(logits, labels, label_smoothing, ignore_index, reduction)


class LastBadLabelReported(NumpyBackend):
    def _softmax_cross_entropy(self, logits, labels, label_smoothing, ignore_index, reduction):
        bad = np.flatnonzero(((labels < 0) | (labels >= logits.shape[1])) & (labels != ignore_index))
        if bad.size:
            row = int(bad[-1])
            raise ValueError(f"labels: got {int(labels[row])} at row {row}")
        return super()._softmax_cross_entropy(logits, labels, label_smoothing, ignore_index, reduction)


class NesterovIgnored(NumpyBackend):
    def _sgd_update(self, params, grads, velocities, lr, momentum, nesterov, weight_decay):
        return super()._sgd_update(params, grads, velocities, lr, momentum, False, weight_decay)


class AdamBiasCorrectionOff(NumpyBackend):
    def _adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, *rest):
        return super()._adam_update(params, grads, exp_avgs, exp_avg_sqs, step + 1, lr, *rest)


# (broken backend, a check it must fail, a check it must still pass)
MUTANTS = [
    (SoftmaxScaled, "softmax rows of 1023", "log_softmax rows of 1023"),
    (LastElementUnwritten, "log_softmax rows of 10", "softmax rows of 10"),
    (BiasGradientDropped, "linear[relu] fused, bias", "linear[relu] fused, no bias"),
    (GeluDerivativeApproximated, "activation[gelu] aligned", "activation[gelu_tanh] aligned"),
    (BadLabelsIgnored, "cross_entropy bad labels raise, name row 3, backend usable",
     "cross_entropy[mean, smoothing 0.1] ignored rows"),
    (LastBadLabelReported, "cross_entropy bad labels raise, name row 3, backend usable",
     "cross_entropy every row ignored"),
    (NesterovIgnored, "sgd_update[lr 0.05, momentum 0.9, nesterov, weight_decay 0.01] 3 steps",
     "sgd_update[lr 0.05, momentum 0.9] 3 steps"),
    (AdamBiasCorrectionOff, "adam_update[lr 0.001] 3 steps", "sgd_update[lr 0.1, momentum 0] 3 steps"),
    (NesterovIgnored, "train_step[sgd nesterov] 20 steps vs the reference trajectory",
     "train_step[adamw] 20 steps vs the reference trajectory"),
]


@pytest.mark.parametrize("broken, fails, passes", MUTANTS, ids=lambda v: getattr(v, "__name__", None))
def test_a_broken_backend_fails_the_check_it_breaks(broken, fails, passes):
    lines: list[str] = []
    report = selftest.run(broken(), ("float32",), match=[fails, passes], log=lines.append)
    by_name = {r.name: r for r in report.results}
    assert {fails, passes} <= set(by_name), {fails, passes} - set(by_name)
    assert not by_name[fails].passed and by_name[fails].problems, by_name[fails]
    assert by_name[passes].passed, by_name[passes]
    assert any(line.startswith("FAIL") and fails in line for line in lines)
    assert lines[-1].startswith("selftest FAILED") and f"failed: {fails} (float32)" in lines[-1]


def test_cli_exits_1_naming_the_failing_check(monkeypatch, capsys, tmp_path):
    """The command line on a registered backend whose softmax kernel is wrong."""
    monkeypatch.setitem(_instances, "numpy", SoftmaxScaled())
    path = tmp_path / "selftest.json"
    assert cli(["selftest", "--backend", "numpy", "-k", "softmax", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed and all(line[6:].startswith("softmax ") for line in failed), failed
    assert "log_softmax rows of 1023" in out and "selftest FAILED" in out
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["passed"] is False and "softmax rows of 1023" in report["failed"]


def test_an_exception_in_one_check_fails_that_check_only():
    class Raises(NumpyBackend):
        def _log_softmax(self, x):
            raise RuntimeError("kernel launch failed")

    report = selftest.run(Raises(), ("float32",), match="softmax", log=lambda line: None)
    failed = {r.name: r for r in report.results if not r.passed}
    assert set(failed) == {c.name for c in selftest.checks("float32") if c.name.startswith("log_softmax")}
    assert all("raised RuntimeError: kernel launch failed" in r.problems[0] for r in failed.values())


# ------------------------------------------------------------------ the CUDA branch, on the CPU emulation
needs_emulation = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                     reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")


@needs_emulation
def test_selftest_passes_on_the_emulated_cuda_backend(kernel_modules):
    with emu.emulated_cupy_backend() as backend:
        report = selftest.run(backend, DTYPES, log=lambda line: None)
    assert report.ok, report.summary() + "\n" + "\n".join(p for r in report.failed for p in r.problems)
    assert report.info["backend"] == "cupy"
    (vector,) = [r for r in report.results if r.name.startswith("gemm[float large 128×128] vector")]
    assert [note.split(": ")[0] for note in vector.notes] == ["forward", "dW", "dx"]
    assert all(note.split(": ")[1].startswith("gemm<float, 128, 128,") and "true> grid" in note
               for note in vector.notes)
    split = [r for r in report.results if "] split K" in r.name]
    assert len(split) == 5 and all(note.endswith(", 3)") for r in split for note in r.notes)
    # matmul precision "high": the float32 layer and training checks again, on the TF32 tensor-core GEMM
    high = [r for r in report.results if r.precision == "high"]
    assert {r.family for r in high} == {"linear", "train"} and all(r.dtype == "float32" for r in high)
    assert all(r.name.endswith(" [high]") for r in high)


@needs_emulation
def test_a_gemm_path_other_than_the_forced_one_fails_on_the_emulated_cuda_backend(kernel_modules, monkeypatch):
    monkeypatch.setattr(gemm_plan, "choose", lambda *args: ("small", 1))  # a planner that ignores the forcing
    with emu.emulated_cupy_backend() as backend:
        report = selftest.run(backend, ("float32",), match="gemm[float large", log=lambda line: None)
    assert len(report.results) == 4 and not any(r.passed for r in report.results)
    for r in report.results:
        path = "vector" if "] vector" in r.name or "split K" in r.name else "scalar"
        assert r.problems == [f"forward: launched {r.notes[0].split(': ')[1].split(' grid')[0]}, not the {path} "
                              "path of the 128×128 tile"], r


def test_selftest_is_not_the_reference_checking_itself():
    """The reference of a check is the NumPy backend in float64, the backend under test runs the dtype."""
    seen = []

    class Spy(NumpyBackend):
        def _softmax(self, x):
            seen.append(x.dtype)
            return super()._softmax(x)

    report = selftest.run(Spy(), ("float32",), match="softmax rows of 10", log=lambda line: None)
    assert seen and set(seen) == {np.dtype(np.float32)}
    assert report.ok and report.results[0].max_abs > 0  # float32 against float64: never exactly equal
