"""Linear-layer cases that drive every GEMM path of kernels/linear.cu, against the NumPy reference.

A linear layer runs three GEMMs: the forward (``y = act(x @ W + b)``, every
activation), dW (``x^T @ dz``, A transposed) and dx (``dz @ W^T``, B
transposed). :func:`linear_outputs` runs forward and backward on a backend,
optionally with every operand one element into its buffer (misaligned: the
scalar path); :func:`check` compares with the reference by the relative
Frobenius error, NaN (an unwritten output, a poisoned read) never passing.
:func:`run_every_gemm` pins each tile configuration and the split-K path in
turn (``cuda_launch.forced_gemm``) so that every ``gemm``, ``gemm_tf32`` and
``gemm_splitk_reduce`` instantiation is launched and checked: the emulation
suite's coverage test and the GPU tests use it. The TF32 GEMMs (matmul
precision "high", kernels/linear_tf32.cu) are held to :func:`tf32_bound`,
element by element, by :func:`check_linear_tf32`.
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


# --------------------------------------------------------------------- TF32 (matmul precision "high")
#: Bound of a TF32 dot product's error, per unit of sum |a_k| |b_k|: each operand rounded to
#: nearest at 10 mantissa bits is off by at most 2^-11 of itself, a product of two by
#: 2^-10 + 2^-22; accumulating K of them (and a bias, an output rounding) in float32 adds
#: at most (K + 4) 2^-24. A worst case, element by element: no random data can exceed it, and
#: float32 (no rounding of the operands) stays far inside it.
def tf32_bound(abs_a: np.ndarray, abs_b: np.ndarray, K: int, extra: np.ndarray | float = 0.0) -> np.ndarray:
    return (2.0 ** -10 + 2.0 ** -22 + (K + 4) * 2.0 ** -24) * (abs_a @ abs_b + extra)


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32 in NumPy (float32 in, float32 out): to 10 mantissa bits, to nearest, ties away from
    zero, the low 13 bits cleared; Inf stays Inf, NaN a quiet NaN; the largest floats round to Inf."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    special = (u & 0x7F800000) == 0x7F800000
    nan = special & ((u & 0x007FFFFF) != 0)
    r = np.where(special, u, (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000))
    r = np.where(nan, (u | np.uint32(0x00400000)) & np.uint32(0xFFFFE000), r)
    return r.astype(np.uint32).view(np.float32)


#: The steepest activation (hardswish: 1.5; gelu about 1.13): how far act(z) moves with z.
ACTIVATION_LIPSCHITZ = 1.5


def _within(got: np.ndarray, expected: np.ndarray, bound: np.ndarray, what: str) -> None:
    err = np.abs(got.astype(np.float64) - expected)
    ok = err <= bound  # NaN (an unwritten output, a poisoned read) is never within
    if not ok.all():
        worst = np.unravel_index(np.argmax(np.where(ok, -np.inf, np.nan_to_num(err / bound, nan=np.inf))), err.shape)
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} elements outside the TF32 bound; worst at "
                             f"{tuple(map(int, worst))}: got {got[worst]!r}, expected {expected[worst]:.6g}, error "
                             f"{err[worst]:.3g} > bound {bound[worst]:.3g}")


def check_linear_tf32(backend: Any, rng: np.random.Generator, shape: tuple[int, int, int], activation: str, *,
                      bias: bool = True, need_dx: bool = True, offset: int = 0, what: str = "") -> None:
    """One float32 layer's forward and backward on ``backend`` (matmul precision "high" in force) against the
    float64 reference, each GEMM output element within :func:`tf32_bound`.

    The backward gets the reference forward's ``saved`` (so that dz is the reference's to float32
    rounding: a z on the other side of ReLU's kink would change dz by all of dy).
    """
    x, W, b, dy = random_case(rng, shape, np.float32, bias)
    M, K = x.shape
    N = W.shape[1]
    tag = f"{what} TF32 linear {activation} {shape} offset {offset}"
    f64 = [None if a is None else a.astype(np.float64) for a in (x, W, b, dy)]
    y_ref, saved_ref = REFERENCE.linear_forward(f64[0], f64[1], f64[2], activation)
    xs, Ws, dys = (place(backend, a, offset) for a in (x, W, dy))
    bs = None if b is None else place(backend, b, offset)
    y, saved = backend.linear_forward(xs, Ws, bs, activation)
    z_bound = tf32_bound(np.abs(f64[0]), np.abs(f64[1]), K, 0.0 if b is None else np.abs(f64[2]))
    if saves_input(activation):
        _within(backend.to_numpy(saved), saved_ref, z_bound, f"{tag} z")
    _within(backend.to_numpy(y), y_ref, ACTIVATION_LIPSCHITZ * z_bound + 2.0 ** -20 * np.abs(y_ref) + 1e-30,
            f"{tag} y")
    # The backward from the reference's saved values, in float32 as the layer would keep them.
    saved32 = REFERENCE.linear_forward(x, W, b, activation)[1]
    dx, dW, db = backend.linear_backward(dys, xs, Ws, place(backend, saved32, offset), activation,
                                         has_bias=b is not None, need_dx=need_dx)
    dz = np.abs(REFERENCE.activation_backward(f64[3], saved32.astype(np.float64), activation))
    dx_ref, dW_ref, db_ref = REFERENCE.linear_backward(f64[3], f64[0], f64[1], saved32.astype(np.float64),
                                                       activation, has_bias=b is not None, need_dx=need_dx)
    _within(backend.to_numpy(dW), dW_ref, tf32_bound(np.abs(f64[0]).T, dz, M), f"{tag} dW")
    if need_dx:
        _within(backend.to_numpy(dx), dx_ref, tf32_bound(dz, np.abs(f64[1]).T, N), f"{tag} dx")
    if b is not None:  # no GEMM: a float32 column sum
        check({"db": backend.to_numpy(db)}, {"db": db_ref.astype(np.float32)}, tag)


def run_every_tf32_gemm(backend: Any, rng: np.random.Generator | None = None) -> None:
    """Launch (and check) every ``gemm_tf32`` instantiation on ``backend``, matmul precision "high".

    Per tensor-core tile: every activation's forward on the vector path with the transposed dW and dx
    GEMMs of each; the scalar path on the tiles that have one; then split K.
    """
    from nnfast.precision import matmul_precision

    rng = np.random.default_rng(2025) if rng is None else rng
    with matmul_precision("high"):
        for name, tile in cuda_launch.GEMM_TILES["tf32"].items():
            shapes = (VECTOR_SHAPE, SCALAR_SHAPE) if tile.scalar else (VECTOR_SHAPE,)
            for shape in shapes:
                with cuda_launch.forced_gemm(tile=name, splits=1):
                    for i, activation in enumerate(ACTIVATIONS):
                        check_linear_tf32(backend, rng, shape, activation, bias=i % 2 == 0, need_dx=i == 0,
                                          what=f"tile {name}")
        with cuda_launch.forced_gemm(tile="small", splits=2):  # K = 70: three slices of 32, two splits
            check_linear_tf32(backend, rng, (5, 70, 9), "gelu", what="split K")


def run_every_gemm(backend: Any, rng: np.random.Generator | None = None) -> None:
    """Launch (and check) every ``gemm``, ``gemm_tf32`` and ``gemm_splitk_reduce`` instantiation on ``backend``.

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
    run_every_tf32_gemm(backend, rng)


__all__ = ["ACTIVATION_LIPSCHITZ", "REFERENCE", "RTOL", "SCALAR_SHAPE", "VECTOR_SHAPE", "check", "check_linear",
           "check_linear_tf32", "linear_outputs", "place", "random_case", "round_to_tf32", "run_every_gemm",
           "run_every_tf32_gemm", "tf32_bound"]
