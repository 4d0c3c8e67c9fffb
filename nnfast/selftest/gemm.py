"""Self-test checks of the GEMM paths: every tile configuration forced, vector and scalar, split K, odd operands.

A linear layer runs three GEMMs (the forward ``x @ W`` with its epilogue,
``dW = x^T @ dz`` with A transposed, ``dx = dz @ W^T`` with B transposed).
On the CUDA backend each check pins the tile (and the split-K factor) with
:func:`nnfast.backends.gemm_plan.forced`, for every tile of
:data:`~nnfast.backends.gemm_plan.GEMM_TILES` of the dtype:

* ``vector``: in and out multiples of a 16-byte vector, aligned operands:
  the 16-byte copy and store path (on the 128 x 128 tile, the kernel the
  cost model picks for large products);
* ``scalar``: odd sizes, the element-wise path;
* ``misaligned``: vector-friendly sizes, every operand one element into its
  buffer: the element-wise path, chosen from the addresses;
* ``split K``: the inner dimension split over three blocks and a second pass.

Shapes come from the tile (partial tiles at the edges, an inner dimension
that cycles the ring of pipeline stages). On the CUDA backend each check
records its launches (:func:`nnfast.backends.cuda_recording.recorded_launches`)
and fails unless they took the path forced: the instantiation's tile and
vector flag, the number of splits. Other backends run the same layers: the
forcing does not concern them, the shapes and operand layouts do. Two more
checks per dtype give the public ops transposed and strided views, and run
the unforced plans at a training shape and for one row.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from ..activations import ACTIVATIONS
from ..backends import cuda_launch, cuda_recording, gemm_plan
from ..backends.gemm_plan import GEMM_TILES, GemmTile
from .check import Check, CheckFailed, Context, dims
from .compare import Pair
from .layers import layer_inputs, linear_reference, pairs, run_layer

#: Split-K factor forced by the split-K checks.
SPLITS = 3
#: Whether each path's launches move 16-byte vectors (split K runs at vector-friendly sizes).
VECTOR = {"vector": True, "scalar": False, "misaligned": False, "split K": True}


def tile_shapes(tile: GemmTile) -> dict[str, tuple[int, int, int]]:
    """(batch, in, out) of each path's check for ``tile``.

    Two full tiles and a partial one each way; the inner dimension runs
    through the ring of stages four times and stays a multiple of 4 (two
    for doubles) where the path needs vectors.
    """
    m, k, n = 2 * tile.bm + 44, 4 * tile.bk * tile.stages + 8, 2 * tile.bn + 4
    return {"vector": (m, k, n), "scalar": (m + 1, k - 1, n - 1), "misaligned": (m, k, n),
            "split K": (tile.bm + 3, SPLITS * 4 * tile.bk + 4, tile.bn + 4)}


def _verify_path(ctx: Context, launched: list[cuda_launch.Launch], tile: GemmTile, vector: bool, splits: int,
                 products: int) -> None:
    """Raise :class:`CheckFailed` unless the GEMMs launched ran on ``tile``, vector or not, ``splits`` ways."""
    sizes = f"{tile.bm}, {tile.bn}, {tile.bk}, {tile.wm}, {tile.wn}, {tile.stages}"
    gemms = [launch for launch in launched if launch.kernel.startswith("gemm<")]
    for launch, what in zip(gemms, ("forward", "dW", "dx")):
        ctx.notes.append(f"{what}: {launch.kernel} grid {launch.grid}")
        if sizes not in launch.kernel or not launch.kernel.endswith("true>" if vector else "false>"):
            raise CheckFailed(f"{what}: launched {launch.kernel}, not the {'vector' if vector else 'scalar'} "
                              f"path of the {tile.bm}×{tile.bn} tile")
    if len(gemms) != products:
        raise CheckFailed(f"{len(gemms)} GEMM launches, expected {products}: {[g.kernel for g in gemms]}")
    if gemms[0].grid[2] != splits:
        raise CheckFailed(f"forward: K split {gemms[0].grid[2]} ways, expected {splits}")
    reduces = sum(launch.kernel.startswith("gemm_splitk_reduce<") for launch in launched)
    if (reduces > 0) != (splits > 1):
        raise CheckFailed(f"{reduces} split-K reductions launched with {splits} splits")


def _path_run(tile_name: str, tile: GemmTile, path: str, activation: str, bias: bool):
    shape = tile_shapes(tile)[path]
    offset = 1 if path == "misaligned" else 0
    splits = SPLITS if path == "split K" else 1
    need_dx = path != "split K"  # dW alone shows the split-K path of a transposed product

    def run(ctx: Context) -> list[Pair]:
        x, W, b, dy = layer_inputs(ctx, shape, bias)
        args = [ctx.put(x, offset), ctx.put(W, offset), None if b is None else ctx.put(b, offset),
                ctx.put(dy, offset)]
        record = cuda_recording.recorded_launches() if ctx.on_cuda else contextlib.nullcontext([])
        with gemm_plan.forced(tile=tile_name, splits=splits), record as launched:
            got, saved = run_layer(ctx, *args, activation, need_dx=need_dx)
        if ctx.on_cuda:
            _verify_path(ctx, launched, tile, VECTOR[path], splits, 3 if need_dx else 2)
        return pairs(got, linear_reference(ctx, x, W, b, dy, activation, None, saved, need_dx=need_dx))
    return run


def _views_run(ctx: Context) -> list[Pair]:
    """The public ops given a transposed ``x`` and ``dy`` and a strided ``W`` and ``b``."""
    shape = (37, 44, 28)
    x, W, b, dy = layer_inputs(ctx, shape, True)
    xp = ctx.backend.xp
    x_t = ctx.put(np.ascontiguousarray(x.T)).T  # column-major
    dy_t = ctx.put(np.ascontiguousarray(dy.T)).T
    W_wide = xp.zeros((W.shape[0], 2 * W.shape[1]), dtype=W.dtype)
    W_wide[:, ::2] = ctx.put(W)
    b_wide = xp.zeros(2 * b.size, dtype=b.dtype)
    b_wide[::2] = ctx.put(b)
    got, saved = run_layer(ctx, x_t, W_wide[:, ::2], b_wide[::2], dy_t, "relu")
    return pairs(got, linear_reference(ctx, x, W, b, dy, "relu", None, saved))


def _default_plan_run(shape: tuple[int, int, int], activation: str):
    def run(ctx: Context) -> list[Pair]:
        x, W, b, dy = layer_inputs(ctx, shape, True)
        got, saved = run_layer(ctx, ctx.put(x), ctx.put(W), ctx.put(b), ctx.put(dy), activation)
        return pairs(got, linear_reference(ctx, x, W, b, dy, activation, None, saved))
    return run


#: The unforced plans' checks: (batch, in, out) and activation.
DEFAULT_PLANS = {"a training shape": ((256, 784, 256), "relu"), "one row": ((1, 784, 10), "identity")}


def gemm_checks(dtype: np.dtype) -> Iterator[Check]:
    c = cuda_launch.ctype(dtype)
    ops = ("linear_forward", "linear_backward")
    cycle = [a for a in ACTIVATIONS if a != "identity"]
    i = 0
    for tile_name, tile in GEMM_TILES[c].items():
        for path in tile_shapes(tile):
            activation = cycle[i % len(cycle)]
            i += 1
            shape = tile_shapes(tile)[path]
            bias = path != "scalar"
            name = f"gemm[{c} {tile_name} {tile.bm}×{tile.bn}] {path}" + (f" {SPLITS}" if path == "split K" else "")
            yield Check("gemm", f"{name}, {activation}", dims(*shape, arrow=True) + (" +1" if path == "misaligned"
                                                                                   else ""),
                        ops, _path_run(tile_name, tile, path, activation, bias), length=max(shape), gemm=True,
                        activations=(activation,))
    yield Check("gemm", f"gemm[{c}] transposed and strided operands", dims(37, 44, 28, arrow=True), ops,
                _views_run, length=44, gemm=True, activations=("relu",))
    for what, (shape, activation) in DEFAULT_PLANS.items():
        yield Check("gemm", f"gemm[{c}] default plan, {what}, {activation}", dims(*shape, arrow=True), ops,
                    _default_plan_run(shape, activation), length=max(shape), gemm=True, activations=(activation,))


__all__ = ["DEFAULT_PLANS", "SPLITS", "VECTOR", "gemm_checks", "tile_shapes"]
