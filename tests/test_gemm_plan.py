"""The GEMM plan (nnfast/backends/gemm_plan.py and cuda_launch.gemm_launch): tiles, grids, split K.

Pure Python, no GPU: the plan must agree with what the kernel computes from its
grid (every split gets K slices), fit the launch limits, and fill the device at
the training shapes it is made for.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nnfast.backends import cuda_launch, gemm_plan
from nnfast.backends.gemm_plan import GEMM_TILES, cdiv, effective_splits

SM = cuda_launch.DEFAULT_SM_COUNT


def _blocks(plan) -> int:
    return plan.grid[0] * plan.grid[1] * plan.grid[2]


def _three_products(batch: int, inputs: int, outputs: int, dtype=np.float32):
    """The forward, dW and dx plans of one linear layer."""
    return {
        "forward": cuda_launch.gemm_launch(batch, outputs, inputs, dtype, activation="relu", aligned=True),
        "dW": cuda_launch.gemm_launch(inputs, outputs, batch, dtype, trans_a=True, aligned=True),
        "dx": cuda_launch.gemm_launch(batch, inputs, outputs, dtype, trans_b=True, aligned=True),
    }


@pytest.mark.parametrize("slices", [1, 2, 5, 7, 8, 63, 64, 65, 200, 4097])
def test_every_split_the_kernel_runs_gets_slices(slices):
    # The kernel gives split z the slices [z * per, min((z + 1) * per, slices)), per = cdiv(slices, splits).
    for asked in range(1, 70):
        splits = effective_splits(slices, asked)
        per = cdiv(slices, splits)
        assert 1 <= splits <= min(asked, slices)
        assert (splits - 1) * per < slices <= splits * per, (slices, asked, splits)


def test_the_large_square_gemm_takes_the_large_tile_unsplit():
    plan = cuda_launch.gemm_launch(4096, 4096, 4096, np.float32, activation="relu", aligned=True)
    assert plan.kernel == "gemm<float, 128, 128, 8, 32, 64, 4, false, false, 1, true>"
    assert plan.grid == (32, 32, 1) and plan.splits == 1 and plan.reduce is None
    assert plan.block == (256, 1, 1) and plan.shared_mem == 4 * 8 * (132 + 128) * 4


def test_a_long_reduction_is_split_to_fill_the_device():
    # dW of a 65536 x 256 -> 256 layer: 4 large tiles (16 medium) on 132 SMs unless K is split.
    plan = cuda_launch.gemm_launch(256, 256, 65536, np.float32, trans_a=True, aligned=True)
    assert plan.splits > 1 and _blocks(plan) >= SM
    assert plan.workspace_shape == (plan.splits, 256, 256)
    assert plan.kernel.split(", ")[9] == "0"  # the partial products take the identity epilogue
    assert plan.reduce is not None and plan.reduce.kernel == "gemm_splitk_reduce<float, 0>"


@pytest.mark.parametrize("batch", [512, 2048, 8192])
@pytest.mark.parametrize("inputs,outputs", [(784, 256), (256, 256), (1024, 1024), (4096, 4096), (784, 4096)])
def test_training_shapes_fill_the_device(batch, inputs, outputs):
    """At least three quarters of the multiprocessors get a block (not, say, 16 blocks on 132 SMs)."""
    for name, plan in _three_products(batch, inputs, outputs).items():
        assert _blocks(plan) >= 0.75 * SM, f"{name} of {batch} x {inputs} -> {outputs}: {plan}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_plans_carry_their_second_pass(dtype):
    with cuda_launch.forced_gemm(splits=3):
        for aligned, n in itertools.product((True, False), (36, 37)):
            plan = cuda_launch.gemm_launch(40, n, 500, dtype, activation="gelu", aligned=aligned)
            assert plan.splits == 3 and plan.grid[2] == 3 and plan.workspace_shape == (3, 40, n)
            assert plan.reduce.kernel == f"gemm_splitk_reduce<{cuda_launch.ctype(dtype)}, 5>"
            assert plan.reduce.grid[0] * plan.reduce.block[0] >= n and plan.reduce.grid[1] <= 40
            assert plan.kernel.split(", ")[9] == "0"


def test_splits_respect_the_workspace_limit_and_the_slices_per_split():
    for M, N, K in [(4096, 4096, 1 << 20), (1, 1, 1 << 22), (3000, 3000, 100000)]:
        plan = cuda_launch.gemm_launch(M, N, K, np.float32, trans_a=True, aligned=True)
        tile = next(t for t in GEMM_TILES["float"].values() if plan.kernel.startswith(f"gemm<float, {t.bm}, {t.bn},"))
        assert plan.splits * M * N * 4 <= gemm_plan.MAX_WORKSPACE_BYTES
        assert plan.splits == 1 or cdiv(K, tile.bk) >= plan.splits * gemm_plan.MIN_SLICES_PER_SPLIT


def test_forced_gemm_pins_and_restores():
    default = cuda_launch.gemm_launch(4096, 4096, 4096, np.float32)
    with cuda_launch.forced_gemm(tile="small", splits=4):
        plan = cuda_launch.gemm_launch(4096, 4096, 4096, np.float32)
        assert plan.kernel.startswith("gemm<float, 32, 32,") and plan.splits == 4
        with cuda_launch.forced_gemm(tile="medium"):
            assert cuda_launch.gemm_launch(8, 8, 8, np.float32).kernel.startswith("gemm<float, 64, 64,")
        with cuda_launch.forced_gemm(tile="large", splits=1000):  # at most one split per slice of 8
            assert cuda_launch.gemm_launch(8, 8, 100, np.float32).splits == cdiv(100, 8)
    assert cuda_launch.gemm_launch(4096, 4096, 4096, np.float32) == default


def test_forced_gemm_rejects_what_does_not_exist():
    with pytest.raises(ValueError, match="tile: expected one of"):
        with cuda_launch.forced_gemm(tile="huge"):
            pass
    with pytest.raises(ValueError, match="splits: expected a positive int"):
        with cuda_launch.forced_gemm(splits=0):
            pass
    with cuda_launch.forced_gemm(tile="medium"):  # float only
        with pytest.raises(ValueError, match="'medium' does not exist for double"):
            cuda_launch.gemm_launch(8, 8, 8, np.float64)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="M, N and K must be positive, got 0, 8, 8"):
        cuda_launch.gemm_launch(0, 8, 8, np.float32)


@pytest.mark.parametrize("c", ["float", "double"])
def test_tiles_fit_the_launch_limits(c):
    w, itemsize = (4, 4) if c == "float" else (2, 8)
    for tile in GEMM_TILES[c].values():
        assert tile.threads % 32 == 0 and tile.threads <= 1024
        assert tile.blocks_per_sm >= 1
        assert (tile.wm // 4) % w == 0 and (tile.wn // 8) % w == 0, "a lane's rows and columns are whole vectors"
        for ta, tb in [(False, False), (True, False), (False, True)]:
            assert tile.shared_mem(itemsize, w, trans_a=ta, trans_b=tb) <= 48 * 1024


# --------------------------------------------------------------------- TF32 (matmul precision "high")
TF32 = GEMM_TILES["tf32"]
#: Shared memory of one sm_90 multiprocessor, and what each resident block reserves of it.
SM90_SHARED, BLOCK_RESERVED = 233472, 1024


def test_the_large_square_tf32_gemm_takes_the_large_tensor_core_tile():
    plan = cuda_launch.gemm_launch(4096, 4096, 4096, np.float32, activation="relu", aligned=True, precision="high")
    assert plan.file == "linear_tf32.cu"
    assert plan.kernel == "gemm_tf32<128, 256, 32, 64, 64, 3, false, false, 1, true>"
    assert plan.grid == (32, 16, 1) and plan.splits == 1 and plan.block == (256, 1, 1)
    assert plan.shared_mem == 3 * (128 * (32 + 4) + 32 * (256 + 8)) * 4  # A [m][k] + B [k][n], 3 stages


def test_tf32_tiles_fit_the_launch_limits_and_their_occupancy():
    for name, tile in TF32.items():
        assert tile.threads % 32 == 0 and tile.threads <= 1024
        assert tile.wm % 16 == 0 and tile.wn % 16 == 0 and tile.bk % 8 == 0, "whole m16n16k8 fragments"
        assert (tile.bm * tile.bn // 4) % tile.threads == 0, "the epilogue's runs of 4 columns tile the block"
        for ta, tb in [(False, False), (True, False), (False, True)]:
            smem = tile.shared_mem(4, 4, trans_a=ta, trans_b=tb)
            assert smem <= cuda_launch.DEFAULT_MAX_SHARED_MEM
            assert tile.blocks * (smem + BLOCK_RESERVED) <= SM90_SHARED, f"{name}: {tile.blocks} blocks do not fit"
    assert [n for n, t in TF32.items() if t.scalar] == ["small"]


@pytest.mark.parametrize("max_shared,tiles", [(232448, {"large"}), (166912, {"large"}),
                                              (101376, {"small"})])
def test_tf32_plans_respect_the_devices_shared_memory(max_shared, tiles):
    """sm_90 (227 KiB a block), sm_80 (163 KiB), sm_86 / sm_89 (99 KiB)."""
    plan = cuda_launch.gemm_launch(4096, 4096, 4096, np.float32, aligned=True, precision="high",
                                   max_shared=max_shared)
    assert plan.shared_mem <= max_shared
    assert next(n for n, t in TF32.items() if plan.kernel.startswith(f"gemm_tf32<{t.bm}, {t.bn}, ")) in tiles
    with pytest.raises(ValueError, match="no tf32 GEMM tile can run this product"):
        cuda_launch.gemm_launch(64, 64, 64, np.float32, aligned=True, precision="high", max_shared=48 * 1024)
    with cuda_launch.forced_gemm(tile="large"), pytest.raises(ValueError, match="bytes of shared memory"):
        cuda_launch.gemm_launch(64, 64, 64, np.float32, aligned=True, precision="high", max_shared=101376)


@pytest.mark.parametrize("batch", [2048, 8192])
@pytest.mark.parametrize("inputs,outputs", [(784, 1024), (1024, 1024), (4096, 4096), (784, 4096)])
def test_tf32_training_shapes_fill_the_device(batch, inputs, outputs):
    """Products of a GFLOP and more get a block on three quarters of the multiprocessors at least (smaller ones
    last a few microseconds, where a second launch for split K costs more than idle multiprocessors)."""
    for name, dims, kwargs in (("forward", (batch, outputs, inputs), {}), ("dW", (inputs, outputs, batch),
                                                                           {"trans_a": True}),
                               ("dx", (batch, inputs, outputs), {"trans_b": True})):
        plan = cuda_launch.gemm_launch(*dims, np.float32, aligned=True, precision="high", **kwargs)
        assert _blocks(plan) >= 0.75 * SM, f"{name} of {batch} x {inputs} -> {outputs}: {plan}"
