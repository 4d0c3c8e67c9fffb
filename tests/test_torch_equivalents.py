"""The op table's PyTorch equivalents against the NumPy reference (only where PyTorch imports).

PyTorch is never a dependency of nnfast: this file skips without it. Where it
is installed, every op row's ``bench.torch`` equivalent and every activation
row's ``torch_forward`` / ``torch_backward`` must compute what the reference
computes (float64), so that ``nnfast bench`` compares like with like and the
activations keep PyTorch's semantics.
"""

from __future__ import annotations

import numpy as np
import pytest

from nnfast.activations import TABLE, resolve
from nnfast.backends import backend_for
from nnfast.ops import OPS

torch = pytest.importorskip("torch")

REF = backend_for("numpy")


def _to_torch(value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, list):
        return [torch.from_numpy(a.copy()) for a in value]
    return value


def _flat(result):
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in _flat(r)]
    if result is None:
        return []
    return [np.asarray(result.detach().numpy() if hasattr(result, "detach") else result)]


# The optimizers' equivalents are timed from a warm state (their step count differs from the op's):
# their update rules are checked against PyTorch's, written out, in test_properties.py.
@pytest.mark.parametrize("op", [op for op in OPS.values() if op.bench is not None and not op.name.endswith("_update")],
                         ids=lambda op: op.name)
def test_torch_equivalent_of_every_op(op):
    bench = op.bench
    for variant in bench.variants:
        args = bench.inputs(np.random.default_rng(0), bench.shapes[0].dims, np.dtype(np.float64), variant, REF)
        expected = _flat(getattr(REF, op.name)(**args))
        got = _flat(bench.torch(torch, {k: _to_torch(v) for k, v in args.items()})())
        if op.name == "linear_forward":
            expected = expected[:1]  # y (nnfast also returns the tensor its backward needs)
        assert len(got) == len(expected), (op.name, variant)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12, err_msg=f"{op.name} {variant}")


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.name)
def test_torch_semantics_of_every_activation(row):
    """Forward and derivative of each row as PyTorch computes them, special values included."""
    x = np.concatenate([np.random.default_rng(1).standard_normal(200) * 4,
                        [0.0, -0.0, 1e-300, -3.0, 3.0, 20.0, 20.5, -25.0, 50.0, -100.0, 1e30, -1e30]])
    alpha = resolve(row.name)[1]
    F, aten = torch.nn.functional, torch.ops.aten
    tx = torch.from_numpy(x)
    ty = row.torch_forward(F, tx, alpha)
    y = REF.activation_forward(x, row.name)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-9, atol=1e-12, err_msg=f"{row.name} forward")
    saved = x if row.saves_input else y
    dy = np.random.default_rng(2).standard_normal(x.shape)
    got = row.torch_backward(aten, torch.from_numpy(dy), torch.from_numpy(saved), alpha).numpy()
    np.testing.assert_allclose(REF.activation_backward(dy, saved, row.name), got, rtol=1e-9, atol=1e-12,
                               err_msg=f"{row.name} backward")
