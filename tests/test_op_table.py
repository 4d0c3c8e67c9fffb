"""The op table run as tests: reference vs finite differences, fast backends vs reference."""

from __future__ import annotations

import numpy as np
import pytest

from nnfast import ops as library
from nnfast.backends import backend_for

from finite_differences import check_element, value_bounds
from op_table import FAST_BACKENDS, OPS, OpInfo, Sample, assert_matches_reference

REFERENCE = backend_for("numpy")
# Central differences in float64: the bound (tests/finite_differences.py) is smallest near
# h = (3 gamma eps F / M3)^(1/3), about 1e-5 for these samples.
FD_STEP = 1e-5
FD_ELEMENTS = 40  # elements per input checked by finite differences


def _seed(name: str) -> int:
    return sum(map(ord, name))


@pytest.mark.parametrize("op", [op for op in OPS if op.value_and_grad], ids=lambda op: op.name)
def test_reference_backward_matches_finite_differences(op: OpInfo) -> None:
    rng = np.random.default_rng(_seed(op.name))
    kind = op.name if op.name == "softmax_cross_entropy" else op.name.split("_", 1)[0]
    checked = 0
    for sample in op.samples(rng, np.dtype(np.float64)):
        _, grads = op.value_and_grad(REFERENCE, sample)
        bounds = value_bounds(kind, sample.arrays, sample.options)

        def value(arrays, sample=sample):
            return op.value_and_grad(REFERENCE, Sample(arrays, sample.options, sample.wrt))[0]

        for name in sample.wrt:
            analytic = grads[name]
            assert analytic.shape == sample.arrays[name].shape
            for k in rng.permutation(analytic.size)[:FD_ELEMENTS]:
                index = np.unravel_index(k, analytic.shape)
                check_element(value, sample.arrays, name, index, float(analytic[index]), bounds, FD_STEP)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("name", FAST_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no fast backend can run here"))])
def test_backend_matches_reference(name: str, op: OpInfo, dtype) -> None:
    backend = backend_for(name)
    rng = np.random.default_rng(_seed(op.name) + 1)
    for sample in op.samples(rng, np.dtype(dtype)):
        assert_matches_reference(op, backend, REFERENCE, sample, dtype, name)


def test_every_op_of_the_table_is_driven() -> None:
    """Every row of nnfast.ops.OPS is run by some entry of the tests' op driver."""
    driven = {name for op in OPS for name in op.ops}
    assert driven == set(library.OPS), f"ops without a test driver entry: {sorted(set(library.OPS) - driven)}"
