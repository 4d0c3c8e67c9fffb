"""Run the CUDA kernels of ``kernels/*.cu`` on the CPU, for tests.

The kernels are compiled unchanged with the host ``g++`` against
``kernels/testing/cuda_host_emulation.h``, which emulates the CUDA execution
model (threads of a block as cooperative fibers that switch at barriers and
warp collectives, per-block shared memory poisoned at block start, real lane
exchanges for warp intrinsics). This module is the Python side:

* :func:`load_module` builds one shared library per ``.cu`` file with the
  requested template instantiations (the same ``name_expressions`` a
  ``cupy.RawModule`` gets), cached on disk by a hash of everything that goes
  into it, and loads it with ctypes;
* :class:`DeviceArray` is "global memory": each array gets its own mapping with
  inaccessible guard pages around it, so a read or write out of bounds faults
  and the launch fails naming the argument and the offset;
* :class:`Kernel` is called like a ``cupy.RawKernel``
  (``kernel(grid, block, args, shared_mem=...)``) and packs its arguments the
  way CuPy does (Python ``int`` -> int64, ``float`` -> float64, NumPy scalars
  as they are), then checks them against the kernel's real parameter types;
* :class:`count_accesses` counts, per launch and per array, the global-memory
  loads and stores of the kernels by width (16-byte vectors, scalars), on
  builds instrumented for it.

Environment knobs: ``NNFAST_EMU_CACHE`` (cache directory), ``CXX`` (compiler),
``NNFAST_EMU_SCHEDULE`` (``forward`` | ``reverse`` | ``random`` | ``warps`` |
``warps-reverse``, default ``forward``; see :data:`SCHEDULES`),
``NNFAST_EMU_TIMEOUT`` (seconds per launch, default 120),
``NNFAST_EMU_PLACEMENT`` (``end`` | ``start``: which side of the arrays of the
emulated CuPy touches a guard page, default ``end``).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO_ROOT / "kernels"
HEADER = KERNEL_DIR / "testing" / "cuda_host_emulation.h"

CXXFLAGS = (
    "-std=c++20", "-O1", "-fPIC", "-pthread", "-fno-strict-aliasing", "-fno-gnu-unique",
    "-fvisibility=hidden", "-fno-omit-frame-pointer", "-ffp-contract=off", "-w",
    # A misaligned vector access (float4, double2) is an error on a GPU: trap on it here.
    "-fsanitize=alignment", "-fsanitize-undefined-trap-on-error",
)
#: Thread orders (cuemu::Schedule): the block in step, one slice between collectives per sweep
#: ("forward", "reverse", "random" thread order), or each warp alone up to its next barrier
#: ("warps": warp 0 first, "warps-reverse": the last warp first).
#: Extra flags of a build that counts global-memory accesses (see the header's accounting
#: section): -O0 keeps the accesses of the source (no vector load split into lanes, no scalar
#: stores merged), the kernel-address instrumentation calls the header's hooks for each one.
ACCESS_COUNTING_FLAGS = (
    "-O0", "-DCUEMU_COUNT_ACCESSES", "-fsanitize=kernel-address", "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0", "--param=asan-globals=0",
)
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2, "warps": 3, "warps-reverse": 4}
DEFAULT_DYNAMIC_SMEM = 48 * 1024
_SMEM_TAIL = 1024
_VERSION = "3"  # bump to invalidate cached builds when this file changes what it emits

ERROR_KINDS = {
    1: "launch_config", 2: "fault", 3: "deadlock", 4: "barrier_divergence", 5: "warp_divergence",
    6: "trap", 7: "timeout", 8: "shared_overflow", 9: "arguments", 10: "internal",
}


class EmulationUnavailable(RuntimeError):
    """The emulation cannot run here (no C++ compiler, not Linux/x86-64 or glibc)."""


class CompileError(RuntimeError):
    """g++ rejected a kernel source; the message holds its diagnostics."""


class EmulationError(RuntimeError):
    """A launch failed: bad configuration, out-of-bounds access, deadlock, ...

    ``kind`` is one of :data:`ERROR_KINDS`' values (``"fault"``, ``"deadlock"``...).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"[{kind}] {message}")
        self.kind = kind


def compiler() -> str | None:
    """Path of the C++ compiler the emulation uses, or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def unavailable_reason() -> str | None:
    """Why the emulation cannot run on this machine, or None when it can."""
    if not sys.platform.startswith("linux") or _libc is None:
        return f"the CUDA emulation needs Linux (glibc), this is {sys.platform}"
    if compiler() is None:
        return f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on PATH"
    if shutil.which("readelf") is None:
        return "readelf (binutils) is not on PATH"
    return None


# --------------------------------------------------------------------- memory
try:  # importing this module never fails: unavailable_reason() says why it cannot run
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_long)
    _libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
except (OSError, AttributeError, TypeError):  # pragma: no cover - not a POSIX libc
    _libc = None
_PAGE = mmap.PAGESIZE
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class DeviceArray:
    """A C-contiguous array in emulated global memory, between guard pages.

    ``placement="end"`` (default) puts the last byte as close to the guard page
    after it as 16-byte alignment allows (the few bytes of slack are poisoned and
    checked for writes), so reading one element too far faults. ``"start"``
    puts the first byte right after the guard page before it, so negative
    offsets fault. The contents start as 0xFF bytes (NaN, -1) unless given.
    """

    def __init__(self, shape: int | Sequence[int], dtype: Any = np.float32, *, placement: str = "end"):
        self.shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        if placement not in ("end", "start"):
            raise ValueError(f"placement: expected 'end' or 'start', got {placement!r}")
        self.placement = placement
        span = _round_up(max(self.nbytes, 1), 16)
        data_len = _round_up(span, _PAGE)
        self._map_len = data_len + 2 * _PAGE
        base = _libc.mmap(None, self._map_len, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, _MAP_FAILED):
            raise MemoryError(f"mmap of {self._map_len} bytes failed (errno {ctypes.get_errno()})")
        self._base = base
        self._data = base + _PAGE
        self._data_len = data_len
        self._protect(mmap.PROT_READ | mmap.PROT_WRITE)
        weakref.finalize(self, _libc.munmap, base, self._map_len)
        _live_arrays.add(self)
        self.ptr = self._data + data_len - span if placement == "end" else self._data
        raw = (ctypes.c_ubyte * data_len).from_address(self._data)
        self._raw = np.frombuffer(raw, dtype=np.uint8)
        self._raw[:] = 0xFF
        start = self.ptr - self._data
        self.host = self._raw[start:start + self.nbytes].view(self.dtype).reshape(self.shape)

    def _protect(self, prot: int) -> None:
        if _libc.mprotect(self._data, self._data_len, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")

    # CuPy-like surface
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def get(self) -> np.ndarray:
        """A NumPy copy of the contents."""
        return self.host.copy()

    def set(self, values: Any) -> None:
        self.host[...] = np.asarray(values, dtype=self.dtype).reshape(self.shape)

    def slack_intact(self) -> bool:
        """True when no byte of the mapping outside the array was written."""
        start = self.ptr - self._data
        return bool((self._raw[:start] == 0xFF).all() and (self._raw[start + self.nbytes:] == 0xFF).all())

    def contains(self, address: int) -> bool:
        return self._base <= address < self._base + self._map_len

    def describe_offset(self, address: int) -> str:
        off = address - self.ptr
        item = self.dtype.itemsize
        where = "before the start" if off < 0 else ("past the end" if off >= self.nbytes else "inside")
        return (f"byte offset {off} (element {off // item}) of a {self.dtype} array of {self.size} elements, "
                f"{where}")

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, placement={self.placement!r})"


#: Every DeviceArray alive: the regions a counting launch attributes accesses to (a kernel
#: may reach arrays that are not its arguments, through a table of pointers).
_live_arrays: "weakref.WeakSet[DeviceArray]" = weakref.WeakSet()


def to_device(a: Any, dtype: Any = None, *, placement: str = "end") -> DeviceArray:
    """Copy a host array into a new :class:`DeviceArray`."""
    host = np.ascontiguousarray(a, dtype=dtype)
    d = DeviceArray(host.shape, host.dtype, placement=placement)
    d.host[...] = host
    return d


def empty(shape: int | Sequence[int], dtype: Any = np.float32, *, placement: str = "end") -> DeviceArray:
    """A new :class:`DeviceArray` full of 0xFF bytes (NaN for floats), like uninitialised memory."""
    return DeviceArray(shape, dtype, placement=placement)


def zeros(shape: int | Sequence[int], dtype: Any = np.float32, *, placement: str = "end") -> DeviceArray:
    d = DeviceArray(shape, dtype, placement=placement)
    d.host[...] = 0
    return d


# --------------------------------------------------------------------- building
def _cache_dir() -> Path:
    env = os.environ.get("NNFAST_EMU_CACHE")
    path = Path(env) if env else Path(tempfile.gettempdir()) / f"nnfast-cuda-emu-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


_compiler_id: str | None = None


def _compiler_version() -> str:
    global _compiler_id
    if _compiler_id is None:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True)
        _compiler_id = out.stdout.splitlines()[0] if out.stdout else "unknown"
    return _compiler_id


_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)


def _local_includes(source: Path) -> list[Path]:
    """``source`` and the files its ``#include "..."`` lines reach, transitively."""
    seen: list[Path] = []
    todo = [source.resolve()]
    while todo:
        f = todo.pop()
        if f in seen or not f.is_file():
            continue
        seen.append(f)
        for name in _INCLUDE_RE.findall(f.read_text(errors="replace")):
            for d in (f.parent, source.parent, KERNEL_DIR):
                if (d / name).is_file():
                    todo.append((d / name).resolve())
                    break
    return seen


def _inputs_digest(source: Path, names: Sequence[str], defines: Sequence[str]) -> str:
    """Hash of the header, the source, every header beside it, the request and the toolchain."""
    h = hashlib.sha256()
    h.update(_VERSION.encode())
    h.update(_compiler_version().encode())
    h.update(" ".join(CXXFLAGS).encode())
    h.update(HEADER.read_bytes())
    for f in _local_includes(source):  # the source and every "header" it pulls in
        h.update(f.name.encode())
        h.update(f.read_bytes())  # content, not location: copies of kernels/ share builds
    h.update("\0".join(names).encode())
    h.update("\0".join(defines).encode())
    return h.hexdigest()[:24]


def _wrapper_source(source: Path, names: Sequence[str], with_bounds: bool = True) -> str:
    bounds = _launch_bounds_code(source, names) if with_bounds else ({}, "")
    entries = ",\n".join(f"  cuemu::make_entry(&{n}, {_c_string(n)}, {bounds[0].get(n, '0')})" for n in names)
    return (
        f'#include "{HEADER.resolve()}"\n'
        f'#include "{source.resolve()}"\n'
        f"{bounds[1]}"
        "extern \"C\" __attribute__((visibility(\"default\"))) const cuemu::KernelEntry cuemu_kernels[] = {\n"
        f"{entries}{',' if names else ''}\n"
        "  cuemu::KernelEntry{nullptr, nullptr, nullptr, 0, nullptr}\n};\n"
        f"extern \"C\" __attribute__((visibility(\"default\"))) const int cuemu_num_kernels = {len(names)};\n"
    )


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dynamic_shared_symbols(obj: Path) -> tuple[list[str], list[str]]:
    """Undefined symbols of the object that the build must define.

    Returns the thread-local ones (the ``extern __shared__`` arrays, which all
    alias the dynamic shared memory buffer) and the TLS init functions
    (``_ZTH...``) GCC may call for them, which have nothing to initialise.
    """
    out = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True, check=True).stdout
    tls, init = {"cuemu_dynamic_smem"}, set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[6] == "UND":
            if cols[3] == "TLS":
                tls.add(cols[7])
            elif cols[7].startswith("_ZTH"):
                init.add(cols[7])
    return sorted(tls), sorted(init)


def _alias_assembly(tls: Iterable[str], init: Iterable[str]) -> str:
    lines = ['\t.section .tbss,"awT",@nobits', "\t.p2align 7"]
    for n in tls:
        lines += [f"\t.globl {n}", f"\t.hidden {n}", f"\t.type {n}, @object", f"\t.size {n}, 4"]
    lines += [f"{n}:" for n in tls]
    lines.append(f"\t.zero {232448 + _SMEM_TAIL}")
    lines.append("\t.text")
    for n in init:
        lines += [f"\t.globl {n}", f"\t.hidden {n}", f"\t.type {n}, @function", f"{n}:", "\tret"]
    lines.append('\t.section .note.GNU-stack,"",@progbits')
    return "\n".join(lines) + "\n"


_CACHE_MAX_AGE_S = 7 * 24 * 3600


def _prune_cache() -> None:
    """Delete builds nobody used for a week (kernel edits leave old ones behind)."""
    import time

    cutoff = time.time() - _CACHE_MAX_AGE_S
    for f in _cache_dir().glob("*.so"):
        try:
            if f.stat().st_mtime < cutoff:
                f.unlink()
        except OSError:
            pass


def build_module(source: str | os.PathLike, name_expressions: Sequence[str], *,
                 defines: Sequence[str] = (), count_accesses: bool = False) -> Path:
    """Compile ``source`` with the instantiations ``name_expressions``; return the .so path (cached).

    ``count_accesses``: the instrumented build that counts global-memory accesses
    (:class:`count_accesses`); slower, used only where the counts are tested.
    """
    reason = unavailable_reason()
    if reason:
        raise EmulationUnavailable(reason)
    source = Path(source)
    names = list(name_expressions)
    extra = ACCESS_COUNTING_FLAGS if count_accesses else ()
    digest = _inputs_digest(source, names, [*defines, *extra])
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        os.utime(target)  # recently used: kept by _prune_cache
        return target
    _prune_cache()
    with tempfile.TemporaryDirectory(prefix="cuemu-build-", dir=_cache_dir()) as tmp:
        tmp = Path(tmp)
        wrap = tmp / "wrap.cpp"
        obj = tmp / "wrap.o"
        cmd = [compiler(), *CXXFLAGS, *extra, *(f"-D{d}" for d in defines), f"-I{KERNEL_DIR}", f"-I{source.parent}",
               "-c", str(wrap), "-o", str(obj)]
        wrap.write_text(_wrapper_source(source, names))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            # Perhaps only the copied __launch_bounds__ expressions do not compile at
            # file scope: build without the check rather than not at all.
            wrap.write_text(_wrapper_source(source, names, with_bounds=False))
            if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
                res = subprocess.CompletedProcess(cmd, 0)
        if res.returncode != 0:
            raise CompileError(f"g++ failed on {source} ({len(names)} instantiations):\n{res.stderr[-20000:]}")
        alias = tmp / "shared.s"
        alias.write_text(_alias_assembly(*_dynamic_shared_symbols(obj)))
        so = tmp / "module.so"
        res = subprocess.run([compiler(), "-shared", "-pthread", str(obj), str(alias), "-o", str(so), "-ldl"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise CompileError(f"linking {source} failed:\n{res.stderr[-20000:]}")
        os.replace(so, target)
    return target


# --------------------------------------------------------------------- launching
class _Options(ctypes.Structure):
    _fields_ = [
        ("schedule", ctypes.c_int), ("strict_exit", ctypes.c_int), ("seed", ctypes.c_uint64),
        ("timeout_s", ctypes.c_double), ("max_dynamic_smem", ctypes.c_uint64), ("stack_bytes", ctypes.c_uint64),
        ("launch_bounds", ctypes.c_int), ("dry_run", ctypes.c_int),
    ]


class LaunchStats(ctypes.Structure):
    _fields_ = [
        ("blocks", ctypes.c_uint64), ("threads", ctypes.c_uint64), ("barriers", ctypes.c_uint64),
        ("warp_collectives", ctypes.c_uint64), ("switches", ctypes.c_uint64), ("fault_addr", ctypes.c_uint64),
    ]


_PARAM_KINDS = {0: "pointer", 1: "pointer to const", 2: "float", 3: "signed int", 4: "unsigned int", 5: "bool",
                6: "struct"}


@dataclass(frozen=True)
class Param:
    kind: str
    size: int

    @property
    def is_pointer(self) -> bool:
        return self.kind.startswith("pointer")

    def describe(self) -> str:
        return f"{self.kind} ({self.size} bytes)"


_launch_lock = threading.RLock()  # one launch at a time: the runtime is per process


def _pack(value: Any, param: Param, position: int, kernel: str) -> tuple[bytes, DeviceArray | None]:
    """Pack one launch argument as CuPy would and check it against the kernel parameter."""
    where = f"{kernel}: argument {position} ({param.describe()})"
    if isinstance(value, DeviceArray):
        if not param.is_pointer:
            raise EmulationError("arguments", f"{where} got an array; the kernel takes a value")
        return value.ptr.to_bytes(8, "little"), value
    if isinstance(value, EmulatedArray):
        if not param.is_pointer:
            raise EmulationError("arguments", f"{where} got an array; the kernel takes a value")
        return value.data.ptr.to_bytes(8, "little"), _device_of(value)
    if isinstance(value, np.ndarray):
        raise EmulationError("arguments", f"{where} got a host numpy array; copy it to the device first")
    if value is None:
        return bytes(8), None
    if not isinstance(value, np.generic):
        if isinstance(value, int):
            value = np.int64(value)
        elif isinstance(value, float):
            value = np.float64(value)
        else:
            raise EmulationError("arguments", f"{where}: unsupported argument type {type(value).__name__}")
    raw = value.tobytes()
    if param.is_pointer:
        if value.dtype.kind in "iu" and len(raw) == 8:
            return raw, None  # a raw device address, as CuPy allows
        raise EmulationError("arguments", f"{where} got a {value.dtype} scalar")
    if len(raw) < param.size:
        raise EmulationError(
            "arguments", f"{where} got a {len(raw)}-byte {value.dtype}: the kernel would read past it")
    if param.kind == "float":
        if value.dtype.kind != "f" or value.dtype.itemsize != param.size:
            raise EmulationError(
                "arguments",
                f"{where} got {value.dtype}: the kernel would read its first {param.size} bytes as a "
                f"float{8 * param.size} (pass numpy.float{8 * param.size}(...))")
    elif param.kind in ("signed int", "unsigned int", "bool"):
        if value.dtype.kind not in "iub":
            raise EmulationError("arguments", f"{where} got {value.dtype}: its bits would be read as an integer")
        if len(raw) > param.size:
            low = int.from_bytes(raw[:param.size], "little", signed=param.kind == "signed int")
            if low != int(value):
                raise EmulationError(
                    "arguments", f"{where} got {value!r}, which does not fit: the kernel would read {low}")
    return raw + bytes(16 - len(raw) % 16 if len(raw) % 16 else 0), None


class Module:
    """A built kernel library; like ``cupy.RawModule(code, name_expressions=...)``."""

    def __init__(self, source: str | os.PathLike, name_expressions: Sequence[str], *, defines: Sequence[str] = (),
                 count_accesses: bool = False):
        self.source = Path(source)
        self.name_expressions = tuple(name_expressions)
        self.path = build_module(self.source, self.name_expressions, defines=defines, count_accesses=count_accesses)
        self._lib = ctypes.CDLL(str(self.path), mode=getattr(os, "RTLD_LOCAL", 0) | os.RTLD_NOW)
        lib = self._lib
        lib.cuemu_count_accesses_in.argtypes = (ctypes.c_void_p, ctypes.c_uint64)
        #: True for the instrumented build: launches inside :class:`count_accesses` are counted
        self.counts_accesses = bool(lib.cuemu_counts_accesses())
        lib.cuemu_kernel_name.restype = ctypes.c_char_p
        lib.cuemu_kernel_name.argtypes = (ctypes.c_int,)
        lib.cuemu_kernel_nparams.argtypes = (ctypes.c_int,)
        lib.cuemu_kernel_launch_bounds.restype = ctypes.c_longlong
        lib.cuemu_kernel_launch_bounds.argtypes = (ctypes.c_int,)
        lib.cuemu_kernel_param.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                           ctypes.POINTER(ctypes.c_int))
        lib.cuemu_launch.argtypes = (
            ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_uint64,
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_Options), ctypes.POINTER(LaunchStats),
            ctypes.c_char_p, ctypes.c_uint64)
        self._kernels: dict[str, Kernel] = {}
        for i in range(lib.cuemu_kernel_count()):
            name = lib.cuemu_kernel_name(i).decode()
            params = []
            for j in range(lib.cuemu_kernel_nparams(i)):
                kind, size = ctypes.c_int(), ctypes.c_int()
                lib.cuemu_kernel_param(i, j, ctypes.byref(kind), ctypes.byref(size))
                params.append(Param(_PARAM_KINDS.get(kind.value, "struct"), size.value))
            self._kernels[name] = Kernel(self, i, name, tuple(params))

    def get_function(self, name: str) -> "Kernel":
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(f"{name!r} is not among the instantiations built for {self.source.name}: "
                           f"{sorted(self._kernels)}") from None


class Kernel:
    """One kernel instantiation; called like ``cupy.RawKernel``."""

    def __init__(self, module: Module, index: int, name: str, params: tuple[Param, ...]):
        self.module, self.index, self.name, self.params = module, index, name, params
        #: as the CUDA function attribute: raise it to launch with more than 48 KiB
        self.max_dynamic_shared_size_bytes = DEFAULT_DYNAMIC_SMEM
        #: maxThreadsPerBlock of the kernel's __launch_bounds__ (None when it has none)
        self.launch_bounds = int(module._lib.cuemu_kernel_launch_bounds(index)) or None

    def __repr__(self) -> str:
        return f"<emulated kernel {self.name} of {self.module.source.name}>"

    def __call__(self, grid: Sequence[int] | int, block: Sequence[int] | int, args: Sequence[Any],
                 shared_mem: int = 0, *, schedule: str | None = None, seed: int = 0,
                 timeout: float | None = None, strict_exit: bool = True,
                 stack_bytes: int = 256 * 1024, dry_run: bool = False) -> LaunchStats:
        """Launch over ``grid`` x ``block`` threads; raise :class:`EmulationError` on any failure.

        ``dry_run``: only check the configuration (dimensions, shared memory,
        ``__launch_bounds__``) and the arguments, as the driver would at launch.
        """
        grid = _dims(grid)
        block = _dims(block)
        if _capture.kernels is not None and not dry_run:  # captured into a graph: run at its launch
            _capture.kernels.append(lambda: self(grid, block, args, shared_mem, schedule=schedule, seed=seed,
                                                 timeout=timeout, strict_exit=strict_exit,
                                                 stack_bytes=stack_bytes))
            return LaunchStats()
        if len(args) != len(self.params):
            raise EmulationError("arguments", f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        packed, arrays = [], []
        readonly, writable = set(), set()
        for i, (value, param) in enumerate(zip(args, self.params)):
            raw, arr = _pack(value, param, i, self.name)
            packed.append(ctypes.create_string_buffer(raw, max(len(raw), 16)))
            if arr is not None:
                arrays.append((i, arr))
                (readonly if param.kind == "pointer to const" else writable).add(id(arr))
        schedule = schedule or os.environ.get("NNFAST_EMU_SCHEDULE", "forward")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
        opts = _Options(
            schedule=SCHEDULES[schedule], strict_exit=int(strict_exit), seed=seed,
            timeout_s=float(timeout if timeout is not None else os.environ.get("NNFAST_EMU_TIMEOUT", 120)),
            max_dynamic_smem=int(self.max_dynamic_shared_size_bytes), stack_bytes=int(stack_bytes),
            launch_bounds=int(self.launch_bounds or 0), dry_run=int(dry_run))
        argv = (ctypes.c_void_p * max(len(packed), 1))(*[ctypes.addressof(b) for b in packed])
        stats = LaunchStats()
        msg = ctypes.create_string_buffer(16384)
        frozen = [a for _, a in arrays if id(a) in readonly and id(a) not in writable]
        with _launch_lock:
            counting = _AccessCounting(self, grid, block, args) if self.module.counts_accesses else None
            for a in frozen:
                a._protect(mmap.PROT_READ)
            try:
                code = self.module._lib.cuemu_launch(
                    self.index, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), int(shared_mem), argv,
                    ctypes.byref(opts), ctypes.byref(stats), msg, len(msg))
            finally:
                for a in frozen:
                    a._protect(mmap.PROT_READ | mmap.PROT_WRITE)
                if counting is not None:
                    counting.finish(code == 0)
        if code != 0:
            text = msg.value.decode(errors="replace")
            if stats.fault_addr:
                for i, a in arrays:
                    if a.contains(stats.fault_addr):
                        ro = " (a pointer to const, mapped read-only)" if a in frozen else ""
                        text += f"; the address is argument {i}{ro}: {a.describe_offset(stats.fault_addr)}"
            raise EmulationError(ERROR_KINDS.get(code, "internal"), f"{self.name} grid {grid} block {block} "
                                 f"shared_mem {shared_mem}: {text}")
        for i, a in arrays:
            if not a.slack_intact():
                raise EmulationError("fault", f"{self.name}: wrote past the end of argument {i} ({a!r}) "
                                     "into the bytes before the guard page")
        return stats


def _dims(d: Sequence[int] | int) -> tuple[int, int, int]:
    """As CuPy: pad to three dimensions and raise each to at least 1."""
    if isinstance(d, (int, np.integer)):
        d = (int(d),)
    d = tuple(int(v) for v in d) + (1, 1)
    return tuple(max(1, v) for v in d[:3])  # type: ignore[return-value]


# --------------------------------------------------------------------- access accounting
_ACCESS_WIDTHS = (1, 2, 4, 8, 16, 0)  # the header's counter slots; 0: any other size


class _AccessRegion(ctypes.Structure):  # cuemu::AccessRegion
    _fields_ = [("lo", ctypes.c_uint64), ("hi", ctypes.c_uint64),
                ("loads", ctypes.c_uint64 * len(_ACCESS_WIDTHS)), ("stores", ctypes.c_uint64 * len(_ACCESS_WIDTHS))]


@dataclass(frozen=True)
class Accesses:
    """The global-memory accesses of one launch into one array.

    ``loads`` / ``stores``: ``{width in bytes: number of accesses}`` (only widths that
    occur; 16 is a ``float4`` / ``double2``, 4 a scalar ``float``; 0 collects any other size).
    Each emulated thread's access counts: 32 lanes reading one address are 32 loads.
    """

    loads: dict[int, int]
    stores: dict[int, int]

    @property
    def bytes_loaded(self) -> int:
        return sum(w * n for w, n in self.loads.items())

    @property
    def bytes_stored(self) -> int:
        return sum(w * n for w, n in self.stores.items())


NO_ACCESSES = Accesses({}, {})


@dataclass(frozen=True)
class LaunchAccesses:
    """What one launch counted, per array it touched."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[Any, ...]
    _by_address: dict[int, Accesses]

    def of(self, array: Any) -> Accesses:
        """The accesses into ``array`` (a DeviceArray or an emulated CuPy array); none if untouched."""
        dev = array if isinstance(array, DeviceArray) else _device_of(array)
        if dev is None:
            raise ValueError(f"{type(array).__name__} is not in emulated device memory")
        return self._by_address.get(dev.ptr, NO_ACCESSES)

    def arg(self, position: int) -> Accesses:
        """The accesses into the array passed as argument ``position``."""
        return self.of(self.args[position])


class count_accesses:
    """Context manager: count the global-memory accesses of every emulated launch inside it.

    Launches through :func:`emulated_function` (so the emulated CuPy backend's) use the
    instrumented builds while it is active; a module loaded with ``count_accesses=True``
    is counted too. ``launches`` lists one :class:`LaunchAccesses` per successful launch,
    attributing accesses to every live :class:`DeviceArray` (so also to arrays a kernel
    reaches through a table of pointers).
    """

    def __init__(self) -> None:
        self.launches: list[LaunchAccesses] = []

    def __enter__(self) -> "count_accesses":
        global _access_log
        if _access_log is not None:
            raise RuntimeError("count_accesses() does not nest")
        _access_log = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _access_log
        _access_log = None

    def of_kernel(self, prefix: str) -> list[LaunchAccesses]:
        """The launches of kernels whose name starts with ``prefix`` (e.g. ``"ce_rows<"``)."""
        return [r for r in self.launches if r.kernel.startswith(prefix)]


_access_log: count_accesses | None = None


class _AccessCounting:
    """One counted launch: registers the live arrays with the module, then reads the counters."""

    def __init__(self, kernel: "Kernel", grid: tuple, block: tuple, args: Sequence[Any]):
        self.kernel, self.grid, self.block = kernel, grid, block
        self.args = tuple(a if isinstance(a, (DeviceArray, EmulatedArray)) else None for a in args)
        self.log = _access_log
        arrays = sorted(_live_arrays, key=lambda a: a.ptr) if self.log is not None else []
        self.table = (_AccessRegion * max(len(arrays), 1))()
        for region, a in zip(self.table, arrays):
            region.lo, region.hi = a.ptr, a.ptr + a.nbytes
        kernel.module._lib.cuemu_count_accesses_in(ctypes.addressof(self.table), len(arrays))
        self.count = len(arrays)

    def finish(self, ok: bool) -> None:
        self.kernel.module._lib.cuemu_count_accesses_in(None, 0)
        if not ok or self.log is None:
            return
        by_address = {}
        for region in self.table[:self.count]:
            loads = {w: int(n) for w, n in zip(_ACCESS_WIDTHS, region.loads) if n}
            stores = {w: int(n) for w, n in zip(_ACCESS_WIDTHS, region.stores) if n}
            if loads or stores:
                by_address[int(region.lo)] = Accesses(loads, stores)
        self.log.launches.append(LaunchAccesses(self.kernel.name, self.grid, self.block, self.args, by_address))


# --------------------------------------------------------------------- launch bounds
def _split_top_level(s: str) -> list[str]:
    """Split at the commas that are not nested in <>, () or []."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at ``start``, or -1."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == open_ch
        depth -= text[i] == close_ch
        if depth == 0:
            return i + 1
    return -1


def _launch_bounds_declarations(text: str) -> dict[str, tuple[str | None, str]]:
    """``{kernel name: (template parameter list or None, maxThreadsPerBlock expression)}``."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", " ", text, flags=re.S)
    found: dict[str, tuple[str | None, str]] = {}
    for m in re.finditer(r"__launch_bounds__\s*\(", text):
        close = _balanced(text, m.end() - 1, "(", ")")
        name = re.match(r"\s*(\w+)\s*\(", text[close:]) if close > 0 else None
        if not name:
            continue
        expr = _split_top_level(text[m.end():close - 1])[0]
        # "template <...> __global__ void" right before it, if the kernel is a template
        head = text[:m.start()]
        params = None
        tpl = head.rfind("template")
        lt = head.find("<", tpl) if tpl >= 0 else -1
        gt = _balanced(head, lt, "<", ">") if lt >= 0 else -1
        if gt > 0 and re.fullmatch(r"(?:\s|__global__|void)*", head[gt:]):
            params = head[lt + 1:gt - 1]
        found[name.group(1)] = (params, expr)
    return found


def _launch_bounds_code(source: Path, names: Sequence[str]) -> tuple[dict[str, str], str]:
    """C++ that evaluates each kernel's ``__launch_bounds__`` thread count, and its uses."""
    try:
        decls = _launch_bounds_declarations(source.read_text())
    except OSError:
        return {}, ""
    values, code = {}, []
    for i, name in enumerate(names):
        base = name.split("<", 1)[0].split("::")[-1].strip()
        if base not in decls:
            continue
        params, expr = decls[base]
        var = f"cuemu_launch_bounds_{i}"
        if params is None and "<" not in name:
            code.append(f"constexpr long long {var} = (long long)({expr});")
            values[name] = var
        elif params is not None and "<" in name:
            args = name[name.index("<") + 1:name.rindex(">")]
            code.append(f"template <{params}> constexpr long long {var} = (long long)({expr});")
            values[name] = f"{var}<{args}>"
    return values, "\n".join(code) + ("\n" if code else "")


# --------------------------------------------------------------------- cache of modules
_modules: dict[tuple, Module] = {}
_modules_lock = threading.Lock()


def load_module(source: str | os.PathLike, name_expressions: Sequence[str], *,
                defines: Sequence[str] = (), count_accesses: bool = False) -> Module:
    """Build (or reuse) and load the module; once per process for the same request."""
    key = (str(Path(source).resolve()), tuple(name_expressions), tuple(defines), count_accesses)
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            mod = _modules[key] = Module(source, name_expressions, defines=defines, count_accesses=count_accesses)
        return mod


# --------------------------------------------------------------------- an emulated CuPy
# Just enough of the ``cupy`` module for nnfast's CuPy backend to run unchanged
# on the emulation: arrays are NumPy arrays in guarded "device" memory, kernels
# come from the emulated modules. Nothing here is imported by nnfast itself.
class _MemoryPointer:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


class EmulatedArray(np.ndarray):
    """A ``cupy.ndarray`` stand-in: a NumPy array whose memory is a :class:`DeviceArray`."""

    __module__ = "cupy_emulation"  # nnfast recognises CuPy arrays by their module name

    def __array_finalize__(self, obj: Any) -> None:
        self._device = getattr(obj, "_device", None)

    @property
    def data(self) -> _MemoryPointer:  # type: ignore[override]
        return _MemoryPointer(self.__array_interface__["data"][0])

    def get(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return np.array(self.view(np.ndarray), copy=True)

    def copy(self, order: str = "C") -> "EmulatedArray":  # type: ignore[override]
        return _device_copy(self)

    def __getitem__(self, key: Any) -> Any:
        r = super().__getitem__(key)
        if not isinstance(r, np.ndarray):  # CuPy returns 0-d arrays, not scalars
            out = _device_empty((), self.dtype)
            out[...] = r
            return out
        return r


def _device_empty(shape: Any, dtype: Any = np.float32, *, fill: int | None = None) -> EmulatedArray:
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    dev = DeviceArray(shape, dtype, placement=os.environ.get("NNFAST_EMU_PLACEMENT", "end"))
    arr = dev.host.view(EmulatedArray)
    arr._device = dev
    if fill is not None:
        arr.view(np.ndarray)[...] = fill
    return arr


def _device_copy(a: Any, dtype: Any = None) -> EmulatedArray:
    host = np.asarray(a.view(np.ndarray) if isinstance(a, EmulatedArray) else a, dtype=dtype)
    out = _device_empty(host.shape, host.dtype)
    out.view(np.ndarray)[...] = host
    return out


def _device_of(a: EmulatedArray) -> DeviceArray | None:
    dev = getattr(a, "_device", None)
    if dev is None:
        base = a
        while dev is None and isinstance(getattr(base, "base", None), np.ndarray):
            base = base.base
            dev = getattr(base, "_device", None)
    return dev


class _Event:
    """Launches and copies run when they are made: every event has completed."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.done = True

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Stream:
    """One stream for everything (work runs at once, in order); ``ptr`` 0 as the null stream."""

    ptr = 0

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def synchronize(self) -> None:
        pass

    def wait_event(self, event: _Event) -> None:
        pass

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Capture:
    """The stream capture under way: the kernel launches it holds (None: no capture)."""

    kernels: list[Any] | None = None


_capture = _Capture()


class _Graph:
    """An emulated CUDA graph: the captured kernel launches, made in order at each ``launch``."""

    def __init__(self, kernels: list[Any]):
        self.kernels = kernels
        self.launches = 0  # how many times the graph was launched

    def launch(self, stream: Any = None) -> None:
        self.launches += 1
        for kernel in self.kernels:
            kernel()


class _CapturingStream(_Stream):
    """A stream that captures graphs as CuPy's does (``begin_capture`` / ``end_capture``): kernel
    launches are held, not run, until the graph is launched. Any other device work during a
    capture (a copy) raises: the emulated graph holds kernels only."""

    def begin_capture(self, mode: Any = None) -> None:
        if _capture.kernels is not None:
            raise RuntimeError("emulated stream capture: a capture is already under way")
        _capture.kernels = []

    def end_capture(self) -> _Graph:
        if _capture.kernels is None:
            raise RuntimeError("emulated stream capture: end_capture without begin_capture")
        kernels, _capture.kernels = _capture.kernels, None
        return _Graph(kernels)


class _Device:
    sm_count = 132
    compute_capability = "90"  # what CuPy reports for an H100 / H200

    def __init__(self, *args: Any):
        self.id = 0
        # an sm_90 device: 227 KiB of shared memory per block once a kernel's limit is raised
        self.attributes = {"MultiProcessorCount": _Device.sm_count, "MaxSharedMemoryPerBlockOptin": 232448}


class _Runtime:
    """``cupy.cuda.runtime``: the one device, and copies (made at once: every stream is synchronous)."""

    memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 1, 2, 3

    @staticmethod
    def getDevice() -> int:
        return 0

    @staticmethod
    def memcpyAsync(dst: int, src: int, size: int, kind: int, stream: int) -> None:
        if _capture.kernels is not None:
            raise RuntimeError("emulated stream capture: a copy during a capture (graphs hold kernels only)")
        ctypes.memmove(dst, src, size)


def _alloc_pinned_memory(size: int) -> Any:
    """Host memory standing in for pinned memory: a buffer NumPy can view and memcpyAsync can address."""
    return (ctypes.c_ubyte * max(int(size), 1))()


class _CudaNamespace:
    Event = _Event
    Device = _Device
    Stream = _Stream
    runtime = _Runtime
    alloc_pinned_memory = staticmethod(_alloc_pinned_memory)

    @staticmethod
    def get_current_stream() -> _Stream:
        return _Stream()


class _GraphCudaNamespace(_CudaNamespace):
    Stream = _CapturingStream


def make_emulated_cupy(sm_count: int = 132, graphs: bool = False) -> Any:
    """A module object standing in for ``cupy`` (arrays and the little of ``cupy.cuda`` nnfast uses);
    ``graphs``: its streams capture CUDA graphs (:class:`_CapturingStream`)."""
    import types

    m = types.ModuleType("cupy", "CPU emulation of the bits of CuPy that nnfast's CuPy backend uses")
    m.ndarray = EmulatedArray
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32",
                 "uint64", "bool_", "dtype"):
        setattr(m, name, getattr(np, name))

    def empty(shape: Any, dtype: Any = np.float32, order: str = "C") -> EmulatedArray:
        return _device_empty(shape, dtype)

    def zeros(shape: Any, dtype: Any = np.float32, order: str = "C") -> EmulatedArray:
        return _device_empty(shape, dtype, fill=0)

    def empty_like(a: Any, dtype: Any = None) -> EmulatedArray:
        return _device_empty(a.shape, dtype or a.dtype)

    def zeros_like(a: Any, dtype: Any = None) -> EmulatedArray:
        return _device_empty(a.shape, dtype or a.dtype, fill=0)

    def asarray(a: Any, dtype: Any = None, order: Any = None) -> EmulatedArray:
        if isinstance(a, EmulatedArray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return _device_copy(a, dtype)

    def ascontiguousarray(a: Any, dtype: Any = None) -> EmulatedArray:
        if (isinstance(a, EmulatedArray) and a.flags.c_contiguous
                and (dtype is None or np.dtype(dtype) == a.dtype)):
            return a
        return _device_copy(a, dtype)

    m.empty, m.zeros, m.empty_like, m.zeros_like = empty, zeros, empty_like, zeros_like
    m.asarray, m.array, m.ascontiguousarray = asarray, lambda a, dtype=None: _device_copy(a, dtype), ascontiguousarray
    m.shares_memory, m.may_share_memory = np.shares_memory, np.may_share_memory
    cuda = _GraphCudaNamespace() if graphs else _CudaNamespace()
    m.cuda = cuda
    _Device.sm_count = sm_count
    return m


#: Name expressions launched through the emulation in this process, per kernel file.
launched: dict[str, set[str]] = {}
#: Where emulated_function takes the sources from (None: nnfast's kernel directory), and
#: whether it builds one library per instantiation (fast for a few, as for modified copies).
_source_override: dict[str, Any] = {"dir": None, "per_kernel": False}


def emulated_function(file: str, kernel: str) -> "Kernel":
    """The emulated kernel ``kernel`` of ``kernels/<file>``, built with every instantiation of the file."""
    from nnfast.backends import cuda_launch

    directory = _source_override["dir"] or cuda_launch.kernel_dir()
    names = [kernel] if _source_override["per_kernel"] else cuda_launch.name_expressions(file)
    fn = load_module(Path(directory) / file, names, count_accesses=_access_log is not None).get_function(kernel)
    launched.setdefault(file, set()).add(kernel)
    return fn


def build_all_kernel_modules(workers: int | None = None) -> dict[str, Module]:
    """Build every ``kernels/*.cu`` module (in parallel, cached) and load it."""
    from concurrent.futures import ThreadPoolExecutor

    from nnfast.backends import cuda_launch

    files = list(cuda_launch.KERNEL_FILES)
    workers = workers or max(1, min(len(files), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda f: build_module(cuda_launch.kernel_dir() / f, cuda_launch.name_expressions(f)), files))
    return {f: load_module(cuda_launch.kernel_dir() / f, cuda_launch.name_expressions(f)) for f in files}


class emulated_cupy_backend:
    """Context manager: nnfast's real ``CupyBackend`` running on the emulation.

    Inside, the backend's kernel lookup is redirected to :func:`emulated_function`
    and its array module is :func:`make_emulated_cupy`; everything else (launch
    configuration from ``cuda_launch``, argument packing, the bad-label flag) is
    the backend's own code. ``sm_count`` is the multiprocessor count the
    launcher sees: a small one picks the large GEMM tiles for small shapes.
    ``kernel_dir``: take the ``.cu`` sources from this directory (a modified copy of
    ``kernels/``) and build each instantiation on its own when first launched.
    ``graphs``: streams capture CUDA graphs (kernel launches only), so plans that capture do.
    """

    def __init__(self, sm_count: int = 132, kernel_dir: str | os.PathLike | None = None, graphs: bool = False):
        self.sm_count = sm_count
        self.kernel_dir = kernel_dir
        self.graphs = graphs

    def __enter__(self) -> Any:
        from nnfast.backends import cupy_backend

        self._module = cupy_backend
        self._saved = (cupy_backend._function, dict(_source_override))
        if self.kernel_dir is not None:  # a modified copy of kernels/: build only what runs
            _source_override.update(dir=Path(self.kernel_dir), per_kernel=True)
        fake = make_emulated_cupy(self.sm_count, graphs=self.graphs)
        previous = sys.modules.get("cupy")
        sys.modules["cupy"] = fake
        try:
            backend = cupy_backend.CupyBackend()
        finally:
            if previous is None:
                del sys.modules["cupy"]
            else:
                sys.modules["cupy"] = previous
        cupy_backend._function = emulated_function
        self.backend = backend
        return backend

    def __exit__(self, *exc: Any) -> None:
        self._module._function, saved = self._saved
        _source_override.clear()
        _source_override.update(saved)
