"""The CPU emulation of the tensor-core fragment API (nvcuda::wmma, m16n16k8, tf32).

* ``__float_to_tf32`` rounds as ``cvt.rna.tf32.f32``: to 10 mantissa bits, to
  nearest with ties away from zero, the low 13 bits cleared; Inf stays Inf,
  NaN stays NaN, the largest floats round to Inf;
* ``load_matrix_sync`` / ``mma_sync`` / ``store_matrix_sync`` compute
  D = A B + C for every layout of A, B (row- and column-major fragments), C
  and D (row- and column-major memory), with leading dimensions larger than
  the tile, against NumPy on the same tf32-rounded operands;
* fragments are opaque: which lane holds which element changes from launch to
  launch, so a kernel that relies on one register layout computes garbage;
* the API's rules fail the launch: a pointer not 32-byte aligned, an ldm that
  is not a multiple of 16 bytes, lanes that disagree on the matrix or on a
  fill value, a warp that is not whole (a partial block, a lane that
  returned), shared memory past the launch's size, and multiplicands that
  were not rounded to tf32 (a GPU would silently truncate them).

The kernels are in tests/emulation_kernels/wmma.cu.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_emulation as emu
from gemm_cases import round_to_tf32 as tf32

pytestmark = pytest.mark.skipif(emu.unavailable_reason() is not None,
                                reason=f"CPU emulation of CUDA unavailable: {emu.unavailable_reason()}")

SOURCE = emu.REPO_ROOT / "tests" / "emulation_kernels" / "wmma.cu"
LAYOUTS = ("wmma::row_major", "wmma::col_major")
KERNELS = [f"mma_one<{a}, {b}>" for a in LAYOUTS for b in LAYOUTS] + [
    "to_tf32", "acc_slots", "layout_dependent_bias", "api_rules"]


@pytest.fixture(scope="module")
def module() -> emu.Module:
    return emu.load_module(SOURCE, KERNELS)


def _bits(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint32).view(np.float32)


def test_float_to_tf32_rounds_to_nearest_ties_away(module):
    specials = _bits(
        0x3F800000,  # 1.0: already tf32
        0x3F800FFF,  # just below half an ulp of tf32: down
        0x3F801000,  # exactly half above 1.0 (an even tf32 value): away from zero, up (RNE would stay)
        0x3F803000,  # a tie above an odd tf32 value: up as well
        0xBF801000,  # a negative tie: away from zero (more negative)
        0x3F7FF000,  # rounds up into the next binade (1 - 2^-12 -> 1.0)
        0x7F7FFFFF,  # the largest float: rounds to +Inf
        0xFF7FFFFF,  # and its negative to -Inf
        0x7F800000, 0xFF800000,  # Inf stays Inf
        0x00000001, 0x00001000, 0x807FFFFF,  # subnormals
        0x00000000, 0x80000000,  # zeros keep their sign
    )
    rng = np.random.default_rng(1)
    x = np.concatenate([specials, rng.standard_normal(1000).astype(np.float32) * 1e3,
                        _bits(0x7FC00000, 0xFFC00001, 0x7F800001)])  # NaNs last
    out = emu.empty(x.size)
    module.get_function("to_tf32")(((x.size + 127) // 128,), (128,), [out, emu.to_device(x), np.int32(x.size)])
    got, expected = out.get(), tf32(x)
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(got[finite].view(np.uint32), expected[finite].view(np.uint32))
    assert np.isnan(got[~finite]).all()
    assert (got.view(np.uint32)[finite] & 0x1FFF == 0).all()
    assert got[2] == np.float32(1 + 2.0 ** -10) and got[4] == -np.float32(1 + 2.0 ** -10)
    assert got[1] == 1.0 and got[5] == 1.0 and np.isposinf(got[6]) and np.isneginf(got[7])
    # against the exact value: never more than half an ulp of tf32 (2^-11 relative) away
    normal = np.isfinite(got) & (np.abs(x) > np.finfo(np.float32).tiny)
    rel = np.abs(got[normal].astype(np.float64) - x[normal]) / np.abs(x[normal].astype(np.float64))
    assert rel.max() <= 2.0 ** -11


def _mma(module, la: str, lb: str, c_col: bool, d_col: bool, convert: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal((8, 16)).astype(np.float32)
    c = rng.standard_normal((16, 16)).astype(np.float32)

    def place(m: np.ndarray, col: bool) -> tuple[emu.DeviceArray, np.int32]:
        """m stored row- or column-major with 4 NaN floats of padding after each row (column)."""
        stored = m.T if col else m
        mem = np.full((stored.shape[0], stored.shape[1] + 4), np.nan, np.float32)
        mem[:, :stored.shape[1]] = stored
        return emu.to_device(mem), np.int32(mem.shape[1])

    placed = [place(a, la.endswith("col_major")), place(b, lb.endswith("col_major")), place(c, c_col)]
    d = emu.empty((16, 24))
    module.get_function(f"mma_one<{la}, {lb}>")(
        (1,), (32,), [d, *(arr for arr, _ in placed), *(ld for _, ld in placed), np.int32(24), np.int32(c_col),
                      np.int32(d_col), np.int32(convert)])
    got = d.get()[:, :16]
    expected = (tf32(a).astype(np.float64) @ tf32(b).astype(np.float64) + c).astype(np.float32)
    return (got.T if d_col else got), expected, got


@pytest.mark.parametrize("la", LAYOUTS)
@pytest.mark.parametrize("lb", LAYOUTS)
@pytest.mark.parametrize("c_col,d_col", [(False, False), (True, False), (False, True)])
def test_mma_computes_d_equals_ab_plus_c_for_every_layout(module, la, lb, c_col, d_col):
    got, expected, _ = _mma(module, la, lb, c_col, d_col)
    # exact products, summed in double, one rounding to float: within one ulp of NumPy's sum
    np.testing.assert_array_max_ulp(got, expected, maxulp=1)


def test_the_padding_between_rows_is_neither_read_nor_written(module):
    *_, raw = _mma(module, "wmma::row_major", "wmma::row_major", False, False)
    assert not np.isnan(raw).any()  # the NaN padding of A, B and C stayed out of the product


def test_fragments_are_opaque_their_layout_changes_from_launch_to_launch(module):
    slots = []
    for _ in range(3):
        out = emu.empty((16, 16))
        module.get_function("acc_slots")((1,), (32,), [out])
        s = out.get().ravel()
        assert sorted(s.astype(int).tolist()) == list(range(256)), "every slot holds exactly one element"
        slots.append(s)
    assert not np.array_equal(slots[0], slots[1]) or not np.array_equal(slots[1], slots[2])
    assert not np.array_equal(slots[0], np.arange(256)), "lane-major row order is one layout a kernel might assume"


def test_a_kernel_that_relies_on_a_register_layout_is_wrong(module):
    bias = np.arange(16, dtype=np.float32) + 1
    out = emu.empty((16, 16))
    module.get_function("layout_dependent_bias")((1,), (32,), [out, emu.to_device(bias)])
    assert not np.array_equal(out.get(), np.broadcast_to(bias, (16, 16))), (
        "a bias added through an assumed lane layout came out right: the emulated layout is not opaque")


def test_mma_without_tf32_rounding_fails_the_launch(module):
    with pytest.raises(emu.EmulationError, match=r"not a tf32 value.*__float_to_tf32") as err:
        _mma(module, "wmma::row_major", "wmma::col_major", False, False, convert=False)
    assert err.value.kind == "trap"


def test_api_rules_hold_for_a_correct_kernel(module):
    x = np.arange(256, dtype=np.float32)
    out = emu.empty((16, 16))
    module.get_function("api_rules")((1,), (32,), [out, emu.to_device(x), np.int32(0)], shared_mem=1024)
    np.testing.assert_array_equal(out.get().ravel(), x)


@pytest.mark.parametrize("mode,threads,kind,message", [
    (1, 32, "fault", "not 256-bit .32-byte. aligned"),
    (2, 32, "trap", "ldm 18 is not a positive multiple of 16 bytes"),
    (3, 32, "warp_divergence", "lane 5 passes .* the matrix must be the same for the whole warp"),
    (4, 32, "warp_divergence", "fills with another value"),
    (5, 48, "warp_divergence", "all 32 lanes must call it, but only lanes 0x0000ffff do .* not a whole number"),
    (6, 32, "warp_divergence", "only lanes 0x7fffffff do .*have returned"),
    (7, 32, "shared_overflow", "outside the 1024 bytes given at launch"),
])
def test_api_rule_broken_fails_the_launch(module, mode, threads, kind, message):
    out = emu.empty((16, 16))
    with pytest.raises(emu.EmulationError, match=message) as err:
        module.get_function("api_rules")((1,), (threads,), [out, emu.to_device(np.zeros(256, np.float32)),
                                                            np.int32(mode)], shared_mem=1024)
    assert err.value.kind == kind
