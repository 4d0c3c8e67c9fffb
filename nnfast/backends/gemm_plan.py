"""How a GEMM of ``kernels/linear.cu`` / ``linear_tf32.cu`` is cut into blocks: tiles, and the split-K factor.

:data:`GEMM_TILES` holds the tile configurations the kernels are instantiated
with; :func:`choose` picks one of them and a split-K factor for a product of a
given shape by a small cost model of the device (waves of blocks at the
tile's occupancy, plus the second pass that split K costs); :func:`forced`
pins either choice for the code inside a ``with`` block (tests and
benchmarks use it to run a given path). Pure Python, no CUDA import.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemmTile:
    """One tile configuration: the ``BM, BN, BK, WM, WN, STAGES`` of ``gemm<...>``.

    ``efficiency`` is the fraction of the device's FMA rate the tile is
    expected to reach with the multiprocessors full (a cost-model input, not a
    measurement): small tiles reuse each loaded value fewer times.
    """

    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    stages: int
    efficiency: float

    @property
    def threads(self) -> int:
        return (self.bm // self.wm) * (self.bn // self.wn) * 32

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per multiprocessor at the kernel's 128-register cap (its __launch_bounds__)."""
        return 65536 // (self.threads * 128)

    def shared_mem(self, itemsize: int, vec_width: int, *, trans_a: bool, trans_b: bool) -> int:
        """Bytes of the ring of stages; an operand stored k-contiguous has its rows padded by a vector."""
        pitch_a = self.bm + (0 if trans_a else vec_width)  # A is k-contiguous unless transposed
        pitch_b = self.bn + (vec_width if trans_b else 0)  # B is k-contiguous when transposed
        return self.stages * self.bk * (pitch_a + pitch_b) * itemsize

    def slices(self, K: int) -> int:
        return max(1, cdiv(K, self.bk))


@dataclass(frozen=True)
class TensorCoreTile(GemmTile):
    """A tile of the tensor-core GEMM ``gemm_tf32<BM, BN, BK, WM, WN, STAGES, ...>`` (float only).

    Its stages keep each operand's layout, rows of k padded by 4 floats and
    rows of m or n by 8, and the epilogue's C tile (``BM x (BN + 8)`` floats)
    reuses them; the kernel may use up to 255 registers, so ``blocks`` (resident
    blocks per multiprocessor) is given, from its registers (``ptxas -v``) and
    shared memory.
    """

    blocks: int = 1
    #: Instantiated for the scalar path too (VEC false: misaligned operands, sizes not multiples of 4).
    scalar: bool = False

    @property
    def blocks_per_sm(self) -> int:
        return self.blocks

    def shared_mem(self, itemsize: int, vec_width: int, *, trans_a: bool, trans_b: bool) -> int:
        a = self.bk * (self.bm + 8) if trans_a else self.bm * (self.bk + 4)  # [k][m] or [m][k]
        b = self.bn * (self.bk + 4) if trans_b else self.bk * (self.bn + 8)  # [n][k] or [k][n]
        return max(self.stages * (a + b), self.bm * (self.bn + 8)) * itemsize


#: Tile configurations per C type, largest first. float: 128 x 128 with 8 x 8
#: per thread (two 256-thread blocks per SM), 64 x 64 and 32 x 32 for grids that
#: the large tile would leave mostly empty; double: 64 x 64 and 32 x 32.
GEMM_TILES: dict[str, dict[str, GemmTile]] = {
    "float": {
        "large": GemmTile(128, 128, 8, 32, 64, 4, efficiency=1.0),
        "medium": GemmTile(64, 64, 16, 32, 32, 3, efficiency=0.8),
        "small": GemmTile(32, 32, 16, 16, 32, 3, efficiency=0.55),
    },
    "double": {
        "large": GemmTile(64, 64, 8, 32, 32, 4, efficiency=1.0),
        "small": GemmTile(32, 32, 16, 16, 32, 3, efficiency=0.7),
    },
    # float32 on the tensor cores (matmul precision "high"): 64 x 64 per warp (16 mma_sync per
    # 8 k, each fragment read from shared memory feeding four of them), 8 warps in 128 x 256
    # (one block per SM: 255 registers a thread, 156 KiB of stages), 4 in 128 x 128 (two per
    # SM), 32 x 32 per warp in 64 x 64 for small grids. Only the smallest has the scalar path
    # (misaligned or odd sizes, like a 10-class output layer: small products), which keeps
    # NVRTC's time for the file down.
    "tf32": {
        "large": TensorCoreTile(128, 256, 32, 64, 64, 3, efficiency=1.0, blocks=1),
        "medium": TensorCoreTile(128, 128, 32, 64, 64, 3, efficiency=0.9, blocks=2),
        "small": TensorCoreTile(64, 64, 32, 32, 32, 3, efficiency=0.6, blocks=3, scalar=True),
    },
}

#: Split-K factors tried, and the fewest K slices one split may get.
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MIN_SLICES_PER_SPLIT = 4
#: The most bytes a split-K workspace may take.
MAX_WORKSPACE_BYTES = 256 << 20

# The cost model's device, per multiprocessor (an H100 / H200: 67 TFLOP/s FP32, 34 FP64 and
# about 3.5 TB/s sustained over 132 SMs), and the fixed costs of a second launch and of
# filling a block's pipeline from device memory.
# TF32: mma.sync (what wmma compiles to) is taken at about 330 TFLOP/s, two thirds of the dense
# peak that only wgmma reaches.
_FLOPS_PER_SM = {"float": 0.5e12, "double": 0.25e12, "tf32": 2.5e12}
_BYTES_PER_SM = 27e9
_LAUNCH_S = 3e-6
_FILL_S = 0.5e-6


def effective_splits(slices: int, splits: int) -> int:
    """The splits the kernel really runs when asked for ``splits``: each takes ``cdiv(slices, splits)``."""
    per = cdiv(slices, max(1, min(splits, slices)))
    return cdiv(slices, per)


def cost(tile: GemmTile, c: str, M: int, N: int, K: int, splits: int, sm_count: int) -> float:
    """Modelled seconds of the GEMM (and of its split-K second pass).

    The busiest multiprocessor runs its blocks ``blocks_per_sm`` at a time at
    the tile's efficiency times ``sqrt(warps / 16)`` (capped at 1): fewer than
    sixteen resident warps hide less of the shared-memory and copy latency.
    """
    sm_count = max(1, sm_count)
    per = cdiv(tile.slices(K), splits)
    blocks = cdiv(M, tile.bm) * cdiv(N, tile.bn) * splits
    on_busiest = cdiv(blocks, sm_count)
    resident = min(tile.blocks_per_sm, on_busiest)
    rate = tile.efficiency * _FLOPS_PER_SM[c] * min(1.0, resident * tile.threads / 32 / 16) ** 0.5
    round_s = resident * 2.0 * tile.bm * tile.bn * per * tile.bk / rate + _FILL_S
    seconds = cdiv(on_busiest, resident) * round_s
    if splits > 1:  # write the partial products, read them back, write C
        itemsize = 8 if c == "double" else 4
        seconds += (2 * splits + 1) * M * N * itemsize / (_BYTES_PER_SM * sm_count) + _LAUNCH_S
    return seconds


_forced: contextvars.ContextVar[tuple[str | None, int | None]] = contextvars.ContextVar(
    "nnfast_gemm_forced", default=(None, None))


@contextlib.contextmanager
def forced(tile: str | None = None, splits: int | None = None) -> Iterator[None]:
    """Pin the tile (a key of ``GEMM_TILES[ctype]``) and/or the split-K factor of every GEMM launch inside.

    Tests use it to run a given path on any shape, benchmarks to compare paths;
    the kernel still gets at most one split per K slice.
    """
    names = {n for tiles in GEMM_TILES.values() for n in tiles}
    if tile is not None and tile not in names:
        raise ValueError(f"tile: expected one of {sorted(names)} or None, got {tile!r}")
    if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1):
        raise ValueError(f"splits: expected a positive int or None, got {splits!r}")
    token = _forced.set((tile, splits))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_now() -> tuple[str | None, int | None]:
    """The ``(tile, splits)`` pinned by :func:`forced` here and now (``(None, None)``: none)."""
    return _forced.get()


def choose(M: int, N: int, K: int, c: str, itemsize: int, sm_count: int,
           unusable: Callable[[GemmTile], str | None] | None = None) -> tuple[str, int]:
    """``(tile name, splits)`` for ``C[M, N] = A[M, K] @ B[K, N]`` with C type ``c`` (or ``"tf32"``).

    The cheapest pair by :func:`cost`, preferring larger tiles and fewer splits
    on ties. A split gets at least :data:`MIN_SLICES_PER_SPLIT` K slices and the
    workspace at most :data:`MAX_WORKSPACE_BYTES`. Tiles for which
    ``unusable(tile)`` gives a reason (too much shared memory for the device,
    no instantiation for the path) are left out; a forced one raises
    ``ValueError`` with that reason.
    """
    tiles = GEMM_TILES[c]
    want_tile, want_splits = _forced.get()
    if want_tile is not None and want_tile not in tiles:
        raise ValueError(f"forced GEMM tile {want_tile!r} does not exist for {c}: {sorted(tiles)}")
    reasons = {name: unusable(tile) if unusable is not None else None for name, tile in tiles.items()}
    if want_tile is not None and reasons[want_tile]:
        raise ValueError(f"forced GEMM tile {want_tile!r} of {c} cannot run this product: {reasons[want_tile]}")
    best: tuple[float, str, int] | None = None
    for name, tile in tiles.items():
        if (want_tile is not None and name != want_tile) or reasons[name]:
            continue
        slices = tile.slices(K)
        if want_splits is not None:
            options = [effective_splits(slices, want_splits)]
        else:
            options = sorted({effective_splits(slices, s) for s in SPLITS
                              if s == 1 or (slices >= s * MIN_SLICES_PER_SPLIT
                                            and s * M * N * itemsize <= MAX_WORKSPACE_BYTES)})
        for splits in options:
            t = cost(tile, c, M, N, K, splits, sm_count)
            if best is None or t < best[0]:
                best = (t, name, splits)
    if best is None:
        raise ValueError(f"no {c} GEMM tile can run this product: {'; '.join(f'{n}: {r}' for n, r in reasons.items())}")
    return best[1], best[2]


__all__ = ["GEMM_TILES", "GemmTile", "MAX_WORKSPACE_BYTES", "MIN_SLICES_PER_SPLIT", "SPLITS", "TensorCoreTile", "choose",
           "cost", "effective_splits", "forced", "forced_now"]
