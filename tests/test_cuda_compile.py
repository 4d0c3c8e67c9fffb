"""Every CUDA kernel compiles, without a GPU: NVRTC for each architecture, ptxas for spills.

* NVRTC (``cupy_backends.cuda.libs.nvrtc``, library from the
  ``nvidia-cuda-nvrtc-cu12`` wheel; no driver or GPU needed) compiles every
  template instantiation listed by
  :func:`nnfast.backends.cuda_launch.name_expressions` to PTX for
  ``compute_80`` and to machine code for ``sm_90`` (the cubin that
  tests/test_cuda_sass.py then disassembles); any error or warning fails the
  test with the NVRTC log. A missing CuPy or NVRTC fails these tests too (the
  ``test`` extra installs both): nothing here needs a GPU, so nothing here may
  skip for want of one.
* ``nvcc -arch=sm_90 -cubin -Xptxas -v`` (skipped when nvcc is absent)
  compiles each file with every instantiation and reports registers and
  spills per kernel; a spill in a float32 instantiation of a hot kernel fails.

Run as a script to print the register / spill table::

    python tests/test_cuda_compile.py
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nnfast import activations
from nnfast.backends import cuda_compile, cuda_launch

#: compute_80: PTX, the oldest architecture with cp.async; sm_90: a cubin (PTX and ptxas), shared
#: with the SASS checks through compile_file's cache.
ARCHS = ("compute_80", "sm_90")

#: What the CuPy backend adds to each file's options when it compiles at run time
#: (nnfast.backends.cuda_compile.CUPY_OPTIONS, as CuPy's RawModule did): the tests build what runs.
CUPY_RUNTIME_OPTIONS = cuda_compile.CUPY_OPTIONS

#: Kernel families whose float32 instantiations must not spill.
HOT_KERNELS = ("gemm", "act_forward", "act_backward", "bias_act_backward", "softmax_rows", "ce_rows",
               "sgd_multi", "adam_multi")


def _nvrtc():
    """The NVRTC bindings, or None (with the reason) when the library is absent."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as err:  # CuPy not installed
        return None, f"cupy (cupy-cuda12x) is not installed: {err}"
    try:
        nvrtc.getVersion()
    except Exception as err:
        return None, f"the NVRTC library is not installed (pip install nvidia-cuda-nvrtc-cu12): {err}"
    return nvrtc, None


def _require_nvrtc():
    """NVRTC needs no GPU: the test extra installs it, so its absence fails rather than skips."""
    nvrtc, reason = _nvrtc()
    if nvrtc is None:
        pytest.fail(f"{reason}; the test extra installs both: pip install -e '.[test]' "
                    "(CuPy >= 14 finds the pip-installed NVRTC)")
    return nvrtc


def test_missing_nvrtc_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_nvrtc", lambda: (None, "no NVRTC library here"))
    with pytest.raises(pytest.fail.Exception, match="no NVRTC library here"):
        _require_nvrtc()


def test_test_extra_installs_a_cupy_that_finds_pip_nvrtc():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    test_extra = re.search(r"^test = \[(.*?)^\]", text, flags=re.S | re.M).group(1)
    major = re.search(r'"cupy-cuda12x>=(\d+)', test_extra)
    assert major and int(major.group(1)) >= 14, test_extra
    assert '"nvidia-cuda-nvrtc-cu12' in test_extra


@functools.lru_cache(maxsize=None)
def compile_file(file: str, arch: str) -> tuple[bool, str, bytes, dict[str, str]]:
    """Compile every instantiation of ``file`` for ``arch``.

    Returns ``(ok, log, image, lowered)``: ``image`` is the PTX for a virtual
    architecture (``compute_90``), the cubin for a real one (``sm_90``);
    ``lowered`` maps each mangled name to its name expression.
    """
    nvrtc, reason = _nvrtc()
    assert nvrtc is not None, reason
    names = cuda_launch.name_expressions(file)
    prog = nvrtc.createProgram(cuda_launch.load_source(file), file, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *cuda_compile.options(file)])
            ok = True
        except nvrtc.NVRTCError:
            ok = False
        log = nvrtc.getProgramLog(prog)
        if not ok:
            return False, log, b"", {}
        image = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        if isinstance(image, str):
            image = image.encode()
        lowered = {nvrtc.getLoweredName(prog, name): name for name in names}
        return True, log, image, lowered
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", cuda_launch.KERNEL_FILES)
def test_nvrtc_compiles_every_instantiation(file, arch):
    _require_nvrtc()
    ok, log, image, lowered = compile_file(file, arch)
    assert ok, f"NVRTC failed on {file} for {arch}:\n{log}"
    assert "warning" not in log.lower() and "error" not in log.lower(), (
        f"NVRTC reported diagnostics on {file} for {arch}:\n{log}"
    )
    names = cuda_launch.name_expressions(file)
    assert len(set(lowered.values())) == len(names), "every name expression has its own kernel"
    for mangled in lowered:
        assert mangled.encode() in image, f"{lowered[mangled]} ({mangled}) missing from the {arch} image"


def test_every_kernel_file_is_listed():
    on_disk = sorted(p.name for p in cuda_launch.kernel_dir().glob("*.cu"))
    assert on_disk == sorted(cuda_launch.KERNEL_FILES)
    total = cuda_launch.total_instantiations()
    assert total == sum(len(cuda_launch.name_expressions(f)) for f in cuda_launch.KERNEL_FILES) > 100


def test_activation_codes_match_the_contract():
    text = (cuda_launch.kernel_dir() / "common.cuh").read_text()
    found = {m.group(1).lower(): int(m.group(2)) for m in re.finditer(r"ACT_([A-Z_]+) = (\d+)", text)}
    assert found == activations.CODES


def test_reduction_codes_match_the_kernel():
    text = (cuda_launch.kernel_dir() / "cross_entropy.cu").read_text()
    assert re.search(r"RED_MEAN = (\d+)", text).group(1) == str(cuda_launch.REDUCTION_CODES["mean"])


#: The one header allowed inline PTX (cp.async, with an emulation branch and a pre-sm_80 fallback).
INLINE_PTX_FILES = ("async_copy.cuh",)


#: The one system header allowed, in the tensor-core files only (cuda_launch.MMA_FILES), and only
#: outside the CPU emulation, which brings its own nvcuda::wmma.
MMA_INCLUDE = "#ifndef NNFAST_CUDA_HOST_EMULATION\n#include <mma.h>\n#endif"


def test_sources_are_self_contained():
    """No CUDA system header (but <mma.h> in the tensor-core files), inline PTX only in async_copy.cuh,
    no static shared memory (portability rules)."""
    for path in sorted(cuda_launch.kernel_dir().glob("*.cu*")):
        text = path.read_text()
        if path.name in cuda_launch.MMA_FILES:
            assert MMA_INCLUDE in text, f"{path.name}: <mma.h> included outside the emulation guard"
            text = text.replace(MMA_INCLUDE, "")
        for include in re.findall(r'#\s*include\s*([<"][^>"]+[>"])', text):
            assert include.startswith('"') and include.endswith('.cuh"'), f"{path.name}: {include}"
        if path.name not in INLINE_PTX_FILES:
            assert "asm(" not in text and "asm volatile" not in text, f"{path.name}: inline PTX"
        for line in text.splitlines():
            if "__shared__" in line and not line.lstrip().startswith("//"):
                assert "extern __shared__ float4 " in line, f"{path.name}: static shared memory: {line}"


@pytest.mark.parametrize("dtype,precision", [("float32", "highest"), ("float32", "high"), ("float64", "highest"),
                                             ("float64", "high")])
def test_launch_configurations_are_valid(dtype, precision):
    names = {f: set(cuda_launch.name_expressions(f)) for f in cuda_launch.KERNEL_FILES}
    tensor_cores = precision == "high" and dtype == "float32"

    def check(launch):
        assert launch.kernel in names[launch.file], launch
        threads = launch.block[0] * launch.block[1] * launch.block[2]
        assert 32 <= threads <= 1024 and threads % 32 == 0, launch
        assert all(g >= 1 for g in launch.grid) and launch.grid[1] < 65536, launch
        # Only the tensor-core GEMM goes past the default (the backend raises its kernel's limit).
        limit = cuda_launch.DEFAULT_MAX_SHARED_MEM if launch.file in cuda_launch.MMA_FILES else 48 * 1024
        assert 0 <= launch.shared_mem <= limit, launch

    def gemm(*args, **kwargs):
        plan = cuda_launch.gemm_launch(*args, precision=precision, **kwargs)
        assert (plan.file == "linear_tf32.cu") == tensor_cores, plan
        if plan.reduce is not None:
            check(plan.reduce)
        return plan

    for shape in [(1, 1, 1), (3, 5, 7), (64, 784, 256), (4096, 4096, 4096), (257, 10, 1000),
                  (5_000_000, 7, 3)]:
        M, N, K = shape
        for act in activations.ACTIVATIONS:
            for aligned in (False, True):
                check(gemm(M, N, K, dtype, activation=act, aligned=aligned))
        check(gemm(M, N, K, dtype, trans_a=True, aligned=True))
        check(gemm(M, N, K, dtype, trans_b=True, aligned=True))
        for act in activations.ACTIVATIONS:
            plan = cuda_launch.bias_act_backward_launch(M, N, dtype, act, has_bias=True)
            check(plan.main)
            assert plan.rows_per_split * plan.splits >= M > plan.rows_per_split * (plan.splits - 1)
            if plan.reduce is not None:
                check(plan.reduce)
            for backward in (False, True):
                check(cuda_launch.activation_launch(M * N, dtype, act, backward=backward, aligned=True)[0])
    for cols in (1, 10, 1000, 1025, 5000, 32000, 50000):
        for log in (False, True):
            check(cuda_launch.softmax_launch(3, cols, dtype, log=log))
        for reduction in cuda_launch.REDUCTION_CODES:
            plan = cuda_launch.cross_entropy_launches(3, cols, dtype, reduction)
            for launch in (plan.prepare, plan.rows, plan.reduce):
                if launch is not None:
                    check(launch)
    for kind in ("sgd", "adam"):
        check(cuda_launch.optimizer_launch(kind, 7, dtype))


def test_vector_path_needs_multiples_of_the_vector_width():
    assert cuda_launch.gemm_launch(8, 8, 8, "float32", aligned=True).kernel.endswith("true>")
    assert cuda_launch.gemm_launch(8, 10, 8, "float32", aligned=True).kernel.endswith("false>")
    assert cuda_launch.gemm_launch(8, 8, 6, "float32", aligned=True).kernel.endswith("false>")
    assert cuda_launch.gemm_launch(8, 8, 6, "float64", aligned=True).kernel.endswith("true>")
    assert cuda_launch.gemm_launch(8, 8, 8, "float32", aligned=False).kernel.endswith("false>")


def test_multi_tensor_chunks_cover_every_element():
    sizes = [1, 4096, 4097, 10000, 0, 3]
    chunks = cuda_launch.multi_tensor_chunks(sizes)
    covered = {t: 0 for t in range(len(sizes))}
    for t, start in chunks:
        covered[t] += min(cuda_launch.OPTIM_CHUNK, sizes[t] - start)
    assert [covered[t] for t in range(len(sizes))] == sizes


# --------------------------------------------------------------------- ptxas
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _wrapper(file: str) -> str:
    """A translation unit that includes ``file`` and instantiates every name expression.

    Taking a kernel's address instantiates it, which is what NVRTC's name
    expressions do; nvcc then compiles exactly the kernels the backend uses.
    """
    names = cuda_launch.name_expressions(file)
    return (f'#include "{file}"\n\nvoid* nnf_kernel_addresses[] = {{\n'
            + "".join(f"    (void*)&{name},\n" for name in names) + "};\n")


def _demangle(symbols: list[str]) -> dict[str, str]:
    """Mangled kernel symbol -> name expression (``gemm<float, ...>``), via c++filt when present."""
    if not symbols or shutil.which("c++filt") is None:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=False)
    names = {}
    for sym, text in zip(symbols, out.stdout.splitlines()):
        text = text.strip()
        if text.startswith("void "):
            text = text[5:]
        depth = 0
        for i, ch in enumerate(text):  # cut the parameter list after the template arguments
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                text = text[:i]
                break
        names[sym] = text
    return names


def ptxas_report(file: str) -> list[dict]:
    """Registers, stack and spills of every kernel of ``file`` on sm_90.

    ``nvcc -arch=sm_90 -cubin -Xptxas -v`` on the source itself (every
    instantiation of :func:`~nnfast.backends.cuda_launch.name_expressions`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"instantiate_{Path(file).stem}.cu"
        src.write_text(_wrapper(file))
        proc = subprocess.run(
            ["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-ftz=true", "-Xptxas", "-v",
             "-I", str(cuda_launch.kernel_dir()), "-o", str(src.with_suffix(".cubin")), str(src)],
            capture_output=True, text=True, check=False,
        )
    assert proc.returncode == 0, f"nvcc/ptxas failed on {file}:\n{proc.stderr}"
    rows, current, stack = [], None, (0, 0, 0)
    for line in proc.stderr.splitlines():
        if m := _PROPS.search(line):
            current = m.group(1)
        elif m := _STACK.search(line):
            stack = tuple(int(v) for v in m.groups())
        elif (m := _REGS.search(line)) and current is not None:
            rows.append({"kernel": current, "registers": int(m.group(1)), "stack": stack[0],
                         "spill_stores": stack[1], "spill_loads": stack[2]})
            current, stack = None, (0, 0, 0)
    names = _demangle([r["kernel"] for r in rows])
    for r in rows:
        r["kernel"] = names.get(r["kernel"], r["kernel"])
    return rows


#: Kernel families that are float32 whatever their template arguments.
FLOAT32_KERNELS = ("gemm_tf32",)


def _is_hot(kernel: str) -> bool:
    family = kernel.split("<", 1)[0]
    return family in FLOAT32_KERNELS or (family in HOT_KERNELS and "<float," in kernel.replace("<float>", "<float,"))


@pytest.mark.parametrize("file", cuda_launch.KERNEL_FILES)
def test_ptxas_registers_and_spills(file, record_property):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) is not on PATH")
    rows = ptxas_report(file)
    assert len(rows) == len(cuda_launch.name_expressions(file))
    if shutil.which("c++filt") is not None:
        assert {r["kernel"] for r in rows} == set(cuda_launch.name_expressions(file))
    for r in rows:
        record_property(r["kernel"], f"{r['registers']} regs, {r['spill_stores']}/{r['spill_loads']} B spill")
    spilling = [r for r in rows if _is_hot(r["kernel"]) and (r["spill_stores"] or r["spill_loads"])]
    assert not spilling, "hot float32 kernels spill registers:\n" + "\n".join(map(str, spilling))


def main() -> int:
    if shutil.which("nvcc") is None:
        print("skipped: nvcc (CUDA toolkit) is not on PATH")
        return 0
    print(f"{'kernel':64s} {'regs':>5s} {'stack':>6s} {'spill st/ld':>12s}  hot")
    for file in cuda_launch.KERNEL_FILES:
        for r in ptxas_report(file):
            print(f"{r['kernel']:64s} {r['registers']:5d} {r['stack']:6d} "
                  f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>12s}  {'*' if _is_hot(r['kernel']) else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
