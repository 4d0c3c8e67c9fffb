"""The machine code (SASS) of ``kernels/*.cu`` on sm_90, read without a GPU.

Every instantiation that :func:`nnfast.backends.cuda_launch.name_expressions`
lists is compiled by NVRTC (CuPy's bindings, the ``nvidia-cuda-nvrtc`` wheel;
``test_cuda_compile.compile_file``, with the options CuPy uses at run time)
with ``-arch=sm_90`` to a cubin, which ``cuobjdump`` (the
``nvidia-cuda-cuobjdump`` wheel; it runs ``nvdisasm`` from the
``nvidia-cuda-nvdisasm`` wheel) disassembles. This module parses the listing
into instructions per kernel and finds a GEMM's main loop: of the loops (a
branch back to an earlier address), the one that holds the most FFMA / DFMA,
i.e. the K loop with its unrolled inner product.

Run as a script to print, per GEMM instantiation, where the first global load
of the main loop sits among its FMAs, with registers and local memory::

    python tests/cuda_sass.py            # every GEMM of kernels/linear.cu and linear_tf32.cu
    python tests/cuda_sass.py --dump 'gemm<float, 128, 128, 8, 32, 64, 4, false, false, 1, true>'
"""

from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nnfast.backends import cuda_launch

ARCH = "sm_90"

def tool(name: str) -> str | None:
    """Path of ``cuobjdump`` / ``nvdisasm``: the pip wheel's copy first, then PATH."""
    try:
        import nvidia
    except ImportError:
        roots: list[str] = []
    else:
        roots = list(getattr(nvidia, "__path__", []))
    for root in roots:
        for sub in ("cu13/bin", "cu12/bin", "cuda_cuobjdump/bin", "cuda_nvdisasm/bin"):
            path = Path(root) / sub / name
            if path.is_file():
                return str(path)
    return shutil.which(name)


def unavailable_reason() -> str | None:
    """Why SASS cannot be produced here (no NVRTC, no cuobjdump / nvdisasm), or None."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as err:
        return f"NVRTC through CuPy is not usable (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12): {err}"
    for name, wheel in (("cuobjdump", "nvidia-cuda-cuobjdump"), ("nvdisasm", "nvidia-cuda-nvdisasm")):
        if tool(name) is None:
            return f"{name} not found (pip install {wheel})"
    return None


def _complete_elf(image: bytes) -> bytes:
    """The cubin padded to the length its ELF header declares.

    CuPy's ``nvrtc.getCUBIN`` drops the last byte (it treats the image like
    the NUL-terminated PTX); the disassembler then rejects the file.
    """
    if image[:4] != b"\x7fELF" or image[4] != 2:
        return image
    phoff, shoff = struct.unpack_from("<QQ", image, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    return image + bytes(max(0, end - len(image)))


def compile_cubin(file: str) -> tuple[bytes, dict[str, str]]:
    """``(cubin, {mangled name: name expression})`` of every instantiation of ``kernels/<file>``."""
    from test_cuda_compile import compile_file  # cached there

    ok, log, cubin, lowered = compile_file(file, ARCH)
    if not ok:
        raise RuntimeError(f"NVRTC failed on {file} for {ARCH}:\n{log}")
    return _complete_elf(bytes(cubin)), lowered


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.cubin"
        path.write_bytes(cubin)
        exe = tool("cuobjdump")
        env = None
        nvdisasm = tool("nvdisasm")
        if nvdisasm is not None:  # cuobjdump runs nvdisasm from PATH
            import os

            env = dict(os.environ, PATH=f"{Path(nvdisasm).parent}:{os.environ.get('PATH', '')}")
        proc = subprocess.run([exe, *flags, str(path)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str     # with its modifiers, e.g. "LDGSTS.E.BYPASS.LTC128B.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    def __str__(self) -> str:
        pred = f"{self.predicate} " if self.predicate else ""
        return f"/*{self.address:04x}*/ {pred}{self.opcode} {self.operands}".rstrip()


_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.MULTILINE)
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def disassemble(cubin: bytes, names: dict[str, str] | None = None) -> dict[str, list[Instruction]]:
    """``{kernel: instructions}`` of a cubin, kernels named through ``names`` (mangled -> name) when given."""
    parts = _FUNCTION.split(_cuobjdump(cubin, "--dump-sass"))
    names = names or {}
    return {names.get(mangled, mangled): [
        Instruction(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip())
        for m in _INSTRUCTION.finditer(body)] for mangled, body in zip(parts[1::2], parts[2::2])}


@functools.lru_cache(maxsize=None)
def sass(file: str) -> dict[str, list[Instruction]]:
    """``{name expression: instructions}`` for every instantiation of ``kernels/<file>``."""
    cubin, lowered = compile_cubin(file)
    return disassemble(cubin, lowered)


@functools.lru_cache(maxsize=None)
def resources(file: str) -> dict[str, dict[str, int]]:
    """``{name expression: {"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..}}`` from ``cuobjdump -res-usage``."""
    cubin, lowered = compile_cubin(file)
    text = _cuobjdump(cubin, "--dump-resource-usage")
    out, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):\s*$", line):
            current = lowered.get(m.group(1), m.group(1))
        elif current is not None and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            current = None
    return out


def is_fma(ins: Instruction) -> bool:
    return ins.base in ("FFMA", "DFMA")


def is_mma(ins: Instruction) -> bool:
    """A tensor-core instruction: HMMA (mma.sync, what wmma compiles to) or HGMMA (wgmma)."""
    return ins.base in ("HMMA", "HGMMA")


def is_global_load(ins: Instruction) -> bool:
    """LDG (a load into registers) or LDGSTS (cp.async), not LDGDEPBAR (a commit)."""
    return ins.base in ("LDG", "LDGSTS")


def uses_local_memory(ins: Instruction) -> bool:
    return ins.base in ("LDL", "STL")


_TARGET = re.compile(r"0x([0-9a-f]+)")


def loops(code: list[Instruction]) -> list[tuple[int, int]]:
    """``(first, last)`` instruction indices of every loop: a branch back to an earlier (or its own) address."""
    index = {ins.address: i for i, ins in enumerate(code)}
    found = []
    for i, ins in enumerate(code):
        if ins.base == "BRA" and (m := _TARGET.search(ins.operands)):
            target = int(m.group(1), 16)
            if target <= ins.address and target in index:
                found.append((index[target], i))
    return found


@dataclass(frozen=True)
class MainLoop:
    """Where a kernel's main loop issues its first global load, counted in FMAs of the loop body."""

    first: int         # index of the loop's first instruction
    last: int          # index of its backward branch
    fmas: int          # FFMA / DFMA in the body
    loads: int         # LDG / LDGSTS in the body
    fmas_before_load: int | None  # FMAs that precede the first global load (None: no load in the loop)
    first_load: Instruction | None

    def describe(self) -> str:
        if self.first_load is None:
            return f"main loop of {self.fmas} FMAs issues no global load"
        return (f"first global load of the main loop after {self.fmas_before_load} of its {self.fmas} FMAs "
                f"({self.first_load.opcode}); {self.loads} global loads in the loop")


def main_loop(code: list[Instruction], is_math: Callable[[Instruction], bool] = is_fma) -> MainLoop | None:
    """The loop holding the most FMAs, or None when no loop has one. Of equals, one that issues
    global loads (a K loop around a loop of its own over the steps of a slice holds the same
    math), then the innermost.

    ``is_math``: what counts as the loop's math (:func:`is_mma` for a tensor-core GEMM: its
    ``fmas`` are then HMMAs).
    """
    best = None
    for first, last in loops(code):
        body = code[first:last + 1]
        key = (sum(map(is_math, body)), any(map(is_global_load, body)), -(last - first))
        if key[0] and (best is None or key > best[0]):
            best = (key, first, last)
    if best is None:
        return None
    (fmas, _, _), first, last = best
    before, load, loads = 0, None, 0
    for ins in code[first:last + 1]:
        if is_global_load(ins):
            loads += 1
            if load is None:
                load = ins
        elif is_math(ins) and load is None:
            before += 1
    return MainLoop(first, last, fmas, loads, before if load is not None else None, load)


def gemm_names(file: str = "linear.cu") -> list[str]:
    """The GEMM instantiations of ``file``: ``gemm<...>`` (linear.cu), ``gemm_tf32<...>`` (linear_tf32.cu)."""
    return [n for n in cuda_launch.name_expressions(file) if n.startswith(("gemm<", "gemm_tf32<"))]


def math_of(name: str) -> Callable[[Instruction], bool]:
    """What the main loop of GEMM ``name`` computes with: tensor-core MMAs or FMAs."""
    return is_mma if name.startswith("gemm_tf32<") else is_fma


def report(file: str = "linear.cu") -> list[tuple[str, MainLoop | None, dict[str, int]]]:
    code, res = sass(file), resources(file)
    return [(name, main_loop(code[name], math_of(name)), res.get(name, {})) for name in gemm_names(file)]


def main(argv: list[str]) -> int:
    reason = unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    if len(argv) >= 2 and argv[0] == "--dump":
        for name in argv[1:]:
            file = "linear_tf32.cu" if name.startswith("gemm_tf32<") else "linear.cu"
            for ins in sass(file)[name]:
                print(ins)
        return 0
    print(f"{'GEMM instantiation':72s} {'math':>5s} {'1st load after':>14s} {'regs':>5s} {'local':>5s}")
    for name, loop, res in report() + report("linear_tf32.cu"):
        where = "-" if loop is None or loop.fmas_before_load is None else str(loop.fmas_before_load)
        print(f"{name:72s} {loop.fmas if loop else 0:5d} {where:>14s} {res.get('REG', 0):5d} "
              f"{res.get('LOCAL', 0):5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
