"""Global-memory accesses of the hot kernels, counted on the CPU emulation.

A build of the kernels instrumented by the compiler counts every load and store that lands
in an emulated array, by width (tests/cuda_emulation.py ``count_accesses``): a ``float4`` or
``double2`` is one 16-byte access, a scalar one 4- or 8-byte access, and every thread's
access counts. The tests pin, per launch and per array, how many of each the element-wise
activations, softmax, cross-entropy and the optimizer updates make, so that a redundant
access (a value read twice, a tail loop that redoes part of the vector body) or a needlessly
scalar one (a body that could move vectors and does not) fails even though every result is
right. The GEMM is not pinned here.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emu
from emulation_support import REFERENCE, assert_caught, assert_close, mutant
from nnfast.backends import cuda_launch
from nnfast.activations import ACTIVATIONS, saves_input

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

KERNELS = emu.REPO_ROOT / "tests" / "emulation_kernels" / "accesses.cu"


def _counts(scalars: int, vectors: int, itemsize: int) -> dict[int, int]:
    return {w: n for w, n in ((itemsize, scalars), (16, vectors)) if n}


def _split(n: int, dtype, offset: int = 0) -> tuple[int, int]:
    """(scalars, vectors) of a pass over ``n`` values starting ``offset`` values past a 16-byte
    boundary: a scalar head up to the next boundary, 128-bit vectors, a scalar tail."""
    width = 16 // np.dtype(dtype).itemsize
    head = min((-offset) % width, n)
    vectors = (n - head) // width
    return n - vectors * width, vectors


def _one(log: emu.count_accesses, prefix: str) -> emu.LaunchAccesses:
    launches = log.of_kernel(prefix)
    assert len(launches) == 1, f"{len(launches)} launches of {prefix}...: {[r.kernel for r in log.launches]}"
    return launches[0]


# ===================================================================== the counters themselves
def test_vector_and_scalar_accesses_are_counted_by_width():
    module = emu.load_module(KERNELS, ["double_vectors"], count_accesses=True)
    x = np.arange(1003, dtype=np.float32)
    xs, ys = emu.to_device(x), emu.empty(1003, np.float32)
    with emu.count_accesses() as log:
        module.get_function("double_vectors")((1,), (256,), [ys, xs, np.int32(1003)])
    np.testing.assert_array_equal(ys.get(), 2 * x)
    (launch,) = log.launches
    # the stage in shared memory and the thread's locals are not global memory: not counted
    assert launch.arg(1) == emu.Accesses({16: 250, 4: 3}, {})
    assert launch.arg(0) == emu.Accesses({}, {16: 250, 4: 3})
    assert launch.of(ys).bytes_stored == ys.nbytes


def test_accesses_through_a_pointer_table_go_to_the_array_they_reach():
    module = emu.load_module(KERNELS, ["sum_through_table"], count_accesses=True)
    arrays = [emu.to_device(np.full(n, 1.0)) for n in (5, 17)]
    ptrs = emu.to_device(np.array([a.ptr for a in arrays], np.int64))
    sizes = emu.to_device(np.array([5, 17], np.int32))
    out = emu.empty(1, np.float64)
    untouched = emu.zeros(8, np.float64)
    with emu.count_accesses() as log:
        module.get_function("sum_through_table")((1,), (32,), [out, ptrs, sizes, np.int32(2), np.int32(3)])
    assert out.get()[0] == 3 * 22
    (launch,) = log.launches
    assert [launch.of(a).loads for a in arrays] == [{8: 15}, {8: 51}]
    assert launch.of(untouched) == emu.NO_ACCESSES
    assert launch.arg(1) == emu.Accesses({8: 2}, {}) and launch.arg(2) == emu.Accesses({4: 2}, {})


def test_nothing_is_counted_outside_the_context_or_without_the_instrumented_build():
    counting = emu.load_module(KERNELS, ["double_vectors"], count_accesses=True)
    plain = emu.load_module(KERNELS, ["double_vectors"])
    assert counting.counts_accesses and not plain.counts_accesses
    args = [emu.empty(8, np.float32), emu.to_device(np.ones(8, np.float32)), np.int32(8)]
    counting.get_function("double_vectors")((1,), (32,), args)  # no log: nothing recorded, no error
    with emu.count_accesses() as log:
        plain.get_function("double_vectors")((1,), (32,), args)
    assert log.launches == []


# ===================================================================== the hot kernels
@pytest.fixture
def counted_gpu():
    """The emulated CuPy backend on the instrumented builds, with the log of its launches."""
    with emu.count_accesses() as log, emu.emulated_cupy_backend() as gpu:
        yield gpu, log


def check_activation_accesses(counted):
    """Each value of x (dy and the saved tensor) read once and of y (dx) written once:
    vectors over the body when every operand is aligned, scalars for the tail; scalars
    only for a view one element into its buffer."""
    gpu, log = counted
    rng = np.random.default_rng(50)
    for dtype in (np.float32, np.float64):
        item = np.dtype(dtype).itemsize
        for n in (4099, 3):
            for offset in (0, 1):
                buf = gpu.xp.empty(n + offset, dtype)
                buf[offset:] = rng.standard_normal(n).astype(dtype)
                x = buf[offset:]
                dy = gpu.asarray(rng.standard_normal(n).astype(dtype))
                aligned = _counts(*_split(n, dtype), item)
                for activation in ACTIVATIONS:
                    if activation == "identity":
                        continue  # a copy, no kernel
                    log.launches.clear()
                    y = gpu.activation_forward(x, activation)
                    saved = x if saves_input(activation) else y
                    dx = gpu.activation_backward(dy, saved, activation)
                    what = f"{activation} {np.dtype(dtype)} n={n} offset={offset}"
                    fwd, bwd = _one(log, "act_forward<"), _one(log, "act_backward<")
                    pattern = aligned if offset == 0 else {item: n}
                    assert fwd.of(x) == emu.Accesses(pattern, {}), f"{what}: x"
                    assert fwd.of(y) == emu.Accesses({}, pattern), f"{what}: y"
                    # dy and dx are aligned: the backward pass is scalar only for a misaligned x
                    pattern = aligned if offset == 0 or not saves_input(activation) else {item: n}
                    assert bwd.of(dy) == emu.Accesses(pattern, {}), f"{what}: dy"
                    assert bwd.of(saved) == emu.Accesses(pattern, {}), f"{what}: saved"
                    assert bwd.of(dx) == emu.Accesses({}, pattern), f"{what}: dx"


def test_activation_accesses(counted_gpu):
    check_activation_accesses(counted_gpu)


ROW_SHAPES = [(9, 33), (3, 1029), (2, 4101), (1, 16389)]  # 32, 128, 256 and 512 threads per row


def _row_passes(rows, cols, dtype, passes):
    """Accesses of ``passes`` passes over every row of a fresh (aligned) rows x cols matrix."""
    item = np.dtype(dtype).itemsize
    scalars = vectors = 0
    for r in range(rows):
        s, v = _split(cols, dtype, offset=r * cols)
        scalars, vectors = scalars + passes * s, vectors + passes * v
    return _counts(scalars, vectors, item)


def check_softmax_accesses(counted):
    """Two passes over x (max and sum, then the output), one over y."""
    gpu, log = counted
    rng = np.random.default_rng(51)
    for dtype in (np.float32, np.float64):
        for rows, cols in ROW_SHAPES:
            x = gpu.asarray(rng.standard_normal((rows, cols)).astype(dtype))
            for op in (gpu.softmax, gpu.log_softmax):
                log.launches.clear()
                y = op(x)
                launch = _one(log, "softmax_rows<")
                what = f"{op.__name__} {np.dtype(dtype)} {(rows, cols)}"
                assert launch.of(x) == emu.Accesses(_row_passes(rows, cols, dtype, 2), {}), f"{what}: x"
                assert launch.of(y) == emu.Accesses({}, _row_passes(rows, cols, dtype, 1)), f"{what}: y"


def test_softmax_accesses(counted_gpu):
    check_softmax_accesses(counted_gpu)


def check_cross_entropy_accesses(counted):
    """ce_prepare reads each label once; ce_rows reads the logits of a kept row twice (plus the
    label's logit by one thread and the row's first logit, the pivot of the mean, by each),
    writes its gradient once (scalars for an ignored row) and its loss once; ce_reduce reads
    each row loss once."""
    gpu, log = counted
    rng = np.random.default_rng(52)
    for dtype in (np.float32, np.float64):
        item = np.dtype(dtype).itemsize
        for rows, cols in ROW_SHAPES + [(40, 7)]:
            logits = gpu.asarray(rng.standard_normal((rows, cols)).astype(dtype))
            labels = rng.integers(0, cols, size=rows)
            labels[1::3] = -100
            kept = labels != -100
            threads = cuda_launch.row_threads(cols)
            log.launches.clear()
            loss, grad = gpu.softmax_cross_entropy(logits, gpu.asarray(labels), label_smoothing=0.1)
            assert_close(gpu.to_numpy(loss), REFERENCE.softmax_cross_entropy(
                gpu.to_numpy(logits), labels, label_smoothing=0.1)[0], cols, dtype, "loss")
            what = f"{np.dtype(dtype)} {(rows, cols)}"
            prepare, main, reduce = _one(log, "ce_prepare"), _one(log, "ce_rows<"), _one(log, "ce_reduce<")
            assert prepare.arg(2) == emu.Accesses({8: rows}, {}), f"{what}: labels in ce_prepare"
            logit_scalars = logit_vectors = grad_scalars = grad_vectors = 0
            for r in range(rows):
                s, v = _split(cols, dtype, offset=r * cols)
                if kept[r]:
                    logit_scalars += 2 * s + 1 + threads
                    logit_vectors += 2 * v
                    grad_scalars, grad_vectors = grad_scalars + s, grad_vectors + v
                else:
                    grad_scalars += cols
            assert main.of(logits) == emu.Accesses(_counts(logit_scalars, logit_vectors, item), {}), f"{what}: logits"
            assert main.of(grad) == emu.Accesses({}, _counts(grad_scalars, grad_vectors, item)), f"{what}: grad"
            assert main.arg(1) == emu.Accesses({}, {item: rows}), f"{what}: row losses"
            assert main.arg(3) == emu.Accesses({8: rows * threads}, {}), f"{what}: labels in ce_rows"
            assert reduce.arg(1) == emu.Accesses({item: rows}, {}), f"{what}: row losses in ce_reduce"


def test_cross_entropy_accesses(counted_gpu):
    check_cross_entropy_accesses(counted_gpu)


def check_optimizer_accesses(counted):
    """Every element of every tensor read once and written once (the gradient only read),
    one launch for all tensors of a dtype; a tensor the update does not use is not touched."""
    gpu, log = counted
    rng = np.random.default_rng(53)
    shapes = [(9000,), (3, 7), (1,), (4096,)]
    for dtype in (np.float32, np.float64):
        item = np.dtype(dtype).itemsize
        t = {k: [gpu.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes] for k in "pgmv"}
        t["v"] = [gpu.asarray(np.abs(gpu.to_numpy(v))) for v in t["v"]]
        runs = [("sgd", dict(lr=0.1), "pg", "p"),
                ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), "pgm", "pm"),
                ("adam", dict(lr=0.01, weight_decay=0.1, decoupled=False), "pgmv", "pmv"),
                ("adam", dict(lr=0.01, weight_decay=0.1), "pgmv", "pmv")]
        for kind, options, read, written in runs:
            log.launches.clear()
            if kind == "sgd":
                gpu.sgd_update(t["p"], t["g"], t["m"] if "m" in read else [], **options)
            else:
                gpu.adam_update(t["p"], t["g"], t["m"], t["v"], step=1, **options)
            launch = _one(log, f"{kind}_multi<")
            for name in "pgmv":
                for a in t[name]:
                    expected = emu.Accesses({item: a.size} if name in read else {},
                                            {item: a.size} if name in written else {})
                    assert launch.of(a) == expected, f"{kind} {options} {np.dtype(dtype)}: {name} of {a.shape}"


def test_optimizer_accesses(counted_gpu):
    check_optimizer_accesses(counted_gpu)


def test_guarded_step_accesses(counted_gpu):
    """A guarded step (a recorded TrainStep): step_guard reads each loss value, the first bad row
    and the step count once and writes the control block (only its skip flag when it skips);
    with the block, an update makes the accesses it makes without it plus one read of the block
    per thread for SGD (skip) and three for Adam (skip and the two bias corrections), and an
    update the guard skipped reads the skip flag and touches nothing else."""
    gpu, log = counted_gpu
    rng = np.random.default_rng(54)
    shapes = [(9000,), (3, 7)]
    skip, step = cuda_launch.STEP_CONTROL["skip"], cuda_launch.STEP_CONTROL["step"]
    for dtype in (np.float32, np.float64):
        item = np.dtype(dtype).itemsize
        for bad_row in (5, 2):  # 5 rows: no bad label, then a bad one at row 2
            control = gpu.zeros(cuda_launch.STEP_CONTROL_SIZE, np.float64)
            loss = gpu.asarray(rng.standard_normal(5).astype(dtype))
            info = gpu.asarray(np.array([bad_row, 5, 0]))
            log.launches.clear()
            gpu._step_guard(control, loss, info, 5, 0.01, 0.9, 0.999)
            guard = _one(log, "step_guard<")
            skipped = bad_row < 5
            assert gpu.to_numpy(control)[skip] == skipped and gpu.to_numpy(control)[step] == (not skipped)
            assert guard.of(loss) == emu.Accesses({item: 5}, {})
            assert guard.of(info) == emu.Accesses({8: 1}, {})
            assert guard.of(control) == (emu.Accesses({}, {8: 1}) if skipped else emu.Accesses({8: 1}, {8: 4}))
            for kind, read, written in (("sgd", "pgm", "pm"), ("adam", "pgmv", "pmv")):
                t = {k: [gpu.asarray(rng.standard_normal(sh).astype(dtype)) for sh in shapes] for k in "pgmv"}
                t["v"] = [gpu.asarray(np.abs(gpu.to_numpy(v))) for v in t["v"]]
                log.launches.clear()
                if kind == "sgd":
                    gpu._sgd_update(t["p"], t["g"], t["m"], 0.1, 0.9, False, 0.0, control=control)
                else:
                    gpu._adam_update(t["p"], t["g"], t["m"], t["v"], 1, 0.01, 0.9, 0.999, 1e-8, 0.0, True,
                                     control=control)
                launch = _one(log, f"{kind}_multi<")
                threads = launch.grid[0] * launch.block[0]
                reads = 1 if kind == "sgd" or skipped else 3
                assert launch.of(control) == emu.Accesses({8: threads * reads}, {}), f"{kind} control"
                for name in "pgmv":
                    for a in t[name]:
                        used = not skipped
                        expected = emu.Accesses({item: a.size} if used and name in read else {},
                                                {item: a.size} if used and name in written else {})
                        assert launch.of(a) == expected, f"{kind} skipped={skipped}: {name} of {a.shape}"


# ===================================================================== the bugs these catch
# Each leaves every result right; only the accesses change.
MUTANTS = [
    # the scalar tail starts at nv instead of nv * W: it redoes three quarters of the float body
    ("act-tail-redoes-the-body", "activations.cu", "act_forward", "done = nv * W;", "done = nv;",
     check_activation_accesses),
    # a row that starts on a 16-byte boundary gets a whole vector of scalars as its head
    ("row-head-mask-dropped", "rows.cuh", "row_head", "((16ull - (addr & 15ull)) & 15ull)",
     "(16ull - (addr & 15ull))", check_softmax_accesses),
    # Adam's L2 term reads the parameter again instead of the value already loaded
    ("adam-reads-p-twice", "optim.cu", "adam_multi", "gi += weight_decay * pi;", "gi += weight_decay * p[i];",
     check_optimizer_accesses),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,file,function,old,new,check", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_wasted_access_is_caught(tmp_path, name, file, function, old, new, check):
    directory = mutant(tmp_path, file, function, old, new)
    with emu.count_accesses() as log:
        def counted_check(gpu):
            check((gpu, log))

        counted_check.__name__ = check.__name__
        assert_caught(name, counted_check, kernel_dir=directory)
