"""Shared test configuration: hypothesis profiles and backend parameters."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import nnfast as nf

# Hypothesis profiles (HYPOTHESIS_PROFILE selects one; CONTRIBUTING.md says when to use which):
# * "ci", the default: 25 examples per test, derandomised (the examples follow from each test's
#   source, so every run, CI's included, draws the same ones) and no example database: a run
#   never depends on what an earlier run found.
# * "explore": as many examples, drawn at random (reproducible with --hypothesis-seed=N), no
#   database: each seed is an independent sample of the input space.
# * "thorough": >= 1000 random examples per test; failures are kept in .hypothesis/ (git-ignored)
#   and replayed first on the next run until fixed.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", max_examples=25, derandomize=False, database=None, print_blob=True,
                          **_COMMON)
settings.register_profile("thorough", max_examples=1000, derandomize=False, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from op_table import AVAILABLE  # noqa: E402


@pytest.fixture(params=AVAILABLE)
def backend(request):
    """Each backend that can run here, made current for the test."""
    with nf.use_backend(request.param) as b:
        yield b


@pytest.fixture(scope="module")
def kernel_modules():
    """Every ``kernels/*.cu`` built for the CPU emulation of CUDA (tests/cuda_emulation.py)."""
    import importlib.util

    import cuda_emulation

    if importlib.util.find_spec("nnfast.backends.cupy_backend") is None:
        pytest.skip("nnfast.backends.cupy_backend is not in this checkout")
    return cuda_emulation.build_all_kernel_modules()
