"""The pipelined GEMMs of kernels/linear.cu and linear_tf32.cu on a real GPU, every path pinned, against NumPy.

Marked ``gpu``: skipped (with the reason) where CuPy finds no usable device.
``cuda_launch.forced_gemm`` pins the tile and the split-K factor, so the
128 x 128 vector path (16-byte cp.async copies and stores) runs for the
forward with every fused activation, for dW and for dx, whatever shape the
cost model would otherwise give a small tile; and the split-K path runs with
its second pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import gemm_cases
from gemm_cases import check_linear
from nnfast.backends import backend_for, cuda_launch
from nnfast.activations import ACTIVATIONS
from nnfast.backends.cupy_backend import cupy_unavailable_reason
from nnfast.precision import matmul_precision

REASON = cupy_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"no usable GPU: {REASON}")]

#: (batch, in, out) for the large tile: several row and column tiles with partial edges, in and
#: out multiples of 4 (the vector path of all three products), K long enough to cycle the ring.
LARGE_VECTOR = (300, 264, 260)


@pytest.fixture(scope="module")
def gb():
    return backend_for("cupy")


def test_the_large_shape_takes_the_large_vector_path():
    m, k, n = LARGE_VECTOR
    with cuda_launch.forced_gemm(tile="large", splits=1):
        for plan in (cuda_launch.gemm_launch(m, n, k, np.float32, activation="gelu", aligned=True),
                     cuda_launch.gemm_launch(k, n, m, np.float32, trans_a=True, aligned=True),
                     cuda_launch.gemm_launch(m, k, n, np.float32, trans_b=True, aligned=True)):
            assert plan.kernel.startswith("gemm<float, 128, 128,") and plan.kernel.endswith("true>"), plan.kernel
            assert plan.splits == 1


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_large_tile_vector_path_forward_dw_dx(gb, activation):
    with cuda_launch.forced_gemm(tile="large", splits=1):
        check_linear(gb, np.random.default_rng(1), LARGE_VECTOR, np.float32, activation, what="large vector")


@pytest.mark.parametrize("offset", [0, 1], ids=["odd-sizes", "misaligned"])
def test_large_tile_scalar_path(gb, offset):
    with cuda_launch.forced_gemm(tile="large", splits=1):
        check_linear(gb, np.random.default_rng(2), (301, 263 if offset == 0 else 264, 259), np.float32, "silu",
                     offset=offset, what="large scalar")


@pytest.mark.parametrize("tile", ["large", "medium", "small"])
@pytest.mark.parametrize("splits", [2, 5, 16])
def test_split_k(gb, tile, splits):
    with cuda_launch.forced_gemm(tile=tile, splits=splits):
        for shape, activation in [((64, 1000, 132), "gelu"), ((1000, 132, 68), "relu"), ((63, 999, 131), "tanh")]:
            check_linear(gb, np.random.default_rng(splits), shape, np.float32, activation, what=f"{splits} splits")


@pytest.mark.parametrize("shape", [(128, 784, 256), (1024, 256, 256), (4096, 784, 256), (8192, 256, 10),
                                   (256, 4096, 4096), (1, 4096, 1000)])
def test_the_default_plans_at_training_shapes(gb, shape):
    check_linear(gb, np.random.default_rng(3), shape, np.float32, "relu", what="default plan")


def test_every_gemm_instantiation(gb):
    gemm_cases.run_every_gemm(gb)


# --------------------------------------------------------------------- TF32 tensor cores
@pytest.mark.parametrize("tile", list(cuda_launch.GEMM_TILES["tf32"]))
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "hardswish"])
def test_tf32_tiles_forward_dw_dx(gb, tile, activation):
    """matmul precision "high": every TF32 tile, element by element within the TF32 bound."""
    with matmul_precision("high"), cuda_launch.forced_gemm(tile=tile, splits=1):
        gemm_cases.check_linear_tf32(gb, np.random.default_rng(4), LARGE_VECTOR, activation, what=f"tf32 {tile}")


@pytest.mark.parametrize("shape", [(128, 784, 256), (1024, 256, 256), (256, 784, 1024), (1024, 784, 512),
                                   (8192, 256, 10), (63, 999, 131), (4096, 4096, 4096)])
def test_tf32_default_plans_at_training_shapes(gb, shape):
    with matmul_precision("high"):
        gemm_cases.check_linear_tf32(gb, np.random.default_rng(5), shape, "relu", what="tf32 default plan")


def test_tf32_is_near_cublas_tf32(gb):
    """The same product through cuBLAS in TF32 (torch.matmul with TF32 allowed, when torch imports): both
    round the operands to tf32, so they agree far better than either agrees with float32."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    rng = np.random.default_rng(6)
    x, W = rng.standard_normal((512, 1024)).astype(np.float32), rng.standard_normal((1024, 768)).astype(np.float32)
    with matmul_precision("high"):
        ours = gb.to_numpy(gb.linear_forward(gb.asarray(x), gb.asarray(W), None, "identity")[0]).astype(np.float64)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        theirs = (torch.from_numpy(x).cuda() @ torch.from_numpy(W).cuda()).cpu().numpy().astype(np.float64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    exact = x.astype(np.float64) @ W
    assert np.linalg.norm(ours - theirs) < 2 * np.linalg.norm(theirs - exact)
