"""``NNFAST_NUM_THREADS``: the cap on the CPU kernels' threads; the TBB thread pool for Numba."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Callable

from ..errors import BackendError


def apply_num_threads(setter: Callable[[int], None], maximum: int) -> int:
    """Apply ``NNFAST_NUM_THREADS`` (capped at ``maximum``) through ``setter``; return the count."""
    raw = os.environ.get("NNFAST_NUM_THREADS", "").strip()
    if not raw:
        return maximum
    try:
        count = int(raw)
    except ValueError:
        raise BackendError(f"NNFAST_NUM_THREADS: expected a positive integer, got {raw!r}") from None
    if count < 1:
        raise BackendError(f"NNFAST_NUM_THREADS: expected a positive integer, got {raw!r}")
    count = min(count, maximum)
    setter(count)
    return count


def load_pip_tbb() -> str | None:
    """Make the TBB library that pip installed next to Python visible to Numba; returns its path.

    Numba's parallel regions run on the first threading layer it can load:
    TBB, then OpenMP, then its own work queue. Under contention (another
    process busy on a core) TBB keeps its speed -- a worker that has not
    started yet is not waited for, the calling thread takes its share -- while
    the OpenMP barrier waits for every thread at every region (a fused step of
    nine regions measured 10-50x slower than on one thread on a loaded 2-core
    machine; TBB: 0.6-1.4x). The ``tbb`` wheel puts ``libtbb.so.12`` in
    ``<prefix>/lib``, which the dynamic loader does not search, so Numba would
    fall back to OpenMP; loading it here first (by its file name) lets Numba's
    own lookup find it. Nothing is done when ``NUMBA_THREADING_LAYER`` names
    another layer, or where there is no such library.
    """
    layer = os.environ.get("NUMBA_THREADING_LAYER", "default").strip().lower()
    if layer not in ("", "default", "tbb", "safe", "threadsafe") or not sys.platform.startswith("linux"):
        return None
    for lib in sorted(Path(sys.prefix, "lib").glob("libtbb.so.12*")):
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return str(lib)
    return None
