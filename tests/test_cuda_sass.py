"""What the GPU would run: the sm_90 machine code (SASS) of the kernels, read without a GPU.

* In the main loop of every GEMM instantiation (the loop with the most FFMA /
  DFMA: K slices, inner product unrolled; for the tensor-core GEMM of
  linear_tf32.cu the loop with the most HMMA) the first global load (LDG, or
  LDGSTS for cp.async) must come before a quarter of the math: the next
  slices are then in flight while the math runs. A compiler that sinks the
  loads below the math (as it did with plain loads into registers: after 510
  of 512 FFMAs) turns the pipeline back into load-then-compute.
* The TF32 GEMMs run on the tensor cores: their main loop is HMMA.*.F32.TF32
  and nothing else (no FFMA, no double-precision or half tensor op), with the
  16 mma_sync of a 64 x 64 warp tile per 8 k (4 HMMA.1684 each on sm_90).
* The vector path really moves 16 bytes per copy and per store.
* No float32 kernel of any kernels/*.cu uses local memory (LDL / STL: spills or
  a register array indexed at run time).

The cubins come from NVRTC (``-arch=sm_90``), the listings from cuobjdump /
nvdisasm (pip wheels ``nvidia-cuda-cuobjdump``, ``nvidia-cuda-nvdisasm``), see
tests/cuda_sass.py; ``python tests/cuda_sass.py`` prints the table.
"""

from __future__ import annotations

import pytest

import cuda_sass
from cuda_sass import Instruction, gemm_names, main_loop, sass
from nnfast.backends import cuda_launch
from test_cuda_compile import CUPY_RUNTIME_OPTIONS

REASON = cuda_sass.unavailable_reason()
needs_tools = pytest.mark.skipif(REASON is not None, reason=f"cannot produce SASS here: {REASON}")

GEMMS = gemm_names() + gemm_names("linear_tf32.cu")


def _excerpt(code: list[Instruction], at: int, before: int = 3, after: int = 3) -> str:
    return "\n".join(f"    {ins}" for ins in code[max(0, at - before):at + after + 1])


def _gemm_flags(name: str) -> tuple[bool, bool, bool]:
    """(TA, TB, VEC) of a gemm<...> / gemm_tf32<...> name expression (its last four arguments are TA, TB,
    ACT, VEC)."""
    args = [a.strip() for a in name[name.index("<") + 1:name.rindex(">")].split(",")]
    return args[-4] == "true", args[-3] == "true", args[-1] == "true"


def _file(name: str) -> str:
    return "linear_tf32.cu" if name.startswith("gemm_tf32<") else "linear.cu"


def _math(name: str) -> str:
    """The one instruction a GEMM's main loop computes with."""
    return "HMMA" if name.startswith("gemm_tf32<") else "DFMA" if name.startswith("gemm<double") else "FFMA"


@needs_tools
@pytest.mark.parametrize("name", GEMMS)
def test_gemm_main_loop_issues_the_next_loads_before_the_math(name):
    code = sass(_file(name))[name]
    loop = main_loop(code, cuda_sass.math_of(name))
    fma = _math(name)
    assert loop is not None, f"{name}: no loop holding {fma} in its SASS; the K loop is gone or fully unrolled"
    body = code[loop.first:loop.last + 1]
    assert all(ins.base == fma for ins in body if cuda_sass.is_fma(ins) or cuda_sass.is_mma(ins)), (
        f"{name}: the main loop computes with the wrong precision (expected {fma} only): "
        f"{sorted({i.opcode for i in body if cuda_sass.is_fma(i) or cuda_sass.is_mma(i)})}")
    assert loop.first_load is not None, (
        f"{name}: the main loop ({loop.fmas} {fma}, {code[loop.first].address:#x}..{code[loop.last].address:#x}) "
        "issues no global load: nothing is fetched while the math runs")
    at = code.index(loop.first_load)
    assert loop.fmas_before_load <= loop.fmas / 4, (
        f"{name}: {loop.describe()}. The loads of the next K slices should be issued before the bulk of the "
        f"math so that they overlap it; here the compiler put the first one after {loop.fmas_before_load} "
        f"{fma}s (more than a quarter: {loop.fmas // 4}), so the loop waits for memory after computing. "
        f"Around the first load:\n{_excerpt(code, at)}")


@needs_tools
@pytest.mark.parametrize("name", [n for n in GEMMS if _gemm_flags(n)[2]])
def test_gemm_vector_path_moves_16_bytes(name):
    ta, tb, _ = _gemm_flags(name)
    code = sass(_file(name))[name]
    loop = main_loop(code, cuda_sass.math_of(name))
    wide_copies = [i for i in code[loop.first:loop.last + 1] if cuda_sass.is_global_load(i) and "128" in i.opcode]
    if not tb or ta or name.startswith("gemm_tf32<"):  # the tensor-core stages copy k-contiguous rows as they are
        assert wide_copies, (f"{name}: no 16-byte global load in the main loop: "
                             f"{sorted({i.opcode for i in code[loop.first:loop.last + 1] if cuda_sass.is_global_load(i)})}")
    stores = {i.opcode for i in code if i.base == "STG"}
    assert any(op.endswith(".128") for op in stores), f"{name}: the epilogue stores no 16-byte vector: {stores}"


TF32_GEMMS = gemm_names("linear_tf32.cu")


@needs_tools
@pytest.mark.parametrize("name", TF32_GEMMS)
def test_tf32_gemm_runs_on_the_tensor_cores(name):
    """HMMA with TF32 inputs and a float accumulator, 16 mma_sync (4 HMMA.1684 each) per warp tile of 64 x 64
    and 8 k; no FFMA left in the main loop (the math did not fall back to the FMA pipes)."""
    tile = next(t for t in cuda_launch.GEMM_TILES["tf32"].values() if name.startswith(f"gemm_tf32<{t.bm}, {t.bn}, "))
    code = sass("linear_tf32.cu")[name]
    mmas = [i for i in code if cuda_sass.is_mma(i)]
    assert mmas and all(i.opcode == "HMMA.1684.F32.TF32" for i in mmas), sorted({i.opcode for i in mmas})
    loop = main_loop(code, cuda_sass.is_mma)
    body = code[loop.first:loop.last + 1]
    assert not any(cuda_sass.is_fma(i) for i in body), f"{name}: FFMA in the tensor-core main loop"
    unrolled = _gemm_flags(name)[2]  # the scalar path runs the k-steps of a slice in a loop of its own
    per_step = (tile.wm // 16) * (tile.wn // 16) * 4
    assert loop.fmas == (per_step * tile.bk // 8 if unrolled else per_step), (
        f"{name}: {loop.fmas} HMMA in the main loop, expected {per_step} per 8 k")


@needs_tools
def test_tf32_tiles_get_the_resident_blocks_the_plan_counts_on():
    """The cost model's blocks per SM (TensorCoreTile.blocks) fit the registers ptxas gave each instantiation."""
    res = cuda_sass.resources("linear_tf32.cu")
    for name in TF32_GEMMS:
        tile = next(t for t in cuda_launch.GEMM_TILES["tf32"].values()
                    if name.startswith(f"gemm_tf32<{t.bm}, {t.bn}, "))
        regs = -(-res[name]["REG"] // 8) * 8  # allocated in steps of 8 a thread (256 a warp)
        assert tile.blocks * tile.threads * regs <= 65536, (
            f"{name}: {regs} registers a thread leave room for {65536 // (tile.threads * regs)} blocks of "
            f"{tile.threads} threads per SM, the plan counts on {tile.blocks}")


def _float32_kernels(file: str) -> list[str]:
    return [n for n in cuda_launch.name_expressions(file) if "double" not in n]


@needs_tools
@pytest.mark.parametrize("file", cuda_launch.KERNEL_FILES)
def test_float32_kernels_use_no_local_memory(file):
    code, res = sass(file), cuda_sass.resources(file)
    offenders = []
    for name in _float32_kernels(file):
        local = [i for i in code[name] if cuda_sass.uses_local_memory(i)]
        if local or res[name].get("LOCAL", 0) or res[name].get("STACK", 0):
            first = f": {local[0]}" if local else ""
            offenders.append(f"  {name}: {len(local)} LDL/STL, {res[name].get('LOCAL', 0)} bytes of local memory, "
                             f"{res[name].get('REG', 0)} registers{first}")
    assert not offenders, (
        f"float32 kernels of {file} use local memory (a register spill, or an array indexed at run time):\n"
        + "\n".join(offenders))


@needs_tools
@pytest.mark.parametrize("file", cuda_launch.KERNEL_FILES)
def test_every_instantiation_is_in_the_cubin(file):
    assert set(sass(file)) == set(cuda_launch.name_expressions(file))


# --------------------------------------------------------------------- the reader itself
def _listing(body: str) -> list[Instruction]:
    text = "\n\tcode for sm_90\n\t\tFunction : _Z1kv\n" + body
    parts = cuda_sass._FUNCTION.split(text)
    return [Instruction(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip())
            for m in cuda_sass._INSTRUCTION.finditer(parts[2])]


SUNK = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R2 ;
        /*0020*/                   LDS.128 R8, [R10] ;
        /*0030*/                   FFMA R2, R3, R4, R2 ;
        /*0040*/                   FFMA R5, R3, R4, R5 ;
        /*0050*/                   FFMA R6, R3, R4, R6 ;
        /*0060*/                   LDG.E.128 R12, desc[UR4][R14.64] ;
        /*0070*/                   STS.128 [R10], R12 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/               @P0 BRA 0x20 ;
        /*00a0*/                   FFMA R7, R3, R4, R7 ;
        /*00b0*/                   LDGDEPBAR ;
        /*00c0*/                   EXIT ;
"""


def test_the_reader_finds_a_sunk_load():
    loop = main_loop(_listing(SUNK))
    assert (loop.first, loop.last, loop.fmas, loop.fmas_before_load) == (2, 9, 3, 3)
    assert loop.first_load.opcode == "LDG.E.128" and loop.loads == 1
    assert "after 3 of its 3 FMAs" in loop.describe()


def test_the_reader_counts_cp_async_not_its_commit():
    hoisted = SUNK.replace("LDS.128 R8, [R10]", "LDGSTS.E.BYPASS.128 [R10], desc[UR4][R14.64]").replace(
        "LDG.E.128 R12, desc[UR4][R14.64]", "LDGDEPBAR")
    loop = main_loop(_listing(hoisted))
    assert loop.fmas_before_load == 0 and loop.first_load.base == "LDGSTS" and loop.loads == 1
    assert main_loop(_listing(SUNK.replace("@P0 BRA 0x20", "@P0 BRA 0xc0"))) is None  # no backward branch


# --------------------------------------------------------------------- the async-copy wrappers
ASYNC_COPY_PROBE = r"""
#include "async_copy.cuh"
#include "common.cuh"
extern "C" __global__ void probe(float* out, const float* x, const double* y, int n) {
    float* s = nnf::dynamic_smem<float>();
    const int t = threadIdx.x;
    nnf::cp_async<16>(s + 4 * t, x + 4 * t, 4 * t < n);
    nnf::cp_async_commit();
    nnf::cp_async<4>(s + 512 + t, x + t, t < n);
    nnf::cp_async<8>(reinterpret_cast<double*>(s + 1024) + t, y + t, t < n);
    nnf::cp_async_commit();
    nnf::cp_async_wait<1>();
    __syncthreads();
    out[t] = s[4 * t];
    nnf::cp_async_wait<0>();
    __syncthreads();
    out[t] += s[512 + t] + float(reinterpret_cast<double*>(s + 1024)[t]);
}
"""


@needs_tools
@pytest.mark.parametrize("arch,copies", [("sm_75", False), ("sm_80", True), ("sm_90", True)])
def test_async_copy_wrappers_compile_for_every_architecture(arch, copies):
    """cp.async from sm_80 on (LDGSTS of 16, 4 and 8 bytes, commit, wait); plain loads and stores before."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(ASYNC_COPY_PROBE, "probe.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [f"-arch={arch}", f"-I{cuda_launch.kernel_dir()}",
                                    *cuda_launch.COMPILE_OPTIONS, *CUPY_RUNTIME_OPTIONS])
        log, cubin = nvrtc.getProgramLog(prog), cuda_sass._complete_elf(bytes(nvrtc.getCUBIN(prog)))
    finally:
        nvrtc.destroyProgram(prog)
    assert "warning" not in log.lower(), log
    code = cuda_sass.disassemble(cubin)["probe"]
    ops = {ins.opcode for ins in code}
    if copies:
        assert {"LDGSTS.E.BYPASS.128", "LDGSTS.E", "LDGSTS.E.64", "LDGDEPBAR"} <= ops, sorted(ops)
        assert any(ins.base == "DEPBAR" for ins in code), sorted(ops)
    else:
        assert not any(ins.base in ("LDGSTS", "LDGDEPBAR") for ins in code), sorted(ops)
        assert any(op.startswith("LDG.E.128") for op in ops) and any(op.startswith("STS.128") for op in ops)
