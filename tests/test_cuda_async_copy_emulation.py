"""The CPU emulation of asynchronous copies (cp.async), through kernels/async_copy.cuh.

A copy lands in shared memory when the issuing thread waits for its group, and
its destination holds poison (NaN) until then: kernels that read a stage too
early (before the wait, without the barrier after it, relying on a barrier
alone, waiting for one group too few) must read NaN, correct ones the data.
Copies outside shared memory, from outside an array or misaligned fail the
launch. The kernels are in tests/emulation_kernels/async_copy.cu.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emu

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

SOURCE = emu.REPO_ROOT / "tests" / "emulation_kernels" / "async_copy.cu"
KERNELS = ["async_stage", "async_ring<2>", "async_ring<3>", "async_ring<4>", "async_groups", "async_zero_fill",
           "async_bad_copy", "pipeline_primitives", "async_pending_at_exit"]


@pytest.fixture(scope="module")
def module() -> emu.Module:
    return emu.load_module(SOURCE, KERNELS)


def _stage(module, mode: int, own: bool, schedule: str = "forward") -> tuple[np.ndarray, np.ndarray]:
    threads = 64
    x = np.arange(4 * threads, dtype=np.float32) + 1
    out = emu.empty(4 * threads, np.float32)
    module.get_function("async_stage")((1,), (threads,), [out, emu.to_device(x), np.int32(mode), np.int32(own)],
                                       shared_mem=4 * threads * 4, schedule=schedule)
    expected = x if own else np.roll(x.reshape(threads, 4), -1, axis=0).ravel()
    return out.get(), expected


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
@pytest.mark.parametrize("own", [True, False], ids=["own", "neighbour"])
def test_a_copy_read_after_its_wait_and_a_barrier_is_the_data(module, schedule, own):
    got, expected = _stage(module, 0, own, schedule)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode,own,what", [
    (1, True, "read before the wait"),
    (2, False, "another thread's copy read without a barrier"),
    (3, True, "a barrier but no wait"),
    (4, True, "a copy never committed to a group"),
])
def test_a_copy_read_too_early_is_poison(module, mode, own, what):
    got, expected = _stage(module, mode, own)
    if mode == 2:  # the last thread reads thread 0's copy, which ran (and waited) first
        got = got[:-4]
    assert np.isnan(got).all(), f"{what}: the copy was visible before it may be ({got[:8]})"
    assert not np.isnan(expected).any()


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_a_pipelined_ring_waiting_for_the_right_group_is_exact(module, stages):
    threads, slices = 128, 7
    x = np.random.default_rng(stages).standard_normal((slices, threads)).astype(np.float32)
    out = emu.empty(slices, np.float32)
    module.get_function(f"async_ring<{stages}>")((1,), (threads,), [out, emu.to_device(x), np.int32(slices),
                                                                    np.int32(stages - 2)],
                                                 shared_mem=stages * threads * 4)
    np.testing.assert_allclose(out.get(), x.sum(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_a_pipelined_ring_waiting_for_one_group_too_few_reads_poison(module, stages):
    threads, slices = 128, 7
    x = np.ones((slices, threads), np.float32)
    out = emu.empty(slices, np.float32)
    module.get_function(f"async_ring<{stages}>")((1,), (threads,), [out, emu.to_device(x), np.int32(slices),
                                                                    np.int32(stages - 1)],
                                                 shared_mem=stages * threads * 4)
    assert np.isnan(out.get()).all(), out.get()


@pytest.mark.parametrize("kernel,grid,threads,odd", [
    # two groups, wait until one is in flight: the older copy landed, the newer reads as poison
    ("async_groups", 2, 32, np.nan),
    # odd threads return with their copy in flight (legal: nobody waits for it), writing nothing
    ("async_pending_at_exit", 2, 64, 0.0),
], ids=["wait-group-lands-only-older-groups", "copies-in-flight-at-exit-are-no-error"])
def test_what_lands_and_what_does_not(module, kernel, grid, threads, odd):
    x = np.arange(64, dtype=np.float32)
    out = emu.zeros(64, np.float32)
    module.get_function(kernel)((grid,), (threads,), [out, emu.to_device(x)], shared_mem=64 * 4)
    got = out.get()
    np.testing.assert_array_equal(got[0::2], x[0::2])
    np.testing.assert_array_equal(got[1::2], np.full(32, odd, np.float32))


def test_zero_fill_reads_nothing(module):
    n = 40  # threads 40..63 zero-fill from addresses past the end of x
    x = np.arange(n, dtype=np.float64) + 1
    out = emu.empty(64, np.float64)
    module.get_function("async_zero_fill")((1,), (64,), [out, emu.to_device(x), np.int32(n)], shared_mem=64 * 8)
    np.testing.assert_array_equal(out.get(), np.concatenate([x, np.zeros(64 - n)]))


@pytest.mark.parametrize("which,kind,message", [
    (0, "shared_overflow", r"cp.async writes dynamic shared memory bytes \[512, 528\), outside the 512 bytes"),
    (1, "fault", r"argument 1.*past the end"),
    (2, "fault", r"misaligned address: 16-byte cp.async"),
])
def test_bad_copies_fail_the_launch(module, which, kind, message):
    x = emu.to_device(np.ones(128, np.float32))
    with pytest.raises(emu.EmulationError, match=message) as err:
        module.get_function("async_bad_copy")((1,), (32,), [emu.empty(128, np.float32), x, np.int32(which)],
                                              shared_mem=512)
    assert err.value.kind == kind
    assert "thread (" in str(err.value) and ("async_copy.cu:" in str(err.value) or which == 1)


def test_pipeline_primitives_api(module):
    x = np.arange(128, dtype=np.float32) + 1
    out = emu.empty(128, np.float32)
    module.get_function("pipeline_primitives")((1,), (64,), [out, emu.to_device(x)], shared_mem=128 * 4)
    expected = x.copy()
    expected[3::4] = 0  # odd threads: 4 of 8 bytes copied, the rest zero-filled
    np.testing.assert_array_equal(out.get(), expected)
