"""The pipelined GEMM of kernels/linear.cu executed on the CPU emulation, against the NumPy reference.

Every tile configuration (hence every stage count) is pinned in turn with
``cuda_launch.forced_gemm`` and run through the real CuPy backend on the
emulation: the vector path (16-byte copies and stores), the scalar path,
operands one element into their buffers, edge tiles in every dimension, K not
a multiple of the slice depth, M, N or K of 1, and split K (uneven shares, more
splits asked than there are slices) for the forward, dW and dx products. The
emulation lands a cp.async only at its wait and poisons its destination until
then, so a stage read too early shows up as NaN. Copies of the kernels with one
bug put in (a barrier removed, a wait one group short, a stage refilled before
the barrier, a bound off by one) must be caught.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import cuda_emulation as emu
import gemm_cases
from gemm_cases import check, check_linear, linear_outputs, random_case
from nnfast.backends import cuda_launch
from nnfast.activations import ACTIVATIONS

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

TILES = [pytest.param(c, name, id=f"{c}-{name}") for c in ("float", "double") for name in cuda_launch.GEMM_TILES[c]]
DTYPE = {"float": np.float32, "double": np.float64}


@pytest.fixture(scope="module")
def linear_module():
    return emu.load_module(cuda_launch.kernel_dir() / "linear.cu", cuda_launch.name_expressions("linear.cu"))


@pytest.fixture
def gpu(linear_module):
    with emu.emulated_cupy_backend() as backend:
        yield backend


def _edge_shape(c: str, tile: str, vector: bool) -> tuple[int, int, int]:
    """(batch, in, out) with partial tiles in every dimension of all three products and K % BK != 0.

    Vector shapes keep in and out multiples of the vector width; scalar ones do not.
    """
    t = cuda_launch.GEMM_TILES[c][tile]
    w = cuda_launch.vec_width(DTYPE[c])
    batch = t.bm + 3
    inner = 2 * t.bk + (w if vector else 3)
    out = t.bn + (w if vector else 5)
    return batch, inner, out


@pytest.mark.parametrize("c,tile", TILES)
@pytest.mark.parametrize("path", ["vector", "scalar", "misaligned"])
def test_every_tile_and_path_with_every_activation(gpu, c, tile, path):
    rng = np.random.default_rng(7)
    shape = _edge_shape(c, tile, vector=path != "scalar")
    with cuda_launch.forced_gemm(tile=tile, splits=1):
        for i, activation in enumerate(ACTIVATIONS):
            check_linear(gpu, rng, shape, DTYPE[c], activation, bias=i % 3 != 1, need_dx=i % 2 == 0,
                         offset=1 if path == "misaligned" else 0, what=f"{tile} {path}")


def test_the_paths_are_the_ones_asked_for():
    """The shapes above reach the vector and scalar instantiations (else the test above proves less)."""
    for c in ("float", "double"):
        for vector in (True, False):
            m, k, n = _edge_shape(c, "large", vector)
            for plan in (cuda_launch.gemm_launch(m, n, k, DTYPE[c], aligned=True),
                         cuda_launch.gemm_launch(k, n, m, DTYPE[c], trans_a=True, aligned=True),
                         cuda_launch.gemm_launch(m, k, n, DTYPE[c], trans_b=True, aligned=True)):
                assert plan.kernel.endswith(f"{str(vector).lower()}>"), plan.kernel


# (batch, in, out): one row, one column, one input, K below one slice, a long thin reduction.
DEGENERATE = [(1, 1, 1), (1, 37, 1), (1, 5, 70), (70, 1, 3), (9, 3, 1), (2, 260, 2)]


@pytest.mark.parametrize("c,tile", TILES)
def test_degenerate_shapes(gpu, c, tile):
    rng = np.random.default_rng(8)
    with cuda_launch.forced_gemm(tile=tile):
        for shape in DEGENERATE:
            for activation in ("identity", "gelu"):
                check_linear(gpu, rng, shape, DTYPE[c], activation, what=tile)


@pytest.mark.parametrize("c,tile", TILES)
@pytest.mark.parametrize("splits", [2, 3, 64])
def test_split_k_forward_dw_and_dx(gpu, c, tile, splits):
    # K of 7 slices and a bit: 3 splits share them 3 + 3 + 2, 64 are cut to one slice each.
    t = cuda_launch.GEMM_TILES[c][tile]
    k = 7 * t.bk + 3
    rng = np.random.default_rng(splits)
    with cuda_launch.forced_gemm(tile=tile, splits=splits):
        plan = cuda_launch.gemm_launch(5, 9, k, DTYPE[c])
        assert plan.splits == {2: 2, 3: 3, 64: 8}[splits] and plan.workspace_shape == (plan.splits, 5, 9)
        for shape, activation in [((5, k, 9), "gelu"), ((k, 12, 8), "silu"), ((k, 8, k), "relu"),
                                  ((6, k, 2 * t.bn + 4), "elu")]:
            check_linear(gpu, rng, shape, DTYPE[c], activation, what=f"{splits} splits")
            check_linear(gpu, rng, shape, DTYPE[c], activation, offset=1, what=f"{splits} splits")


@pytest.mark.parametrize("tile,splits", [("large", 1), ("medium", 3), ("small", 2)])
def test_results_do_not_depend_on_the_thread_schedule(linear_module, monkeypatch, tile, splits):
    """No atomics: a bit that changes with the order of the threads between barriers is a race."""
    runs = []
    for schedule in ("forward", "reverse", "random"):
        monkeypatch.setenv("NNFAST_EMU_SCHEDULE", schedule)
        x, W, b, dy = random_case(np.random.default_rng(5), (70, 53, 66), np.float32)
        with emu.emulated_cupy_backend() as gpu, cuda_launch.forced_gemm(tile=tile, splits=splits):
            runs.append(linear_outputs(gpu, x, W, b, "tanh", dy))
    for schedule, run in zip(("reverse", "random"), runs[1:]):
        for name, value in run.items():
            assert value.tobytes() == runs[0][name].tobytes(), f"{name} differs between forward and {schedule}"


# --------------------------------------------------------------------- mutants
# A copy of kernels/ with one bug put into the GEMM: each must fail (a wrong result, a NaN
# from a stage read before its copy landed, or a fault). The pipeline, the copies and the
# share of K are gemm_staging.cuh's (the TF32 GEMM's too: test_cuda_tf32_gemm_emulation.py).
STAGING = "gemm_staging.cuh"
BARRIER = "__syncthreads();              // everyone's have, and nobody reads slice t - 1 any more"
MUTANTS = [  # id, [(file of kernels/, text in it, its replacement), ...]
    ("no-barrier", [(STAGING, BARRIER, "// (barrier removed)")]),
    ("wait-one-group-short", [(STAGING, "cp_async_wait<STAGES - 2>();", "cp_async_wait<STAGES - 1>();")]),
    ("refill-before-the-barrier", [(STAGING, BARRIER, "// (barrier moved below the refill)"),
                                   (STAGING, "        }\n        cp_async_commit();\n    }",
                                    "        }\n        __syncthreads();\n        cp_async_commit();\n    }")]),
    ("copy-bound-off-by-one", [(STAGING, "< kmax;", "<= kmax;")]),
    ("split-share-off-by-one", [(STAGING, "const int count = max(0, min(slices - s0, per));",
                                 "const int count = max(0, min(slices - s0, per - 1));")]),
]


@pytest.mark.slow
@pytest.mark.parametrize("edits", [m[1] for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_a_bug_put_into_the_gemm_is_caught(tmp_path, edits):
    directory = tmp_path / "kernels"
    shutil.copytree(cuda_launch.kernel_dir(), directory, ignore=shutil.ignore_patterns("testing"))
    for file, old, new in edits:
        source = directory / file
        text = source.read_text()
        assert text.count(old) == 1, f"the mutation site moved: {old!r} is not once in kernels/{file}"
        source.write_text(text.replace(old, new))
    # 200 inputs: 13 slices of 16, 7 and 6 per split, so every stage of the ring is refilled.
    x, W, b, dy = random_case(np.random.default_rng(3), (37, 200, 45), np.float32)
    expected = linear_outputs(gemm_cases.REFERENCE, x, W, b, "relu", dy)
    with emu.emulated_cupy_backend(kernel_dir=directory) as gpu, cuda_launch.forced_gemm(tile="small", splits=2):
        try:
            got = linear_outputs(gpu, x, W, b, "relu", dy)
        except emu.EmulationError as err:  # a fault: the bug was caught
            return print(f"caught: {err}")
    with pytest.raises(AssertionError):
        check(got, expected, "mutant")
