"""Shared test configuration: hypothesis profiles and backend parameters."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import nnfast as nf

# "ci" (the default) keeps the suite fast; HYPOTHESIS_PROFILE=thorough runs >= 1000 examples per test.
settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from op_table import AVAILABLE  # noqa: E402


@pytest.fixture(params=AVAILABLE)
def backend(request):
    """Each backend that can run here, made current for the test."""
    with nf.use_backend(request.param) as b:
        yield b


#: The CuPy backend on the CPU emulation of the CUDA kernels (tests/cuda_emulation.py), as a backend parameter.
EMULATED_CUPY = "cupy-emulated"


def _emulation_available() -> bool:
    import cuda_emulation

    return cuda_emulation.unavailable_reason() is None and "cupy" not in AVAILABLE


@pytest.fixture(params=AVAILABLE + ([EMULATED_CUPY] if _emulation_available() else []))
def backend_or_emulated(request):
    """Each backend that can run here and, without a GPU, the CuPy backend on the emulation, made current."""
    if request.param != EMULATED_CUPY:
        with nf.use_backend(request.param) as b:
            yield b
        return
    import cuda_emulation

    request.getfixturevalue("kernel_modules")
    with cuda_emulation.emulated_cupy_backend() as gpu, nf.use_backend(gpu) as b:
        yield b


@pytest.fixture(scope="module")
def kernel_modules():
    """Every ``kernels/*.cu`` built for the CPU emulation of CUDA (tests/cuda_emulation.py)."""
    import importlib.util

    import cuda_emulation

    if importlib.util.find_spec("nnfast.backends.cupy_backend") is None:
        pytest.skip("nnfast.backends.cupy_backend is not in this checkout")
    return cuda_emulation.build_all_kernel_modules()
