"""The thread schedules of the CPU emulation, and nnfast's kernels under the warp schedules.

The emulation runs a thread alone up to its next barrier or warp collective. The "in step"
schedules (forward, reverse, random thread order) sweep the block one slice at a time, so no
warp gets more than one collective ahead of another; the warp schedules ("warps",
"warps-reverse") run each warp alone up to its next barrier, as a GPU may when one warp is
scheduled ahead. A barrier missing between warps that first go through shuffles (the reader
before it reads, or the overwriter before it overwrites) is seen only by the latter.

Kernels of tests/emulation_kernels/schedules.cu check the schedules themselves; the
reductions of nnfast's kernels that exchange shared memory between warps run under every
schedule; the ``slow`` tests put a barrier weakened to ``__syncwarp()`` into copies of them.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emu
from emulation_support import REFERENCE, assert_caught, assert_close, mutant, schedule

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

KERNELS = emu.REPO_ROOT / "tests" / "emulation_kernels" / "schedules.cu"
IN_STEP = ["forward", "reverse", "random"]
WARP_SCHEDULES = ["warps", "warps-reverse"]


@pytest.fixture(scope="module")
def kernels() -> emu.Module:
    return emu.load_module(KERNELS, ["ticket_order", "publish_after_shuffles", "two_reductions_one_scratch"])


# ===================================================================== the schedules themselves
@pytest.mark.parametrize("threads", [96, 80])  # three warps; the last one partial
@pytest.mark.parametrize("name", list(emu.SCHEDULES))
def test_schedule_runs_the_threads_in_its_order(kernels, name, threads):
    order = emu.empty(2 * threads, np.int32)
    kernels.get_function("ticket_order")((1,), (threads,), [order, emu.zeros(1, np.int32)], schedule=name, seed=5)
    first, second = order.get().reshape(threads, 2).T
    assert sorted(np.concatenate([first, second])) == list(range(2 * threads))
    t = np.arange(threads)
    if name in IN_STEP:  # every thread passes the first point before any passes the second
        assert (second >= threads).all()
        expected = {"forward": t, "reverse": threads - 1 - t}.get(name)
        if expected is not None:
            np.testing.assert_array_equal(first, expected)
        else:
            assert not np.array_equal(first, t) and sorted(first) == list(t)
        return
    # one warp after the other, each through both points before the next starts
    warps = [np.arange(w, min(w + 32, threads)) for w in range(0, threads, 32)]
    start = 0
    for lanes in (warps if name == "warps" else warps[::-1]):
        np.testing.assert_array_equal(first[lanes], start + np.arange(lanes.size))
        assert sorted(second[lanes]) == list(range(start + lanes.size, start + 2 * lanes.size))
        start += 2 * lanes.size


@pytest.mark.parametrize("name", list(emu.SCHEDULES))
def test_a_reader_that_shuffles_first_sees_a_missing_barrier_only_when_its_warp_runs_ahead(kernels, name):
    publish = kernels.get_function("publish_after_shuffles")
    out = emu.empty(1, np.float32)
    publish((1,), (64,), [out, np.float32(5.0), np.int32(1)], schedule=name)
    assert out.get()[0] == 37.0
    publish((1,), (64,), [out, np.float32(5.0), np.int32(0)], schedule=name)
    if name == "warps":  # warp 0 reduces and reads before warp 1 has run at all: poison
        assert np.isnan(out.get()[0])
    else:  # warp 1's write lands in the first sweep, long before warp 0's shuffles finish
        assert out.get()[0] == 37.0


@pytest.mark.parametrize("threads", [64, 256])
@pytest.mark.parametrize("name", list(emu.SCHEDULES))
def test_an_overwriter_that_shuffles_first_is_seen_only_when_its_warp_runs_ahead(kernels, name, threads):
    x = np.random.default_rng(40).standard_normal(threads).astype(np.float32)
    kernel = kernels.get_function("two_reductions_one_scratch")
    expected = np.float32(x.sum(dtype=np.float64) + x.max())
    for sync in (1, 0):
        out = emu.empty(threads, np.float32)
        kernel((1,), (threads,), [out, emu.to_device(x), np.int32(sync)], schedule=name, seed=3)
        right = np.allclose(out.get(), expected, rtol=1e-5)
        # Without the barrier, a warp run ahead overwrites the sums with its maximum.
        assert right == (sync == 1 or name in IN_STEP), f"sync={sync} under {name}: {out.get()[:4]}"


# ===================================================================== nnfast's kernels
def _shared_memory_reductions(gpu, long_rows=True):
    """Outputs of the launches whose warps exchange shared memory after shuffles: the label
    scan and loss sum of the cross-entropy (one block of 16 warps), and (``long_rows``) the
    block-wide max/sum of the row kernels for rows of more than 1024 values."""
    rng = np.random.default_rng(41)
    out = []
    logits = rng.standard_normal((700, 3)).astype(np.float32)  # two passes of ce_prepare's loop
    labels = rng.integers(0, 3, size=700)
    labels[rng.random(700) < 0.2] = -100
    for reduction in ("mean", "sum"):
        got = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(labels), reduction=reduction)
        expected = REFERENCE.softmax_cross_entropy(logits, labels, reduction=reduction)
        for g, e in zip(got, expected):
            assert_close(gpu.to_numpy(g), e, 700, np.float32, f"cross-entropy {reduction}")
            out.append(gpu.to_numpy(g))
    bad = labels.copy()
    bad[[600, 650, 530, 40]] = [7, -3, 9, 11]
    loss, _ = gpu.softmax_cross_entropy(gpu.asarray(logits), gpu.asarray(bad))
    with pytest.raises(ValueError, match="got 11 at row 40$"):
        gpu.to_numpy(loss)
    for rows, cols in [(2, 1029), (2, 4101)] if long_rows else []:
        z = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
        zl = np.array([1, 2])
        out.append(gpu.to_numpy(gpu.softmax(gpu.asarray(z))))
        assert_close(out[-1], REFERENCE.softmax(z), cols, np.float32, f"softmax {(rows, cols)}")
        got = gpu.softmax_cross_entropy(gpu.asarray(z), gpu.asarray(zl), label_smoothing=0.1)
        expected = REFERENCE.softmax_cross_entropy(z, zl, label_smoothing=0.1)
        for g, e in zip(got, expected):
            assert_close(gpu.to_numpy(g), e, cols, np.float32, f"cross-entropy {(rows, cols)}")
            out.append(gpu.to_numpy(g))
    return out


def check_cross_entropy_under_warp_schedules(gpu):
    for name in WARP_SCHEDULES:
        with schedule(name):
            _shared_memory_reductions(gpu, long_rows=False)


def test_shared_memory_reductions_under_the_warp_schedules(kernel_modules):
    """Right under the warp schedules, and bit for bit the same as in step (the kernels use no
    atomics). (tests/test_cuda_emulation.py runs a wider sweep under every schedule.)"""
    runs = {}
    with emu.emulated_cupy_backend() as gpu:
        for name in ["forward"] + WARP_SCHEDULES:
            with schedule(name):
                runs[name] = _shared_memory_reductions(gpu)
    for name, outputs in runs.items():
        for i, (a, b) in enumerate(zip(runs["forward"], outputs)):
            assert a.tobytes() == b.tobytes(), f"output {i} differs between the forward and {name} schedules"


# ===================================================================== the bugs these catch
# A __syncthreads() weakened to __syncwarp(): each warp publishes its partial result, but
# thread 0 may read the other warps' before they are written. The in-step schedules run all
# warps' writes in one sweep before thread 0 reads, so only a warp schedule sees it.
MUTANTS = [
    ("ce-prepare-warp-barrier", "cross_entropy.cu", "ce_prepare", "__syncthreads();", "__syncwarp();"),
    ("ce-reduce-warp-barrier", "cross_entropy.cu", "ce_reduce", "__syncthreads();", "__syncwarp();"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,file,function,old,new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_race_between_warps_is_caught(tmp_path, name, file, function, old, new):
    directory = mutant(tmp_path, file, function, old, new)
    assert_caught(name, check_cross_entropy_under_warp_schedules, kernel_dir=directory)
