"""Compiling the CUDA kernels: one instantiation at a time, cached on disk, warmed up in parallel.

A launch needs one template instantiation (a name expression, e.g.
``gemm<float, 128, 128, 8, 32, 64, 4, false, false, 1, true>``) of one
``kernels/<file>.cu``. NVRTC compiles exactly that instantiation the first
time a process needs it -- 0.05 to 0.8 s each, where the 190 instantiations of
``linear.cu`` compiled as one module took 30 to 45 s -- so a training run
compiles only the kernels it launches. The binary (a cubin for the device's
architecture; PTX for the driver to finish where this NVRTC does not know the
architecture) and the kernel's lowered (mangled) name go to a disk cache keyed
by everything the compile depends on: the source with its headers inlined,
the options, the architecture, the NVRTC version and the name expression. A
later process loads it in milliseconds.

The cache is nnfast's own, not CuPy's: CuPy reads modules compiled from name
expressions back from its disk cache only in its newest releases (older ones
recompile them in every process), and it compiles inside a CUDA context.
This cache is filled by NVRTC alone, so :func:`warm_up` compiles many
instantiations at once in worker processes that need no GPU, and can fill
the cache of a machine before its GPU is used.

Environment: ``NNFAST_KERNEL_CACHE``, the cache directory (default
``$XDG_CACHE_HOME/nnfast/kernels``, else ``~/.cache/nnfast/kernels``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import cuda_launch

#: NVRTC options added to each file's own (:func:`cuda_launch.compile_options`): the two CuPy's
#: RawModule adds (flush denormals to zero; functions without a space qualifier are device
#: functions), kept so the kernels compile and round exactly as they did when CuPy compiled them.
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def options(file: str) -> tuple[str, ...]:
    """NVRTC options of ``kernels/<file>`` (the architecture aside)."""
    return (*cuda_launch.compile_options(file), *CUPY_OPTIONS)

_FORMAT = "1"  # bump when what a cache entry holds changes


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel; the message holds its log."""


def cache_dir() -> Path:
    """The directory of compiled kernels (created on first use)."""
    env = os.environ.get("NNFAST_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nnfast" / "kernels"


def _nvrtc() -> Any:
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())  # type: ignore[return-value]


def arch_for(compute_capability: int | str) -> str:
    """NVRTC's ``-arch`` for a device: its own cubin when NVRTC knows the architecture,
    else PTX of the newest one it knows below it (the driver compiles that for the device)."""
    cc = int(compute_capability)
    supported = [int(a) for a in _nvrtc().getSupportedArchs()]
    if cc in supported:
        return f"sm_{cc}"
    older = [a for a in supported if a <= cc]
    if not older:
        raise KernelCompileError(f"this NVRTC {nvrtc_version()} cannot compile for compute capability {cc} "
                                 f"(it supports {supported})")
    return f"compute_{max(older)}"


@functools.lru_cache(maxsize=None)
def _source(file: str) -> str:
    return cuda_launch.load_source(file)


@functools.lru_cache(maxsize=None)
def _file_of_name() -> dict[str, str]:
    return {name: file for file, names in cuda_launch.all_name_expressions().items() for name in names}


def kernel_file(name: str) -> str:
    """The ``kernels/*.cu`` file that has instantiation ``name``."""
    try:
        return _file_of_name()[name]
    except KeyError:
        raise ValueError(f"names: {name!r} is not an instantiation of any kernels/*.cu file "
                         "(see nnfast.backends.cuda_launch.name_expressions)") from None


@dataclass(frozen=True)
class Compiled:
    """One instantiation in the cache: the binary's path and the name to look the kernel up by."""

    path: Path
    lowered: str


def _entry(file: str, name: str, arch: str) -> tuple[Path, Path]:
    h = hashlib.sha256()
    for part in (_FORMAT, repr(nvrtc_version()), arch, "\0".join(options(file)), file, name, _source(file)):
        h.update(part.encode())
        h.update(b"\0")
    stem = cache_dir() / h.hexdigest()[:32]
    return stem.with_suffix(".cubin" if arch.startswith("sm_") else ".ptx"), stem.with_suffix(".name")


def cached(file: str, name: str, arch: str) -> Compiled | None:
    """The cache entry of an instantiation, or None when it has not been compiled yet."""
    image, lowered = _entry(file, name, arch)
    try:
        return Compiled(image, lowered.read_text(encoding="utf-8"))  # written last: the image is complete
    except OSError:
        return None


def compile_kernel(file: str, name: str, arch: str) -> Compiled:
    """Instantiation ``name`` of ``kernels/<file>`` for ``arch``, compiled unless cached."""
    hit = cached(file, name, arch)
    if hit is not None:
        return hit
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(_source(file), file, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options(file)])
        except nvrtc.NVRTCError as err:
            raise KernelCompileError(f"NVRTC failed on {name} of {file} for {arch}: {err}\n"
                                     f"{nvrtc.getProgramLog(prog)}") from None
        image = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        lowered = nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)
    if isinstance(image, str):
        image = image.encode()
    image_path, name_path = _entry(file, name, arch)
    _write_atomically(image_path, image)
    _write_atomically(name_path, lowered.encode("utf-8"))
    return Compiled(image_path, lowered)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: processes compiling at once never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ warm-up
def device_arch() -> str:
    """``-arch`` for the current CUDA device (needs CuPy and a GPU)."""
    import cupy

    return arch_for(cupy.cuda.Device().compute_capability)


def _resolve(names: Iterable[str | tuple[str, str]] | None) -> list[tuple[str, str]]:
    if names is None:
        return [(f, n) for f, ns in cuda_launch.all_name_expressions().items() for n in ns]
    if isinstance(names, str):
        raise TypeError("names: expected a list of name expressions (or None for all), got a str")
    out = []
    for item in names:
        if isinstance(item, tuple):
            file, name = item
            if name not in cuda_launch.name_expressions(file):
                raise ValueError(f"names: {name!r} is not an instantiation of kernels/{file}")
            out.append((file, name))
        else:
            out.append((kernel_file(item), item))
    return list(dict.fromkeys(out))


def warm_up(names: Iterable[str | tuple[str, str]] | None = None, *, processes: int | None = None,
            arch: str | None = None) -> dict[str, Any]:
    """Compile kernels into the disk cache ahead of their first launch, in parallel processes.

    ``names``: name expressions (``"sgd_multi<float>"``) or ``(file, name)``
    pairs; None compiles every instantiation of every ``kernels/*.cu``.
    ``processes``: worker processes (default: the CPU count; 1 compiles in
    this process). ``arch``: NVRTC's target, e.g. ``"sm_90"`` (default: the
    current device's, see :func:`arch_for`), so a machine without a GPU can
    fill a cache for one that has it. Workers are fresh interpreters
    (``python -m nnfast.backends.cuda_compile``): no CUDA context, nothing
    re-imported from the caller's script.

    Returns ``{"arch", "kernels", "compiled", "cached", "seconds"}``. Raises
    :class:`KernelCompileError` (with NVRTC's log) when a kernel fails.
    """
    began = time.perf_counter()
    todo = _resolve(names)
    arch = arch or device_arch()
    missing = [fn for fn in todo if cached(*fn, arch) is None]
    processes = max(1, int(processes or os.cpu_count() or 1))
    if processes == 1 or len(missing) <= 1:
        for file, name in missing:
            compile_kernel(file, name, arch)
    else:
        # The GEMMs take ten times longer than the rest: start them first, spread over small batches.
        missing.sort(key=lambda fn: not fn[1].startswith("gemm<"))
        batches = [missing[i::processes * 4] for i in range(min(len(missing), processes * 4))]
        with concurrent.futures.ThreadPoolExecutor(processes) as pool:
            list(pool.map(lambda batch: _compile_in_worker(batch, arch), batches))
    return {"arch": arch, "kernels": len(todo), "compiled": len(missing), "cached": len(todo) - len(missing),
            "seconds": time.perf_counter() - began}


def _compile_in_worker(batch: list[tuple[str, str]], arch: str) -> None:
    env = dict(os.environ, NNFAST_KERNEL_CACHE=str(cache_dir()))
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-m", __name__], input=json.dumps({"arch": arch, "kernels": batch}),
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise KernelCompileError(result.stderr.strip()[-20000:] or f"compile worker exited {result.returncode}")


def _worker_main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        for file, name in request["kernels"]:
            compile_kernel(file, name, request["arch"])
    except KernelCompileError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


__all__ = ["CUPY_OPTIONS", "Compiled", "KernelCompileError", "arch_for", "cache_dir", "cached", "compile_kernel",
           "device_arch", "kernel_file", "options", "warm_up"]

if __name__ == "__main__":
    sys.exit(_worker_main())
