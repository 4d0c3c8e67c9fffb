"""The tensor-core GEMM of kernels/linear_tf32.cu on the CPU emulation, through the public layer API.

Under ``nf.matmul_precision("high")`` the real CuPy backend (on the emulated
CuPy) runs every float32 GEMM of a linear layer on ``gemm_tf32``: every tile
pinned in turn, every activation, partial tiles in every dimension, K not a
multiple of the slice, degenerate shapes, the scalar path (misaligned
operands, odd sizes), split K for the forward, dW and dx products, and
``nf.Linear`` / ``nf.MLP`` forward and backward. Results are held to
gemm_cases.tf32_bound, element by element against the float64 reference:
|error| <= (2^-10 + 2^-22 + (K + 4) 2^-24) * sum_k |a_k| |b_k|, the worst case
of rounding both operands to tf32 (half an ulp of 10 mantissa bits: 2^-11)
and accumulating K products in float32; activations move it by at most 1.5
times. Against operands rounded to tf32 in NumPy (cvt.rna) the same results
are within float32 accumulation alone, so the rounding really is to nearest
(truncation, what the hardware does to unconverted values, is 2^-10 off) and
the path really is TF32 (float32 would be 2^-24 off the unrounded product).
The emulation requires the multiplicands to be tf32 values, lays the
fragments out at random and poisons unlanded copies: copies of the kernel
with a bug put in must be caught.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emu
import nnfast as nf
from emulation_support import mutant
from gemm_cases import check_linear_tf32, linear_outputs, random_case, round_to_tf32
from nnfast.activations import ACTIVATIONS
from nnfast.backends import cuda_launch

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

TILES = list(cuda_launch.GEMM_TILES["tf32"])


@pytest.fixture(scope="module")
def tf32_module():
    return emu.load_module(cuda_launch.kernel_dir() / "linear_tf32.cu", cuda_launch.name_expressions("linear_tf32.cu"))


@pytest.fixture
def gpu(tf32_module):
    with emu.emulated_cupy_backend() as backend, nf.matmul_precision("high"):
        yield backend


def _edge_shape(tile: str, vector: bool) -> tuple[int, int, int]:
    """(batch, in, out): partial tiles in every dimension of the three products, K % BK != 0."""
    t = cuda_launch.GEMM_TILES["tf32"][tile]
    return (t.bm + (4 if vector else 3), t.bk + (4 if vector else 3), t.bn + (4 if vector else 5))


@pytest.mark.parametrize("tile", TILES)
def test_every_tile_with_partial_tiles_everywhere(gpu, tile):
    # Every activation of every tile runs in test_cuda_emulation's coverage sweep (gemm_cases.run_every_gemm);
    # here the larger shapes, a few epilogues each (the large tiles cost seconds a block on the emulation).
    rng = np.random.default_rng(11)
    activations = ACTIVATIONS if tile == "small" else ("identity", "relu", "gelu", "hardswish")
    with cuda_launch.forced_gemm(tile=tile, splits=1):
        for i, activation in enumerate(activations):
            check_linear_tf32(gpu, rng, _edge_shape(tile, True), activation, bias=i % 3 != 1, need_dx=i % 2 == 0,
                              what=tile)


@pytest.mark.parametrize("path", ["odd sizes", "misaligned"])
def test_the_scalar_path(gpu, path):
    rng = np.random.default_rng(12)
    scalar = [n for n, t in cuda_launch.GEMM_TILES["tf32"].items() if t.scalar]
    for tile in scalar:
        with cuda_launch.forced_gemm(tile=tile, splits=1):
            for activation in ("relu", "gelu", "hardswish"):
                check_linear_tf32(gpu, rng, _edge_shape(tile, path == "misaligned"), activation,
                                  offset=1 if path == "misaligned" else 0, what=f"{tile} {path}")


def test_a_tile_without_the_scalar_path_is_refused_by_name(gpu):
    vector_only = next(n for n, t in cuda_launch.GEMM_TILES["tf32"].items() if not t.scalar)
    with cuda_launch.forced_gemm(tile=vector_only), pytest.raises(ValueError, match="no scalar-path instantiation"):
        cuda_launch.gemm_launch(5, 9, 7, np.float32, precision="high")


def test_the_paths_are_the_ones_asked_for():
    """The shapes above reach the tensor-core kernels, vector and scalar (else they prove less)."""
    for tile in TILES:
        m, k, n = _edge_shape(tile, True)
        with cuda_launch.forced_gemm(tile=tile):
            for kwargs in ({}, {"trans_a": True}, {"trans_b": True}):
                dims = (k, n, m) if kwargs.get("trans_a") else (m, k, n) if kwargs.get("trans_b") else (m, n, k)
                plan = cuda_launch.gemm_launch(*dims, np.float32, aligned=True, precision="high", **kwargs)
                assert plan.file == "linear_tf32.cu" and plan.kernel.endswith("true>"), plan
                assert plan.shared_mem > cuda_launch.DEFAULT_SHARED_MEM or tile == "small", plan
    plan = cuda_launch.gemm_launch(13, 9, 19, np.float32, precision="high")
    assert plan.kernel.startswith("gemm_tf32<") and plan.kernel.endswith("false>")
    assert cuda_launch.gemm_launch(64, 64, 64, np.float64, aligned=True, precision="high").file == "linear.cu"


DEGENERATE = [(1, 1, 1), (1, 37, 1), (1, 5, 70), (70, 1, 3), (9, 3, 1), (2, 260, 2)]


@pytest.mark.parametrize("tile", ["small"])
def test_degenerate_shapes(gpu, tile):
    rng = np.random.default_rng(13)
    with cuda_launch.forced_gemm(tile=tile):
        for shape in DEGENERATE:
            check_linear_tf32(gpu, rng, shape, "silu", what=tile)


@pytest.mark.parametrize("tile,splits", [("small", 2), ("small", 64), ("medium", 3)])
def test_split_k_forward_dw_and_dx(gpu, tile, splits):
    t = cuda_launch.GEMM_TILES["tf32"][tile]
    k = 5 * t.bk + 4  # 6 slices: 3 splits take 2 each, 64 are cut to one slice each
    rng = np.random.default_rng(splits)
    with cuda_launch.forced_gemm(tile=tile, splits=splits):
        plan = cuda_launch.gemm_launch(8, 12, k, np.float32, aligned=True, precision="high")
        assert plan.splits == {2: 2, 3: 3, 64: 6}[splits] and plan.reduce.file == "linear.cu"
        for shape, activation in [((8, k, 12), "gelu"), ((k, 12, 8), "elu"), ((8, 12, k), "relu")]:
            check_linear_tf32(gpu, rng, shape, activation, what=f"{splits} splits")


def test_the_results_are_tf32_rounded_to_nearest_and_summed_in_float32(gpu):
    """Against operands rounded in NumPy (cvt.rna), within float32 accumulation; against the unrounded ones,
    off by the TF32 amount (so neither float32 nor truncation ran)."""
    rng = np.random.default_rng(14)
    x, W, b, _ = random_case(rng, (65, 300, 70), np.float32)
    y, _ = gpu.linear_forward(gpu.asarray(x), gpu.asarray(W), gpu.asarray(b), "identity")
    got = gpu.to_numpy(y).astype(np.float64)
    rounded = round_to_tf32(x).astype(np.float64) @ round_to_tf32(W).astype(np.float64) + b
    magnitude = np.abs(round_to_tf32(x)).astype(np.float64) @ np.abs(round_to_tf32(W)) + np.abs(b)
    assert (np.abs(got - rounded) <= 304 * 2.0 ** -24 * magnitude).all()
    exact = x.astype(np.float64) @ W + b
    relative = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 1e-4 < relative < 1e-3, f"relative error {relative:.2e}: not the TF32 path"


def test_float64_and_highest_are_untouched(tf32_module):
    rng = np.random.default_rng(15)
    with emu.emulated_cupy_backend() as gpu:
        for dtype in (np.float32, np.float64):
            x, W, b, dy = random_case(rng, (40, 36, 20), dtype)
            runs = []
            for precision in ("highest", "high"):
                with nf.matmul_precision(precision):
                    runs.append(linear_outputs(gpu, x, W, b, "tanh", dy))
            same = all(runs[0][k].tobytes() == runs[1][k].tobytes() for k in runs[0])
            assert same == (dtype == np.float64), f"{np.dtype(dtype).name}: 'high' changed the result: {not same}"


def test_a_device_without_tf32_runs_float32_under_high(tf32_module, monkeypatch):
    """Before compute capability 8.0 "high" allows what the device lacks: the float32 kernels run (PyTorch's
    meaning), bit for bit as under "highest"."""
    monkeypatch.setattr(emu._Device, "compute_capability", "75")
    x, W, b, dy = random_case(np.random.default_rng(17), (40, 36, 20), np.float32)
    with emu.emulated_cupy_backend() as gpu:
        emu.launched.clear()
        with nf.matmul_precision("high"):
            high = linear_outputs(gpu, x, W, b, "relu", dy)
        highest = linear_outputs(gpu, x, W, b, "relu", dy)
    assert "linear_tf32.cu" not in emu.launched
    assert all(high[k].tobytes() == highest[k].tobytes() for k in high)


def test_layer_api_linear_and_mlp_train_under_high(tf32_module):
    """nf.Linear with a fused activation and nf.MLP, forward and backward, through the public API."""
    rng = np.random.default_rng(16)
    x = rng.standard_normal((48, 36)).astype(np.float32)
    with emu.emulated_cupy_backend() as gpu, nf.use_backend(gpu):
        outputs = {}
        for precision in ("highest", "high"):
            with nf.matmul_precision(precision):
                layer = nf.Linear(36, 40, activation="gelu", seed=3)
                y = layer.forward(gpu.asarray(x))
                dx = layer.backward(gpu.asarray(np.ones((48, 40), np.float32)))
                outputs[precision] = [gpu.to_numpy(a) for a in (y, dx, layer.W.grad, layer.b.grad)]
        for name, hi, hs in zip(("y", "dx", "dW", "db"), outputs["high"], outputs["highest"]):
            rel = np.linalg.norm(hi - hs) / np.linalg.norm(hs)
            assert 1e-6 < rel < 3e-3, f"{name}: relative difference {rel:.2e} between 'high' and 'highest'"
        emu.launched.clear()
        with nf.matmul_precision("high"):
            model = nf.MLP([36, 64, 10], activation="relu", seed=0)
            loss_fn, opt = nf.SoftmaxCrossEntropy(), nf.SGD(model.parameters(), lr=0.1)
            labels = gpu.asarray(rng.integers(0, 10, 48))
            losses = []
            for _ in range(5):
                loss, dlogits = loss_fn(model.forward(gpu.asarray(x)), labels)
                model.backward(dlogits)
                opt.step()
                opt.zero_grad()
                losses.append(float(gpu.to_numpy(loss)))
        assert losses[-1] < losses[0], losses
        assert any(k.startswith("gemm_tf32<") for k in emu.launched.get("linear_tf32.cu", ())), "no TF32 GEMM ran"


@pytest.mark.parametrize("tile,splits", [("large", 1), ("small", 2)])
def test_results_do_not_depend_on_the_thread_schedule(tf32_module, monkeypatch, tile, splits):
    runs = []
    for schedule in ("forward", "reverse", "warps-reverse"):
        monkeypatch.setenv("NNFAST_EMU_SCHEDULE", schedule)
        x, W, b, dy = random_case(np.random.default_rng(5), (70, 68, 64), np.float32)
        with emu.emulated_cupy_backend() as gpu, nf.matmul_precision("high"), \
                cuda_launch.forced_gemm(tile=tile, splits=splits):
            runs.append(linear_outputs(gpu, x, W, b, "tanh", dy))
    for run in runs[1:]:
        for name, value in run.items():
            assert value.tobytes() == runs[0][name].tobytes(), f"{name} changes with the thread schedule"


# --------------------------------------------------------------------- mutants
MUTANTS = [  # id, file, function, text, replacement, thread schedule
    ("operands-not-rounded-to-tf32", "linear_tf32.cu", "gemm_tf32", "ring.wait_and_refill(t, RoundToTf32());",
     "ring.wait_and_refill(t);", "forward"),
    # In step, every warp is done with the stages when the first one stores its C tile over them: only a warp
    # that runs ahead of the others to the next barrier (as a GPU may run it) overwrites what they still read.
    ("no-barrier-before-the-c-tile", "linear_tf32.cu", "gemm_tf32", "    __syncthreads();\n    float* Cs",
     "    float* Cs", "warps"),
    ("c-tile-read-before-every-warp-stored", "linear_tf32.cu", "gemm_tf32",
     "wmma::mem_row_major);\n    __syncthreads();", "wmma::mem_row_major);", "forward"),
    ("b-fragment-one-k-step-off", "linear_tf32.cu", "gemm_tf32", "CopyB::offset(wn + 16 * j, k)",
     "CopyB::offset(wn + 16 * j, k ^ 8)", "forward"),
    ("wait-one-group-short", "gemm_staging.cuh", "wait_and_refill", "cp_async_wait<STAGES - 2>();",
     "cp_async_wait<STAGES - 1>();", "forward"),
    ("copy-bound-off-by-one", "gemm_staging.cuh", "copy", "< kmax;", "<= kmax;", "forward"),
]


@pytest.mark.slow
@pytest.mark.parametrize("file,function,old,new,schedule", [m[1:] for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_a_bug_put_into_the_tf32_gemm_is_caught(tmp_path, monkeypatch, file, function, old, new, schedule):
    directory = mutant(tmp_path, file, function, old, new)
    monkeypatch.setenv("NNFAST_EMU_SCHEDULE", schedule)
    with emu.emulated_cupy_backend(kernel_dir=directory) as gpu, nf.matmul_precision("high"), \
            cuda_launch.forced_gemm(tile="small", splits=1):
        try:
            check_linear_tf32(gpu, np.random.default_rng(3), (37, 100, 45), "relu", what="mutant")
        except (AssertionError, emu.EmulationError) as err:
            return print(f"caught: {str(err).splitlines()[0][:300]}")
    pytest.fail("the mutant passed")
