"""What the tests of nnfast's kernels on the CPU emulation share (tests/test_cuda_emulation*.py).

(Their ``kernel_modules`` fixture, which builds every ``kernels/*.cu`` module, is in conftest.py.)

* :func:`assert_close`, the op table's tolerances for the emulated backend against the reference;
* :func:`schedule`, the thread order of the emulated launches inside a ``with`` block;
* :func:`run_property_test`, one of ``tests/test_properties.py``'s cross-backend tests run on
  the emulated CuPy backend with fixed examples;
* :func:`mutant` and :func:`assert_caught`, a copy of ``kernels/`` with one bug put in on
  purpose, and the check that the emulation catches it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Any, Callable, Iterator

import hypothesis
import numpy as np
import pytest

import cuda_emulation as emu
from nnfast.backends import backend_for, cuda_launch

REFERENCE = backend_for("numpy")


def tolerances(length: int, dtype) -> tuple[float, float]:
    """(rtol, atol per unit of the largest expected value) for a reduction over ``length`` values."""
    # as tests/test_op_table.py
    length = max(length, 1)
    if np.dtype(dtype) == np.float64:
        return 1e-9, 1e-12 * length
    return 1e-4, 1e-5 * np.sqrt(length)


def assert_close(got, expected, length, dtype, what):
    rtol, atol = tolerances(length, dtype)
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, reference {expected.dtype}"
    scale = max(float(np.abs(expected).max()) if expected.size else 0.0, 1.0)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def run_property_test(monkeypatch, test_name: str, args: tuple, **backend_options: Any) -> None:
    """``tests/test_properties.py::<test_name>(backend, *args)`` on the emulated CuPy backend.

    Hypothesis tests draw the same examples on every run (CI stays deterministic) and do not
    shrink. ``backend_options`` go to :class:`cuda_emulation.emulated_cupy_backend` (a
    ``kernel_dir`` of modified kernels, an ``sm_count``).
    """
    import test_properties as props

    test = getattr(props, test_name, None)
    # a renamed property test must be renamed here too: a skip would leave the regime untested unnoticed
    assert test is not None and hasattr(props, "backend_for"), \
        f"tests/test_properties.py has no {test_name} (or no backend_for) any more"
    inner = getattr(test, "_hypothesis_internal_use_settings", None)
    if inner is not None:
        phases = [hypothesis.Phase.explicit, hypothesis.Phase.generate]
        monkeypatch.setattr(test, "_hypothesis_internal_use_settings",
                            hypothesis.settings(inner, derandomize=True, database=None, phases=phases))
    with emu.emulated_cupy_backend(**backend_options) as gpu:
        monkeypatch.setattr(props, "backend_for", lambda name: gpu if name == "cupy-emulated" else backend_for(name))
        test("cupy-emulated", *args)


@contextlib.contextmanager
def schedule(name: str) -> Iterator[None]:
    """Emulated launches inside run the threads of a block in the order ``name``
    (one of :data:`cuda_emulation.SCHEDULES`)."""
    if name not in emu.SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(emu.SCHEDULES)}, got {name!r}")
    saved = os.environ.get("NNFAST_EMU_SCHEDULE")
    os.environ["NNFAST_EMU_SCHEDULE"] = name
    try:
        yield
    finally:
        if saved is None:
            del os.environ["NNFAST_EMU_SCHEDULE"]
        else:
            os.environ["NNFAST_EMU_SCHEDULE"] = saved


# --------------------------------------------------------------------- mutants of the real kernels
def function_body(text: str, function: str) -> tuple[int, int]:
    """(start, end) of the body of the first definition of ``function`` in ``text``."""
    for m in re.finditer(r"\b" + re.escape(function) + r"\s*\(", text):
        depth, i = 0, m.end() - 1
        while i < len(text):  # skip the parameter list
            depth += text[i] == "("
            depth -= text[i] == ")"
            i += 1
            if depth == 0:
                break
        rest = re.match(r"[^;{]*\{", text[i:])
        if rest is None:
            continue  # a call or a declaration, not the definition
        start = i + rest.end() - 1
        depth, j = 0, start
        while j < len(text):
            depth += text[j] == "{"
            depth -= text[j] == "}"
            j += 1
            if depth == 0:
                return start, j
    raise LookupError(function)


def mutant(tmp_path, file, function, old, new, occurrence=0):
    """A copy of ``kernels/`` in ``tmp_path`` whose ``function`` in ``file`` (the whole file
    for None) has the ``occurrence``-th ``old`` replaced by ``new``; fails the test when that
    text is gone: a mutant whose site no longer exists tests nothing, so it must be updated."""
    directory = tmp_path / "kernels"
    shutil.copytree(cuda_launch.kernel_dir(), directory, ignore=shutil.ignore_patterns("testing"))
    path = directory / file
    text = path.read_text()
    start, end = 0, len(text)
    try:
        if function is not None:
            start, end = function_body(text, function)
    except LookupError:
        pytest.fail(f"mutation site gone: no {function}() in kernels/{file} any more; update the mutant")
    body = text[start:end]
    at = -1
    for _ in range(occurrence + 1):
        at = body.find(old, at + 1)
        if at < 0:
            pytest.fail(f"mutation site gone: {old!r} #{occurrence} not in {function}() of kernels/{file}; "
                        "update the mutant")
    path.write_text(text[:start] + body[:at] + new + body[at + len(old):] + text[end:])
    return directory


def assert_caught(name: str, check: Callable[[Any], None], **backend_options: Any) -> None:
    """``check(backend)`` must fail on the emulated backend built with ``backend_options``
    (a ``kernel_dir`` of mutant kernels): an assertion, a failed launch or a wrong error."""
    with emu.emulated_cupy_backend(**backend_options) as gpu:
        try:
            check(gpu)
        # ValueError: the backend read a bad-label flag the mutant set on good labels
        except (AssertionError, emu.EmulationError, pytest.fail.Exception, ValueError) as err:
            return print(f"{name}: caught: {(str(err).strip().splitlines() or [type(err).__name__])[0][:300]}")
    raise AssertionError(f"{name}: the mutant passed {getattr(check, 'func', check).__name__}")
