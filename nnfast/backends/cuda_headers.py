"""The CUDA headers NVRTC does not bring: ``mma.h`` (``nvcuda::wmma``) for the tensor-core GEMM.

Every ``kernels/*.cu`` file compiles with NVRTC alone, except
``kernels/linear_tf32.cu`` (matmul precision ``"high"``), which includes
``<mma.h>``; that header and the ``crt/mma.h``, ``cuda_fp16.h`` and
``cuda_bf16.h`` it includes come with a CUDA toolkit, or with pip wheels:
``nvidia-cuda-runtime`` and ``nvidia-cuda-crt`` (CUDA 13, one
``nvidia/cu13/include``), ``nvidia-cuda-runtime-cu12`` and
``nvidia-cuda-nvcc-cu12`` (CUDA 12, two directories). :func:`mma_include_dirs`
finds them; nothing here imports CuPy.
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path

from ..errors import BackendError

#: What the tensor-core GEMM's ``#include <mma.h>`` needs on the include path.
NEEDED = ("mma.h", "crt/mma.h", "cuda_fp16.h")

INSTALL_HINT = ('pip install nvidia-cuda-runtime nvidia-cuda-crt (CUDA 13 headers: the "cuda13" extra brings '
                'them), pip install nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 (CUDA 12: the "cuda12" and '
                '"test" extras), or set CUDA_PATH to a CUDA toolkit')


def _wheel_roots() -> list[Path]:
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels
    except ImportError:
        return []
    return [Path(p) for p in getattr(nvidia, "__path__", [])]


def candidates() -> list[tuple[Path, ...]]:
    """Include-directory sets to try, in order: ``$CUDA_PATH`` / ``$CUDA_HOME``, the pip wheels,
    ``/usr/local/cuda`` and the versioned toolkits beside it (newest first)."""
    found: list[tuple[Path, ...]] = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            found.append((Path(os.environ[var]) / "include",))
    for root in _wheel_roots():
        found += [(root / "cu13" / "include",), (root / "cu12" / "include",),
                  (root / "cuda_runtime" / "include", root / "cuda_nvcc" / "include")]
    found.append((Path("/usr/local/cuda/include"),))
    found += [(Path(p),) for p in sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)]
    return found


def _complete(dirs: tuple[Path, ...]) -> bool:
    return all(any((d / name).is_file() for d in dirs) for name in NEEDED)


@functools.lru_cache(maxsize=1)
def mma_include_dirs() -> tuple[str, ...]:
    """The include directories that hold :data:`NEEDED`; ``BackendError`` saying what to install if none do."""
    tried = candidates()
    for dirs in tried:
        if _complete(dirs):
            return tuple(str(d) for d in dirs)
    looked = "; ".join(" + ".join(str(d) for d in dirs) for dirs in tried)
    raise BackendError(f"matmul precision 'high' compiles tensor-core kernels that include <mma.h>, but no "
                       f"directory holds {', '.join(NEEDED)} (looked in: {looked}); install them with: "
                       f"{INSTALL_HINT}")


__all__ = ["INSTALL_HINT", "NEEDED", "candidates", "mma_include_dirs"]
