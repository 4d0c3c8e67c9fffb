"""Every CUDA kernel of kernels/ executed on the CPU, against the NumPy reference.

Two parts:

* the emulation itself (kernels in tests/emulation_kernels/checks.cu): barriers,
  shared memory, warp shuffles and votes, dynamic shared memory, atomics, and
  the bugs it must catch -- a reduction with a missing ``__syncthreads()``,
  out-of-bounds reads, divergent barriers and shuffles, shared-memory overruns;
* nnfast's real CuPy backend (``nnfast/backends/cupy_backend.py``, launch
  configurations from ``cuda_launch.py``) running on the emulation, checked op
  by op against the NumPy reference, with every kernel instantiation launched.

See kernels/testing/cuda_host_emulation.h and tests/cuda_emulation.py.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuda_emulation as emu

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

CHECKS = emu.REPO_ROOT / "tests" / "emulation_kernels" / "checks.cu"
CHECK_KERNELS = [
    "block_sum<float>", "block_sum<double>", "block_sum_missing_sync<float>",
    "block_sum_missing_loop_sync<float>", "warp_sum<float>", "warp_sum<double>", "row_max_down<float>",
    "shuffle_table", "vote", "reverse_dynamic<float>", "reverse_dynamic<double>", "copy_off_by_one",
    "copy_checked", "early_return_then_sync", "reads_unwritten_shared", "dynamic_shared_overrun",
    "divergent_shuffle", "read_before_start", "partial_warp_sum", "traps", "spins", "count_barrier",
    "echo_scalars", "index_map", "writes_input", "atomics",
]


@pytest.fixture(scope="module")
def checks() -> emu.Module:
    return emu.load_module(CHECKS, CHECK_KERNELS)


def _sum_with(checks, kernel, x, grid=3, block=256, **kw):
    dtype = x.dtype
    out = emu.zeros(1, dtype)
    checks.get_function(kernel)((grid,), (block,), [out, emu.to_device(x), np.int32(x.size)], **kw)
    return out.get()[0]


# ===================================================================== the emulation itself
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", list(emu.SCHEDULES))
def test_block_reduction_is_exact_under_every_schedule(checks, dtype, schedule):
    x = np.random.default_rng(0).random(1000).astype(dtype)
    kernel = f"block_sum<{'float' if dtype == np.float32 else 'double'}>"
    got = _sum_with(checks, kernel, x, schedule=schedule, seed=7)
    np.testing.assert_allclose(got, x.sum(dtype=np.float64), rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("kernel", ["block_sum_missing_sync<float>", "block_sum_missing_loop_sync<float>"])
@pytest.mark.parametrize("schedule", ["forward", "random", "warps"])
def test_reduction_with_a_missing_syncthreads_gives_a_wrong_result(checks, kernel, schedule):
    # The same reduction as block_sum with its barriers forgotten: a thread runs alone
    # until the next barrier, so it reads partial sums that are not written yet
    # (poisoned shared memory or stale values) and the result is wrong.
    x = np.random.default_rng(0).random(1000).astype(np.float32)
    assert np.isclose(_sum_with(checks, "block_sum<float>", x, schedule=schedule, seed=3), x.sum(), rtol=1e-5)
    got = _sum_with(checks, kernel, x, schedule=schedule, seed=3)
    assert not np.isclose(got, x.sum(), rtol=1e-3), f"{kernel}: the race went unnoticed ({got} == {x.sum()})"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [32, 96, 1024])
def test_warp_shuffle_reduction(checks, dtype, block):
    x = np.random.default_rng(1).standard_normal(5000).astype(dtype)
    kernel = f"warp_sum<{'float' if dtype == np.float32 else 'double'}>"
    got = _sum_with(checks, kernel, x, grid=2, block=block)
    np.testing.assert_allclose(got, x.sum(dtype=np.float64), rtol=1e-4 if dtype == np.float32 else 1e-12)


def test_shuffle_down_row_max_with_2d_blocks(checks):
    x = np.random.default_rng(2).standard_normal((13, 70)).astype(np.float32)
    out = emu.empty(13, np.float32)
    checks.get_function("row_max_down<float>")((4,), (32, 4), [out, emu.to_device(x), np.int32(13), np.int32(70)])
    np.testing.assert_array_equal(out.get(), x.max(axis=1))


def _expected_shuffles(n: int, b: int) -> np.ndarray:
    """CUDA's documented shuffle results for v = 100 * warp + lane (the programming guide's rules)."""
    out = np.zeros((8, n), dtype=np.int64)
    for t in range(n):
        warp, lane = divmod(t, 32)
        v = lambda src: 100 * warp + src  # noqa: E731
        for row, width in ((0, 32), (1, 8)):
            out[row, t] = v((lane // width) * width + b % width)
        for row, width in ((2, 32), (3, 8)):
            out[row, t] = v(lane - b if lane % width >= b else lane)
        for row, width in ((4, 32), (5, 8)):
            out[row, t] = v(lane + b if lane % width + b < width else lane)
        for row, width in ((6, 32), (7, 8)):
            src = lane ^ b
            out[row, t] = v(src if src < (lane // width + 1) * width else lane)
    return out


@pytest.mark.parametrize("b", [0, 1, 3, 5, 9, 17, 31])
def test_shuffles_follow_the_cuda_lane_rules(checks, b):
    n = 64
    out = emu.empty(8 * n, np.int32)
    checks.get_function("shuffle_table")((1,), (n,), [out, np.int32(b)])
    np.testing.assert_array_equal(out.get().reshape(8, n), _expected_shuffles(n, b))


def test_ballot_any_all(checks):
    x = np.random.default_rng(3).standard_normal(128).astype(np.float32)
    x[64:96] = np.abs(x[64:96]) + 1  # warp 2: all positive
    x[96:128] = -np.abs(x[96:128]) - 1  # warp 3: none
    out = emu.empty(12, np.uint32)
    checks.get_function("vote")((2,), (64,), [out, emu.to_device(x)])
    got = out.get().reshape(4, 3)
    for w in range(4):
        bits = x[32 * w:32 * w + 32] > 0
        assert got[w, 0] == sum(1 << i for i in range(32) if bits[i])
        assert got[w, 1] == int(bits.any()) and got[w, 2] == int(bits.all())


def test_syncthreads_count_and_or(checks):
    x = np.array([1.0, -0.5, 2.0, -2.0] * 16, dtype=np.float32)
    out = emu.empty(3, np.int32)
    checks.get_function("count_barrier")((1,), (64,), [out, emu.to_device(x)])
    assert out.get().tolist() == [32, 0, 0]


@pytest.mark.parametrize("dtype,ctype", [(np.float32, "float"), (np.float64, "double")])
def test_dynamic_shared_memory(checks, dtype, ctype):
    n, block = 300, 128
    x = np.arange(n, dtype=dtype)
    out = emu.empty(n, dtype)
    checks.get_function(f"reverse_dynamic<{ctype}>")((3,), (block,), [out, emu.to_device(x), np.int32(n)],
                                                      shared_mem=block * x.itemsize)
    expected = np.concatenate([x[i:i + block][::-1] for i in range(0, n, block)])
    got = out.get()
    np.testing.assert_array_equal(got[:256], expected[:256])  # the full blocks


def test_two_dimensional_grid_and_block_indices(checks):
    width, height = 21, 12
    out = emu.empty(width * height, np.int32)
    checks.get_function("index_map")((3, 3), (8, 4), [out, np.int32(width)])
    got = out.get().reshape(height, width)
    for y in range(height):
        for x in range(width):
            bx, tx, by, ty = x // 8, x % 8, y // 4, y % 4
            assert got[y, x] == (by * 3 + bx) * 1000 + ty * 8 + tx


def test_scalar_arguments_are_packed_like_cupy(checks):
    out = emu.empty(6, np.float64)
    k = checks.get_function("echo_scalars")
    k((1,), (32,), [out, np.float32(1.5), np.float64(2.25), -7, np.int64(-(2**40)), np.uint32(4000000000),
                    np.bool_(True)])
    assert out.get().tolist() == [1.5, 2.25, -7.0, float(-(2**40)), 4000000000.0, 1.0]
    # A Python float is a float64 for CuPy: a float parameter would read half of it.
    with pytest.raises(emu.EmulationError, match="float32") as err:
        k((1,), (32,), [out, 1.5, 2.25, 1, 1, np.uint32(1), np.bool_(True)])
    assert err.value.kind == "arguments"
    # An int32 where the kernel takes a 64-bit integer: the kernel would read past it.
    with pytest.raises(emu.EmulationError, match="read past"):
        k((1,), (32,), [out, np.float32(1), 2.0, 1, np.int32(1), np.uint32(1), np.bool_(True)])
    with pytest.raises(emu.EmulationError, match="host numpy array"):
        k((1,), (32,), [np.zeros(6), np.float32(1), 2.0, 1, 1, np.uint32(1), np.bool_(True)])


def test_atomics(checks):
    i, u, ull = emu.zeros(5, np.int32), emu.zeros(2, np.uint32), emu.zeros(1, np.uint64)
    f, d = emu.zeros(1, np.float32), emu.zeros(1, np.float64)
    checks.get_function("atomics")((2,), (100,), [i, u, ull, f, d])
    assert i.get()[[0, 1, 2, 4]].tolist() == [200, 99, -99, 7] and 1 <= i.get()[3] <= 100
    assert u.get().tolist() == [400, 0xFFFFFFFF] and ull.get()[0] == 600
    assert f.get()[0] == 100.0 and d.get()[0] == 50.0


# --------------------------------------------------------------------- what it must catch
def test_out_of_bounds_read_faults_and_names_the_argument(checks):
    n = 64  # a multiple of 16 bytes: x[n] is the first byte of the guard page
    x = emu.to_device(np.ones(n, np.float32))
    out = emu.empty(n + 1, np.float32)
    with pytest.raises(emu.EmulationError) as err:
        checks.get_function("copy_off_by_one")((1,), (128,), [out, x, np.int32(n)])
    assert err.value.kind == "fault"
    assert "argument 1" in str(err.value) and "past the end" in str(err.value)


def test_out_of_bounds_write_into_the_slack_is_detected(checks):
    n = 62  # 248 bytes: the 8 bytes before the guard page are poisoned slack
    out = emu.empty(n, np.float32)
    with pytest.raises(emu.EmulationError, match="wrote past the end of argument 0"):
        checks.get_function("copy_off_by_one")((1,), (128,), [out, emu.to_device(np.ones(n + 1, np.float32)),
                                                                np.int32(n)])


def test_read_before_the_start_faults_with_start_placement(checks):
    x = emu.to_device(np.ones(40, np.float32), placement="start")
    with pytest.raises(emu.EmulationError, match="before the start") as err:
        checks.get_function("read_before_start")((1,), (64,), [emu.empty(40, np.float32), x, np.int32(40)])
    assert err.value.kind == "fault"


def test_correct_copy_passes_at_every_length(checks):
    k = checks.get_function("copy_checked")
    for n in (1, 3, 4, 63, 64, 65, 1000):
        x = np.arange(n, dtype=np.float32)
        out = emu.empty(n, np.float32)
        k((-(-n // 128),), (128,), [out, emu.to_device(x), np.int32(n)])
        np.testing.assert_array_equal(out.get(), x)


def test_syncthreads_after_an_early_return_is_reported(checks):
    x = emu.to_device(np.ones(128, np.float32))
    with pytest.raises(emu.EmulationError, match="reached by 100 of 128 threads") as err:
        checks.get_function("early_return_then_sync")((1,), (128,), [emu.empty(128, np.float32), x, np.int32(100)])
    assert err.value.kind == "barrier_divergence"
    # with the whole block present the same kernel is fine
    out = emu.empty(128, np.float32)
    checks.get_function("early_return_then_sync")((1,), (128,), [out, x, np.int32(128)])
    assert (out.get() == 1).all()


def test_reading_unwritten_shared_memory_sees_poison(checks):
    out = emu.empty(100, np.float32)
    checks.get_function("reads_unwritten_shared")((1,), (128,), [out, emu.to_device(np.ones(100, np.float32)),
                                                                 np.int32(100)])
    got = out.get()
    assert (got[:99] == 2).all() and np.isnan(got[99])


def test_dynamic_shared_memory_overrun_is_reported(checks):
    with pytest.raises(emu.EmulationError, match="past the 256 bytes") as err:
        checks.get_function("dynamic_shared_overrun")((1,), (64,), [emu.empty(64, np.float32)], shared_mem=256)
    assert err.value.kind == "shared_overflow"


def test_divergent_warp_shuffle_is_a_reported_deadlock(checks):
    with pytest.raises(emu.EmulationError, match="__shfl_xor_sync") as err:
        checks.get_function("divergent_shuffle")((1,), (64,), [emu.empty(64, np.float32)])
    assert err.value.kind == "deadlock"


def test_shuffle_from_a_lane_that_does_not_exist_is_poisoned(checks):
    # 20 threads: lanes 20-31 do not exist, so the full-warp tree reduction reads garbage.
    out = emu.empty(1, np.float32)
    checks.get_function("partial_warp_sum")((1,), (20,), [out, emu.to_device(np.ones(20, np.float32))])
    assert np.isnan(out.get()[0])
    checks.get_function("partial_warp_sum")((1,), (32,), [out, emu.to_device(np.ones(32, np.float32))])
    assert out.get()[0] == 32


def test_trap_and_assert_fail_the_launch(checks):
    with pytest.raises(emu.EmulationError, match=r"__trap\(\) in block \(0,0,0\) thread \(3,0,0\)"):
        checks.get_function("traps")((1,), (32,), [emu.empty(32, np.float32), np.int32(0)])
    with pytest.raises(emu.EmulationError, match=r"assert\(which != 1\)"):
        checks.get_function("traps")((1,), (32,), [emu.empty(32, np.float32), np.int32(1)])
    out = emu.empty(32, np.float32)
    checks.get_function("traps")((1,), (32,), [out, np.int32(2)])
    assert (out.get() == 1).all()


def test_spin_wait_times_out_instead_of_hanging(checks):
    with pytest.raises(emu.EmulationError) as err:
        checks.get_function("spins")((1,), (32,), [emu.zeros(1, np.int32)], timeout=0.5, schedule="forward")
    assert err.value.kind == "timeout"


def test_write_through_a_pointer_to_const_faults(checks):
    with pytest.raises(emu.EmulationError, match="mapped read-only"):
        checks.get_function("writes_input")((1,), (32,), [emu.empty(32, np.float32),
                                                         emu.to_device(np.ones(32, np.float32))])


def test_invalid_launch_configurations(checks):
    k = checks.get_function("copy_checked")
    args = [emu.empty(8, np.float32), emu.to_device(np.ones(8, np.float32)), np.int32(8)]
    with pytest.raises(emu.EmulationError, match="exceeds 1024 threads") as err:
        k((1,), (1025,), args)
    assert err.value.kind == "launch_config"
    with pytest.raises(emu.EmulationError, match="dynamic shared memory"):
        k((1,), (32,), args, shared_mem=48 * 1024 + 1)
    k.max_dynamic_shared_size_bytes = 100 * 1024
    try:
        k((1,), (32,), args, shared_mem=48 * 1024 + 1)
    finally:
        k.max_dynamic_shared_size_bytes = emu.DEFAULT_DYNAMIC_SMEM
    # block_sum is declared __launch_bounds__(256)
    assert checks.get_function("block_sum<float>").launch_bounds == 256
    with pytest.raises(emu.EmulationError, match=r"__launch_bounds__\(256\)"):
        checks.get_function("block_sum<float>")((1,), (512,), [emu.zeros(1, np.float32), args[1], np.int32(8)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_vector_access_is_caught(kernel_modules, dtype):
    # A launcher that wrongly declares a view 16-byte aligned: the vectorised kernel body
    # would raise "misaligned address" on a GPU; the alignment check traps here.
    from nnfast.backends import cuda_launch

    with emu.emulated_cupy_backend() as gpu:
        buf = gpu.xp.zeros(80, dtype)
        x, y = buf[1:65], gpu.xp.empty(65, dtype)[1:]
        launch, _ = cuda_launch.activation_launch(64, dtype, "relu", backward=False, aligned=True)
        kernel = emu.emulated_function(launch.file, launch.kernel)
        with pytest.raises(emu.EmulationError, match="misaligned") as err:
            kernel(launch.grid, launch.block, (y, x, np.int64(64), np.dtype(dtype).type(0), np.int32(1)))
        assert err.value.kind in ("trap", "fault")
        kernel(launch.grid, launch.block, (y, x, np.int64(64), np.dtype(dtype).type(0), np.int32(0)))  # scalar path


def test_portable_context_switch(checks):
    """The ucontext fallback (used off x86-64) runs the barrier and shuffle kernels the same way."""
    portable = emu.load_module(CHECKS, ["block_sum<double>", "block_sum_missing_sync<float>", "warp_sum<float>",
                                        "divergent_shuffle"], defines=["CUEMU_USE_UCONTEXT"])
    x = np.random.default_rng(19).random(3000)
    assert np.isclose(_sum_with(portable, "block_sum<double>", x), x.sum(), rtol=1e-12)
    assert np.isclose(_sum_with(portable, "warp_sum<float>", x.astype(np.float32), block=128), x.sum(), rtol=1e-4)
    assert np.isnan(_sum_with(portable, "block_sum_missing_sync<float>", x.astype(np.float32)))
    with pytest.raises(emu.EmulationError, match="deadlock"):
        portable.get_function("divergent_shuffle")((1,), (64,), [emu.empty(64, np.float32)])


def test_builds_are_cached(checks):
    assert emu.build_module(CHECKS, CHECK_KERNELS) == checks.path
    assert checks.path.exists()


# ===================================================================== nnfast's kernels
# The real CuPy backend on the emulation: launch configurations, argument packing
# and the bad-label flag are the backend's own code.
from nnfast.backends import cuda_launch  # noqa: E402
from nnfast.activations import ACTIVATIONS, saves_input  # noqa: E402

from op_table import OPS, OpInfo, assert_matches_reference  # noqa: E402
import gemm_cases  # noqa: E402

from emulation_support import REFERENCE, run_property_test  # noqa: E402
from emulation_support import assert_close as _assert_close  # noqa: E402
from emulation_support import mutant as _mutant  # noqa: E402
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
#: 132 SMs (an H100) picks the small GEMM tiles for test-sized problems; 1 SM the large ones
#: and few blocks, so grid-stride loops go round more than once.
SM_COUNTS = [pytest.param(132, id="sm132"), pytest.param(1, id="sm1")]


@pytest.fixture
def gpu(kernel_modules, request):
    sm_count = getattr(request, "param", 132)
    with emu.emulated_cupy_backend(sm_count=sm_count) as backend:
        yield backend


@pytest.mark.parametrize("gpu", SM_COUNTS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_op_table_on_the_emulated_gpu(gpu, op: OpInfo, dtype):
    """Every op of the op table, the CuPy backend on the emulation vs the NumPy reference."""
    rng = np.random.default_rng(sum(map(ord, op.name)) + 1)
    for sample in op.samples(rng, np.dtype(dtype)):
        assert_matches_reference(op, gpu, REFERENCE, sample, dtype, "emulated cupy")


# --------------------------------------------------------------------- linear
def _linear_case(backend, x, W, b, activation, dy, need_dx=True):
    xs, Ws = backend.asarray(x), backend.asarray(W)
    bs = None if b is None else backend.asarray(b)
    y, saved = backend.linear_forward(xs, Ws, bs, activation)
    dx, dW, db = backend.linear_backward(backend.asarray(dy), xs, Ws, saved, activation, has_bias=b is not None,
                                         need_dx=need_dx)
    out = [backend.to_numpy(y), backend.to_numpy(dW)]
    if saves_input(activation):
        out.append(backend.to_numpy(saved))
    if need_dx:
        out.append(backend.to_numpy(dx))
    if b is not None:
        out.append(backend.to_numpy(db))
    return out


# (batch, in, out): vectorisable dims (multiples of 4), odd dims, one row, partial tiles in
# every direction, K not a multiple of BK, more than one bias split (batch > 32).
LINEAR_CASES = [(8, 16, 12), (1, 8, 4), (70, 20, 68), (1, 5, 3), (37, 19, 45), (130, 9, 66), (66, 132, 36)]


@pytest.mark.parametrize("gpu", SM_COUNTS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_partial_tiles_and_vector_paths(gpu, dtype, activation):
    rng = np.random.default_rng(ACTIVATIONS.index(activation))
    for i, (m, k, n) in enumerate(LINEAR_CASES):
        x = rng.standard_normal((m, k)).astype(dtype)
        W = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype) if i % 3 != 1 else None
        dy = rng.standard_normal((m, n)).astype(dtype)
        expected = _linear_case(REFERENCE, x, W, b, activation, dy, need_dx=i != 2)
        got = _linear_case(gpu, x, W, b, activation, dy, need_dx=i != 2)
        for j, (g, e) in enumerate(zip(got, expected)):
            _assert_close(g, e, max(m, k, n), dtype, f"linear {activation} {(m, k, n)} output {j}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_with_misaligned_operands_takes_the_scalar_path(gpu, dtype):
    # Views one element into a buffer: 16-byte vectors would be misaligned, the launcher must
    # pick the scalar instantiation (vec = false) for shapes that would otherwise be vectorised.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 16)).astype(dtype)
    W = rng.standard_normal((16, 12)).astype(dtype)
    cp = gpu.xp
    xb = cp.empty(x.size + 1, dtype)
    xb[1:] = x.ravel()
    xs = xb[1:].reshape(8, 16)
    y, _ = gpu.linear_forward(xs, cp.asarray(W), None, "relu")
    _assert_close(gpu.to_numpy(y), np.maximum(x @ W, 0), 16, dtype, "misaligned linear")


# --------------------------------------------------------------------- activations
@pytest.mark.parametrize("gpu", SM_COUNTS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_long_and_misaligned(gpu, dtype, activation):
    rng = np.random.default_rng(11)
    cp = gpu.xp
    for n in (1, 5, 4099, 20003):
        x = (rng.standard_normal(n) * 3).astype(dtype)
        dy = rng.standard_normal(n).astype(dtype)
        y_ref = REFERENCE.activation_forward(x, activation)
        dx_ref = REFERENCE.activation_backward(dy, x if saves_input(activation) else y_ref, activation)
        for offset in (0, 1):  # 1: every operand starts one element into its buffer
            xb = cp.empty(n + offset, dtype)
            xb[offset:] = x
            xs = xb[offset:]
            y = gpu.activation_forward(xs, activation)
            saved = xs if saves_input(activation) else y
            dyb = cp.empty(n + offset, dtype)
            dyb[offset:] = dy
            dx = gpu.activation_backward(dyb[offset:], saved, activation)
            _assert_close(gpu.to_numpy(y), y_ref, 1, dtype, f"{activation} forward n={n} offset={offset}")
            _assert_close(gpu.to_numpy(dx), dx_ref, 1, dtype, f"{activation} backward n={n} offset={offset}")


# --------------------------------------------------------------------- softmax, cross-entropy
# Row lengths for every threads-per-row choice (32, 128, 256, 512 threads), odd lengths so
# rows start at every alignment, and rows longer than one block's vectors.
ROW_SHAPES = [(1, 1), (9, 33), (3, 1029), (2, 4101), (1, 16389)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_every_row_length(gpu, dtype, log):
    rng = np.random.default_rng(4)
    for rows, cols in ROW_SHAPES:
        x = (rng.standard_normal((rows, cols)) * 4).astype(dtype)
        ref = REFERENCE.log_softmax(x) if log else REFERENCE.softmax(x)
        got = gpu.to_numpy((gpu.log_softmax if log else gpu.softmax)(gpu.asarray(x)))
        _assert_close(got, ref, cols, dtype, f"{'log_' if log else ''}softmax {(rows, cols)}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_every_row_length_with_ignored_rows(gpu, dtype, reduction):
    rng = np.random.default_rng(6)
    for rows, cols in ROW_SHAPES + [(40, 7)]:
        logits = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
        labels = rng.integers(0, cols, size=rows)
        labels[::3] = -100
        for smoothing in (0.0, 0.3):
            kw = dict(label_smoothing=smoothing, reduction=reduction)
            loss_r, grad_r = REFERENCE.softmax_cross_entropy(logits, labels, **kw)
            loss, grad = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(labels), **kw)
            what = f"cross-entropy {(rows, cols)} {kw}"
            _assert_close(gpu.to_numpy(loss), loss_r, cols, dtype, what + " loss")
            _assert_close(gpu.to_numpy(grad), grad_r, cols, dtype, what + " grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [5, -1, -101, 10**9, -(2**62)])
def test_cross_entropy_bad_label_sets_the_error_flag(gpu, dtype, bad):
    # The label is never used as an index (the guard pages would catch it), ce_prepare
    # records the first bad row, the backend raises when the loss is read.
    rng = np.random.default_rng(8)
    for rows, cols in [(6, 5), (3, 1029)]:
        logits = rng.standard_normal((rows, cols)).astype(dtype)
        labels = rng.integers(0, min(cols, 5), size=rows)
        labels[0] = -100
        labels[2] = bad if bad != 5 else cols
        loss, grad = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(labels))
        with pytest.raises(ValueError, match=r"got -?\d+ at row 2"):
            gpu.to_numpy(loss)
        # the flag was consumed: a good call afterwards works
        labels[2] = 1
        loss, _ = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(labels))
        _assert_close(gpu.to_numpy(loss), REFERENCE.softmax_cross_entropy(logits, labels)[0], cols, dtype, "ce")


def test_bad_label_is_raised_by_the_next_call_or_synchronize(gpu):
    logits = gpu.asarray(np.random.default_rng(16).standard_normal((4, 3)).astype(np.float32))
    bad = gpu.asarray(np.array([0, 1, 7, 2]))
    good = gpu.asarray(np.array([0, 1, 2, 2]))
    gpu.softmax_cross_entropy(logits, bad)  # nothing read: the flag stays pending
    with pytest.raises(ValueError, match="got 7 at row 2"):
        gpu.softmax_cross_entropy(logits, good)  # the earlier call has finished: checked first
    gpu.softmax_cross_entropy(logits, bad, reduction="none")
    with pytest.raises(ValueError, match="got 7 at row 2"):
        gpu.synchronize()
    loss, _ = gpu.softmax_cross_entropy(logits, good)
    assert np.isfinite(gpu.to_numpy(loss))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_more_rows_than_the_prepare_and_reduce_blocks(gpu, dtype):
    # ce_prepare and ce_reduce are one block of 512 threads: 1100 rows loop over it twice.
    rng = np.random.default_rng(15)
    logits = rng.standard_normal((1100, 3)).astype(dtype)
    labels = rng.integers(0, 3, size=1100)
    labels[rng.random(1100) < 0.2] = -100
    for reduction in ("mean", "sum"):
        loss_r, grad_r = REFERENCE.softmax_cross_entropy(logits, labels, reduction=reduction)
        loss, grad = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(labels), reduction=reduction)
        _assert_close(gpu.to_numpy(loss), loss_r, 1100, dtype, f"ce {reduction} loss")
        _assert_close(gpu.to_numpy(grad), grad_r, 3, dtype, f"ce {reduction} grad")
    labels[1050] = 3  # a bad label in the second pass of the prepare loop
    loss, _ = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(labels))
    with pytest.raises(ValueError, match="at row 1050"):
        gpu.to_numpy(loss)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_every_row_ignored_and_custom_ignore_index(gpu, dtype):
    logits = np.random.default_rng(9).standard_normal((50, 9)).astype(dtype)
    for labels, kw in [(np.full(50, -100), {}), (np.arange(50) % 9, {"ignore_index": 4}),
                       (np.full(50, 7), {"ignore_index": 7, "reduction": "sum"})]:
        loss_r, grad_r = REFERENCE.softmax_cross_entropy(logits, labels, **kw)
        loss, grad = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(labels), **kw)
        _assert_close(gpu.to_numpy(loss), loss_r, 9, dtype, f"ce {kw}")
        _assert_close(gpu.to_numpy(grad), grad_r, 9, dtype, f"ce grad {kw}")


# --------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("gpu", SM_COUNTS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizers_many_chunks(gpu, dtype, kind):
    # 9000 elements: three chunks of 4096 in one tensor; with 1 SM a block does several chunks.
    rng = np.random.default_rng(10)
    shapes = [(9000,), (3, 7), (1,), (4096,)]
    state = {name: [rng.standard_normal(s).astype(dtype) for s in shapes] for name in "pgmv"}
    state["v"] = [np.abs(v) for v in state["v"]]
    settings = ([dict(lr=0.1), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)] if kind == "sgd"
                else [dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-3, weight_decay=0.1, decoupled=False)])
    for opts in settings:
        results = []
        for backend in (REFERENCE, gpu):
            t = {k: [backend.asarray(a.copy()) for a in v] for k, v in state.items()}
            for step in (1, 2):
                if kind == "sgd":
                    backend.sgd_update(t["p"], t["g"], t["m"] if opts.get("momentum") else [], **opts)
                else:
                    backend.adam_update(t["p"], t["g"], t["m"], t["v"], step=step, **opts)
            results.append([backend.to_numpy(a) for k in "pmv" for a in t[k]])
        for j, (g, e) in enumerate(zip(*results[::-1])):
            _assert_close(g, e, 1, dtype, f"{kind} {opts} tensor {j}")


def test_adam_second_moment_is_as_precise_as_the_reference(gpu):
    g = np.array([64.0, -30.0, 100.0, 0.5], np.float32)
    exact = (1.0 - 0.9999) * g.astype(np.float64) ** 2
    states = []
    for backend in (REFERENCE, gpu):
        p, m, v = (backend.zeros(4, np.float32) for _ in range(3))
        backend.adam_update([p], [backend.asarray(g.copy())], [m], [v], step=1, lr=0.0, beta1=0.0, beta2=0.9999)
        states.append(backend.to_numpy(v))
    ref_err, gpu_err = (float(np.abs(v / exact - 1).max()) for v in states)
    assert ref_err < 1e-6
    assert gpu_err < 1e-6, f"exp_avg_sq relative error {gpu_err:.1e} (reference {ref_err:.1e})"


def _dry_run(launch, *args):
    emu.emulated_function(launch.file, launch.kernel)(launch.grid, launch.block, args, launch.shared_mem,
                                                      dry_run=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [10**6, 9 * 10**6, 3 * 10**8])
@pytest.mark.parametrize("kind", ["gemm", "gemm_dW", "bias_act_backward", "activation", "softmax", "cross_entropy",
                                  "optimizer"])
def test_launch_configurations_are_valid_for_large_batches(kernel_modules, kind, rows, dtype):
    """Every launch the backend would make for a big batch passes the driver's checks (nothing runs).

    (GEMM row tiles once sat on grid.y, at most 65535: no forward pass above 4,194,240 rows.)
    """
    t = np.dtype(dtype).type
    null = np.uint64(0)
    n, f = np.int32(min(rows, 2**31 - 1)), np.int32(64)
    if kind == "gemm":  # y[rows, 64] = x[rows, 64] @ W[64, 64], and dx the same shape
        _dry_run(cuda_launch.gemm_launch(rows, 64, 64, dtype), null, null, null, null, null, n, f, f, t(0))
    elif kind == "gemm_dW":  # dW[64, 64] = x^T @ dz, a reduction over the rows
        _dry_run(cuda_launch.gemm_launch(64, 64, rows, dtype, trans_a=True), null, null, null, null, null, f, f, n,
                 t(0))
    elif kind == "bias_act_backward":
        plan = cuda_launch.bias_act_backward_launch(rows, 64, dtype, "relu", has_bias=True)
        _dry_run(plan.main, null, null, null, null, n, f, np.int32(plan.rows_per_split), t(0))
        if plan.reduce is not None:
            _dry_run(plan.reduce, null, null, np.int32(plan.splits), f)
    elif kind == "activation":
        launch, vec = cuda_launch.activation_launch(rows * 64, dtype, "gelu", backward=True, aligned=True)
        _dry_run(launch, null, null, null, np.int64(rows * 64), t(0), np.int32(vec))
    elif kind == "softmax":
        _dry_run(cuda_launch.softmax_launch(rows, 10, dtype, log=True), null, null, n, np.int32(10))
    elif kind == "cross_entropy":
        plan = cuda_launch.cross_entropy_launches(rows, 10, dtype, "mean")
        _dry_run(plan.prepare, null, null, null, n, np.int32(10), np.int64(-100), np.int32(0))
        _dry_run(plan.rows, null, null, null, null, null, n, np.int32(10), t(0), t(0.1), np.int64(-100))
        _dry_run(plan.reduce, null, null, null, n)
    else:
        chunks = len(cuda_launch.multi_tensor_chunks([rows * 64]))
        for which in ("sgd", "adam"):
            launch = cuda_launch.optimizer_launch(which, chunks, dtype)
            extra = (t(0),) * (3 if which == "sgd" else 5) + (np.int32(0),) + ((t(0), t(0)) if which == "adam" else ())
            _dry_run(launch, null, null, null, np.int32(chunks), np.int32(cuda_launch.OPTIM_CHUNK), *extra, null)


# --------------------------------------------------------------------- the project's property tests
# tests/test_properties.py's cross-backend properties (extreme values, NaN propagation,
# comparison with the reference) run on the CuPy backend on the emulation.
PROPERTY_CASES = (
    [("test_matches_reference", (entry.name, "normal")) for entry in OPS]
    + [("test_activation_finite_in_finite_out", (a,)) for a in ACTIVATIONS]
    + [("test_activation_propagates_nan", (a,)) for a in ACTIVATIONS]
    + [("test_softmax_rows_are_distributions", ()), ("test_cross_entropy_is_never_nan", ())]
)


@pytest.mark.parametrize("test_name,args", PROPERTY_CASES)
def test_property_suite_on_the_emulated_gpu(kernel_modules, monkeypatch, test_name, args):
    run_property_test(monkeypatch, test_name, args)


# --------------------------------------------------------------------- random shapes
@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 140), k=st.integers(1, 70), n=st.integers(1, 140), sm_count=st.sampled_from([1, 132]),
       dtype=st.sampled_from([np.float32, np.float64]), activation=st.sampled_from(ACTIVATIONS),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_random_shapes(kernel_modules, m, k, n, sm_count, dtype, activation, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(dtype)
    W = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    dy = rng.standard_normal((m, n)).astype(dtype)
    with emu.emulated_cupy_backend(sm_count=sm_count) as gpu:
        got = _linear_case(gpu, x, W, b, activation, dy)
    for j, (g, e) in enumerate(zip(got, _linear_case(REFERENCE, x, W, b, activation, dy))):
        _assert_close(g, e, max(m, k, n), dtype, f"linear {activation} {(m, k, n)} output {j}")


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 20), cols=st.one_of(st.integers(1, 70), st.integers(1000, 4200)),
       dtype=st.sampled_from([np.float32, np.float64]), smoothing=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2**16))
def test_rows_random_shapes(kernel_modules, rows, cols, dtype, smoothing, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
    labels = rng.integers(-1, cols, size=rows)
    labels[labels == -1] = -100
    with emu.emulated_cupy_backend() as gpu:
        got = [gpu.to_numpy(gpu.softmax(gpu.asarray(x))), gpu.to_numpy(gpu.log_softmax(gpu.asarray(x)))]
        got += [gpu.to_numpy(a) for a in gpu.softmax_cross_entropy(gpu.asarray(x), gpu.asarray(labels),
                                                                    label_smoothing=smoothing)]
    expected = [REFERENCE.softmax(x), REFERENCE.log_softmax(x)]
    expected += list(REFERENCE.softmax_cross_entropy(x, labels, label_smoothing=smoothing))
    for j, (g, e) in enumerate(zip(got, expected)):
        _assert_close(g, e, cols, dtype, f"rows {(rows, cols)} output {j}")


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_step_over_mixed_dtypes(gpu, kind):
    # One launch per dtype, each with its own pointer table.
    rng = np.random.default_rng(20)
    dtypes = [np.float32, np.float64, np.float32, np.float64]
    shapes = [(5000,), (3, 3), (1,), (4097,)]
    state = {k: [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)] for k in "pgmv"}
    state["v"] = [np.abs(v) for v in state["v"]]
    results = []
    for backend in (REFERENCE, gpu):
        t = {k: [backend.asarray(a.copy()) for a in v] for k, v in state.items()}
        for step in (1, 2):
            if kind == "sgd":
                backend.sgd_update(t["p"], t["g"], t["m"], lr=0.1, momentum=0.9, weight_decay=0.01)
            else:
                backend.adam_update(t["p"], t["g"], t["m"], t["v"], step=step, lr=0.01, beta2=0.99)
        results.append([backend.to_numpy(a) for a in t["p"] + t["m"]])
    for j, (g, e) in enumerate(zip(*results[::-1])):
        _assert_close(g, e, 1, e.dtype, f"{kind} mixed dtypes tensor {j}")


# --------------------------------------------------------------------- schedules, placement
@pytest.mark.parametrize("schedule", [s for s in emu.SCHEDULES if s != "forward"])
def test_barrier_kernels_under_other_schedules(kernel_modules, monkeypatch, schedule):
    # Threads between two barriers run in another order: a race that only shows when the
    # writer runs late (or early) is caught here if the forward order missed it.
    monkeypatch.setenv("NNFAST_EMU_SCHEDULE", schedule)
    rng = np.random.default_rng(12)
    with emu.emulated_cupy_backend(sm_count=1) as gpu:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((37, 19)).astype(dtype)
            W = rng.standard_normal((19, 45)).astype(dtype)
            dy = rng.standard_normal((37, 45)).astype(dtype)
            b = rng.standard_normal(45).astype(dtype)
            for g, e in zip(_linear_case(gpu, x, W, b, "gelu", dy), _linear_case(REFERENCE, x, W, b, "gelu", dy)):
                _assert_close(g, e, 45, dtype, f"linear under {schedule}")
            for rows, cols in [(2, 1029), (1, 4101)]:
                z = rng.standard_normal((rows, cols)).astype(dtype)
                labels = np.array([3, -100][:rows])
                _assert_close(gpu.to_numpy(gpu.softmax(gpu.asarray(z))), REFERENCE.softmax(z), cols, dtype,
                              f"softmax under {schedule}")
                loss, grad = gpu.softmax_cross_entropy(gpu.asarray(z), gpu.asarray(labels))
                loss_r, grad_r = REFERENCE.softmax_cross_entropy(z, labels)
                _assert_close(gpu.to_numpy(loss), loss_r, cols, dtype, f"ce under {schedule}")
                _assert_close(gpu.to_numpy(grad), grad_r, cols, dtype, f"ce grad under {schedule}")


def _schedule_sweep(gpu, rng):
    """Outputs of a set of launches that use shared memory, barriers and shuffles."""
    out = []
    for dtype in (np.float32, np.float64):
        for (m, k, n) in [(37, 20, 45), (66, 132, 36), (8, 16, 12)]:
            x, W = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
            b, dy = rng.standard_normal(n).astype(dtype), rng.standard_normal((m, n)).astype(dtype)
            out += _linear_case(gpu, x, W, b, "tanh", dy)
        for rows, cols in [(9, 33), (3, 1029), (2, 4101), (1, 16389), (600, 3)]:
            z = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
            labels = rng.integers(0, cols, size=rows)
            labels[::4] = -100
            out.append(gpu.to_numpy(gpu.log_softmax(gpu.asarray(z))))
            out += [gpu.to_numpy(a) for a in gpu.softmax_cross_entropy(gpu.asarray(z), gpu.asarray(labels),
                                                                        label_smoothing=0.1)]
    return out


def test_results_do_not_depend_on_the_thread_schedule(kernel_modules, monkeypatch):
    """nnfast's kernels use no atomics: any bit that changes with the order in which the threads of
    a block run between barriers is a data race, even when it stays within the tolerances."""
    runs = {}
    for schedule in emu.SCHEDULES:
        monkeypatch.setenv("NNFAST_EMU_SCHEDULE", schedule)
        with emu.emulated_cupy_backend(sm_count=1) as gpu:
            runs[schedule] = _schedule_sweep(gpu, np.random.default_rng(18))
    for schedule in set(emu.SCHEDULES) - {"forward"}:
        for i, (a, b) in enumerate(zip(runs["forward"], runs[schedule])):
            assert a.tobytes() == b.tobytes(), f"output {i} differs between the forward and {schedule} schedules"


@pytest.mark.parametrize("op", [op for op in OPS if op.name in ("linear_silu", "softmax_cross_entropy",
                                                                "log_softmax", "adam_update", "activation_elu")],
                         ids=lambda op: op.name)
def test_no_read_before_the_start_of_any_array(kernel_modules, monkeypatch, op):
    # The arrays touch the guard page with their first byte: a negative index faults.
    monkeypatch.setenv("NNFAST_EMU_PLACEMENT", "start")
    rng = np.random.default_rng(13)
    with emu.emulated_cupy_backend(sm_count=1) as gpu:
        for sample in op.samples(rng, np.dtype(np.float32)):
            assert_matches_reference(op, gpu, REFERENCE, sample, np.float32, "emulated cupy")


# --------------------------------------------------------------------- mutants of the real kernels
# Each mutant is a copy of kernels/ with one bug put in on purpose: a barrier removed, a bound
# off by one, a shuffle mask that leaves lanes out. The emulation must catch every one.
def _linear_forward(b, rng, shape, activation="identity"):
    m, k, n = shape
    x = rng.standard_normal((m, k)).astype(np.float32)
    W = rng.standard_normal((k, n)).astype(np.float32)
    return [b.to_numpy(b.linear_forward(b.asarray(x), b.asarray(W), None, activation)[0])]


def _linear_backward(b, rng, shape, activation="relu"):
    m, k, n = shape
    x, W = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    bias, dy = rng.standard_normal(n).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
    return _linear_case(b, x, W, bias, activation, dy)


def _softmax(b, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return [b.to_numpy(b.softmax(b.asarray(x)))]


MUTANTS = [
    # id, file, function, text, replacement, occurrence, run, shape
    ("gemm-no-barrier-after-first-tile", "gemm_staging.cuh", "wait_and_refill", "__syncthreads();", "", 0, _linear_forward,
     (37, 20, 45)),
    ("bias-grad-no-barrier", "linear.cu", "bias_act_backward", "__syncthreads();", "", 0, _linear_backward,
     (40, 8, 12)),
    ("block-reduce-no-barrier", "common.cuh", "block_max_sum", "__syncthreads();", "", 1, _softmax, (3, 1029)),
    ("row-tail-off-by-one", "rows.cuh", "row_map", "if (t < n)", "if (t <= n)", 0, _softmax, (4, 8)),
    ("warp-sum-half-mask", "common.cuh", "warp_sum", "FULL_MASK", "0x0000ffffu", 0, _softmax, (9, 33)),
]


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_bug_put_into_the_real_kernels_is_caught(tmp_path, mutant):
    name, file, function, old, new, occurrence, run, shape = mutant
    directory = _mutant(tmp_path, file, function, old, new, occurrence)
    expected = run(REFERENCE, np.random.default_rng(17), shape)
    with emu.emulated_cupy_backend(kernel_dir=directory) as gpu:
        try:
            got = run(gpu, np.random.default_rng(17), shape)
        except emu.EmulationError as err:  # a fault, a divergent collective, ...
            return print(f"{name}: {err}")
    wrong = [not np.allclose(g, e, rtol=1e-4, atol=1e-5) for g, e in zip(got, expected)]
    assert any(wrong), f"{name}: the mutant ran and matched the reference"
    bad = [np.mean(~np.isclose(g, e, rtol=1e-4, atol=1e-5)) for g, e in zip(got, expected)]
    print(f"{name}: wrong result ({max(bad):.0%} of an output's elements differ)")


# --------------------------------------------------------------------- coverage
def test_launch_bounds_are_known_and_respected_by_cuda_launch(kernel_modules):
    """Every instantiation's __launch_bounds__ is read (so launches above it fail)."""
    for file, module in kernel_modules.items():
        for name in cuda_launch.name_expressions(file):
            assert module.get_function(name).launch_bounds, f"{file}: no __launch_bounds__ read for {name}"



def test_every_kernel_instantiation_is_launched(kernel_modules):
    """A compact sweep that launches every instantiation listed by cuda_launch, checked as above."""
    emu.launched.clear()
    rng = np.random.default_rng(14)
    for sm_count in (132, 1):
        with emu.emulated_cupy_backend(sm_count=sm_count) as gpu:
            for dtype in (np.float32, np.float64):
                for activation in ACTIVATIONS:
                    for (m, k, n) in [(8, 16, 12), (5, 7, 3), (40, 8, 4)]:  # vec, scalar, split bias
                        x = rng.standard_normal((m, k)).astype(dtype)
                        W = rng.standard_normal((k, n)).astype(dtype)
                        b = rng.standard_normal(n).astype(dtype)
                        dy = rng.standard_normal((m, n)).astype(dtype)
                        for g, e in zip(_linear_case(gpu, x, W, b, activation, dy),
                                        _linear_case(REFERENCE, x, W, b, activation, dy)):
                            _assert_close(g, e, k, dtype, f"linear {activation}")
                    if activation != "identity":
                        x = rng.standard_normal(10).astype(dtype)
                        y = gpu.activation_forward(gpu.asarray(x), activation)
                        gpu.activation_backward(gpu.asarray(x), gpu.asarray(x) if saves_input(activation) else y,
                                                activation)
                for rows, cols in ROW_SHAPES:
                    z = rng.standard_normal((rows, cols)).astype(dtype)
                    gpu.to_numpy(gpu.softmax(gpu.asarray(z)))
                    gpu.to_numpy(gpu.log_softmax(gpu.asarray(z)))
                    for reduction in ("mean", "none"):
                        gpu.to_numpy(gpu.softmax_cross_entropy(gpu.asarray(z), gpu.asarray(np.zeros(rows, np.int64)),
                                                               reduction=reduction)[0])
                p = [gpu.asarray(rng.standard_normal(5).astype(dtype))]
                gpu.sgd_update(p, [gpu.asarray(rng.standard_normal(5).astype(dtype))], [], lr=0.1)
                gpu.adam_update(p, [gpu.zeros(5, dtype)], [gpu.zeros(5, dtype)], [gpu.zeros(5, dtype)], step=1,
                                lr=0.1)
                control = gpu.zeros(cuda_launch.STEP_CONTROL_SIZE, np.float64)
                gpu._step_guard(control, gpu.asarray(np.ones(5, dtype)), gpu.asarray(np.array([5, 5, 0])), 5, 0.1)
                assert gpu.to_numpy(control)[cuda_launch.STEP_CONTROL["step"]] == 1
                # The backend copies for the identity instead of launching act_*<T, 0>: launch
                # those directly, configured by cuda_launch as the backend would.
                for aligned in (True, False):
                    x = gpu.asarray(rng.standard_normal(9).astype(dtype))
                    dy = gpu.asarray(rng.standard_normal(9).astype(dtype))
                    out = gpu.xp.empty(9, dtype)
                    t = np.dtype(dtype).type
                    launch, vec = cuda_launch.activation_launch(9, dtype, "identity", backward=False, aligned=aligned)
                    emu.emulated_function(launch.file, launch.kernel)(
                        launch.grid, launch.block, (out, x, np.int64(9), t(0), np.int32(vec)), launch.shared_mem)
                    np.testing.assert_array_equal(gpu.to_numpy(out), gpu.to_numpy(x))
                    launch, vec = cuda_launch.activation_launch(9, dtype, "identity", backward=True, aligned=aligned)
                    emu.emulated_function(launch.file, launch.kernel)(
                        launch.grid, launch.block, (out, dy, x, np.int64(9), t(0), np.int32(vec)), launch.shared_mem)
                    np.testing.assert_array_equal(gpu.to_numpy(out), gpu.to_numpy(dy))
    with emu.emulated_cupy_backend() as gpu:  # every GEMM tile, vector and scalar path, split K
        gemm_cases.run_every_gemm(gpu, rng)
    missing = {f: sorted(set(cuda_launch.name_expressions(f)) - emu.launched.get(f, set()))
               for f in cuda_launch.KERNEL_FILES}
    missing = {f: names for f, names in missing.items() if names}
    assert not missing, f"instantiations never launched on the emulation: {missing}"
