"""Linear-layer cases that drive every GEMM path of kernels/linear.cu, against the NumPy reference.

A linear layer runs three GEMMs: the forward (``y = act(x @ W + b)``, every
activation), dW (``x^T @ dz``, A transposed) and dx (``dz @ W^T``, B
transposed). :func:`linear_outputs` runs forward and backward on a backend,
optionally with every operand one element into its buffer (misaligned: the
scalar path); :func:`check` compares with the reference by the relative
Frobenius error, NaN (an unwritten output, a poisoned read) never passing.
:func:`run_every_gemm` pins each tile configuration and the split-K path in
turn (``cuda_launch.forced_gemm``) so that every ``gemm`` and
``gemm_splitk_reduce`` instantiation is launched and checked: the emulation
suite's coverage test and the GPU tests use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnfast.backends import backend_for, cuda_launch
from nnfast.activations import ACTIVATIONS, saves_input

REFERENCE = backend_for("numpy")

#: (batch, in, out): in and out multiples of 4 take the vector path (every GEMM), odd ones the scalar path.
VECTOR_SHAPE = (37, 20, 36)
SCALAR_SHAPE = (13, 19, 9)

#: Largest relative error (Frobenius norm) allowed per dtype.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def place(backend: Any, a: np.ndarray, offset: int) -> Any:
    """``a`` on the backend, starting ``offset`` elements into a larger buffer (misaligned for offset 1)."""
    if offset == 0:
        return backend.asarray(a)
    buf = backend.xp.empty(a.size + offset, a.dtype)
    buf[offset:] = backend.asarray(a.ravel())
    return buf[offset:].reshape(a.shape)


def linear_outputs(backend: Any, x: np.ndarray, W: np.ndarray, b: np.ndarray | None, activation: str,
                   dy: np.ndarray, *, need_dx: bool = True, offset: int = 0) -> dict[str, np.ndarray]:
    """Forward and backward of one linear layer, as NumPy arrays by name (y, z, dW, db, dx)."""
    xs, Ws, dys = (place(backend, a, offset) for a in (x, W, dy))
    bs = None if b is None else place(backend, b, offset)
    y, saved = backend.linear_forward(xs, Ws, bs, activation)
    dx, dW, db = backend.linear_backward(dys, xs, Ws, saved, activation, has_bias=b is not None,
                                         need_dx=need_dx)
    out = {"y": backend.to_numpy(y), "dW": backend.to_numpy(dW)}
    if saves_input(activation):
        out["z"] = backend.to_numpy(saved)
    if need_dx:
        out["dx"] = backend.to_numpy(dx)
    if b is not None:
        out["db"] = backend.to_numpy(db)
    return out


def check(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    """Every output close to the reference: relative Frobenius error within RTOL, NaN where and only where it is."""
    assert got.keys() == expected.keys(), f"{what}: outputs {sorted(got)}, reference {sorted(expected)}"
    for name, e in expected.items():
        g = got[name]
        assert g.shape == e.shape and g.dtype == e.dtype, f"{what} {name}: {g.shape} {g.dtype} vs {e.shape} {e.dtype}"
        nan = np.isnan(g)
        assert (nan == np.isnan(e)).all(), (
            f"{what} {name}: NaN at {np.argwhere(nan != np.isnan(e))[:5].tolist()} (an unwritten output or a "
            "stage read before its copy landed)")
        diff = np.linalg.norm((g - e)[~nan].astype(np.float64))
        scale = max(np.linalg.norm(e[~nan].astype(np.float64)), np.finfo(e.dtype).tiny)
        assert diff <= RTOL[e.dtype] * scale, (
            f"{what} {name}: relative error {diff / scale:.2e} > {RTOL[e.dtype]:.0e}; worst element "
            f"{np.unravel_index(np.argmax(np.abs(g - e)), e.shape)}")


def random_case(rng: np.random.Generator, shape: tuple[int, int, int], dtype: Any,
                bias: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """``(x, W, b, dy)`` for a (batch, in, out) layer; fresh random values, never zeros."""
    m, k, n = shape
    x = rng.standard_normal((m, k)).astype(dtype)
    W = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    return x, W, b, rng.standard_normal((m, n)).astype(dtype)


def check_linear(backend: Any, rng: np.random.Generator, shape: tuple[int, int, int], dtype: Any,
                 activation: str, *, bias: bool = True, need_dx: bool = True, offset: int = 0,
                 what: str = "") -> None:
    """One layer's forward and backward on ``backend`` against the reference."""
    x, W, b, dy = random_case(rng, shape, dtype, bias)
    expected = linear_outputs(REFERENCE, x, W, b, activation, dy, need_dx=need_dx)
    got = linear_outputs(backend, x, W, b, activation, dy, need_dx=need_dx, offset=offset)
    check(got, expected, f"{what} linear {activation} {shape} {np.dtype(dtype).name} offset {offset}")


def run_every_gemm(backend: Any, rng: np.random.Generator | None = None) -> None:
    """Launch (and check) every ``gemm`` and ``gemm_splitk_reduce`` instantiation on ``backend``.

    Per C type and tile: every activation's forward on the vector and the
    scalar path (with the transposed dW and dx GEMMs of each), then the split-K
    path of the smallest tile (the second pass with every activation).
    """
    rng = np.random.default_rng(2024) if rng is None else rng
    for dtype in (np.float32, np.float64):
        tiles = list(cuda_launch.GEMM_TILES[cuda_launch.ctype(dtype)])
        for tile in tiles:
            for shape in (VECTOR_SHAPE, SCALAR_SHAPE):
                with cuda_launch.forced_gemm(tile=tile, splits=1):
                    for i, activation in enumerate(ACTIVATIONS):
                        check_linear(backend, rng, shape, dtype, activation, bias=i % 2 == 0,
                                     need_dx=i == 0, what=f"tile {tile}")
        with cuda_launch.forced_gemm(tile=tiles[-1], splits=2):
            for activation in ACTIVATIONS:  # K = 37: three slices of 16, two splits
                check_linear(backend, rng, (5, 37, 9), dtype, activation, need_dx=False, what="split K")


__all__ = ["REFERENCE", "RTOL", "SCALAR_SHAPE", "VECTOR_SHAPE", "check", "check_linear", "linear_outputs", "place",
           "random_case", "run_every_gemm"]
