"""The threading layer of the parallel kernels: TBB, from the ``tbb`` wheel, when it loads.

Why TBB. Numba runs a ``prange`` loop on one of three threading layers.
With OpenMP (GNU libgomp, Numba's pick when TBB is missing) and with its own
``workqueue``, the iteration space is split statically, one piece per
thread, and the region ends at a barrier that every thread must reach. On a
machine where another process keeps one core busy, the thread on that core
gets a time slice now and then, and every parallel region waits for it:
measured on 2 cores with a spinning process pinned to one of them, the ReLU
of 1024x4096 and the softmax cross-entropy of 4096x1000 went from 0.4 and
1.7 ms to 8 ms per call (a scheduler tick or two), slower than one thread.
TBB's ``parallel_for`` is work stealing: the calling thread runs whatever
part of the range no worker has taken, so a late worker slows a region down
by the share of the work it actually holds, never stops it. The same
measurement kept 0.6-1.0x of the quiet speed. The kernels also cut their
loops into many small work items (:func:`numba.set_parallel_chunksize`), so
a slow thread holds a small piece. TBB is thread safe (kernels may be called
from several Python threads) and fork safe.

The cost: TBB's workers sleep soon after a region, and waking them takes
about 10 us, against ~3 us for OpenMP's spinning threads. The kernels
therefore run small inputs on the calling thread (their ``PARALLEL_MIN``).

How. Numba tries TBB first, but looks for ``libtbb.so.12`` on the dynamic
loader's path, and pip's ``tbb`` wheel installs it in ``<prefix>/lib``,
which is not on it. Loading the library by its full path first, with
``RTLD_GLOBAL``, lets Numba's own lookup find it. ``NUMBA_THREADING_LAYER``
set by the user still decides (Numba reads it); where ``tbb`` is missing or
does not load, Numba falls back to OpenMP or ``workqueue`` as usual, and
the kernels stay correct, only less steady on a busy machine.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

_log = logging.getLogger("nnfast")

#: The TBB runtime Numba links against, per platform.
_LIBRARY = {"linux": "libtbb.so.12", "win32": "tbb12.dll", "darwin": "libtbb.12.dylib"}.get(sys.platform)


def _wheel_library() -> Path | None:
    """The TBB runtime installed by the ``tbb`` package, if any."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("tbb")
    except PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == _LIBRARY:
            path = Path(dist.locate_file(file)).resolve()
            if path.is_file():
                return path
    return None


def preload_tbb() -> str | None:
    """Make the ``tbb`` wheel's runtime visible to Numba; the path loaded, or None.

    Does nothing when Numba's threads are already running (the layer is
    chosen then) or when TBB is already loadable by name.
    """
    if _LIBRARY is None:
        return None
    try:
        from numba.np.ufunc import parallel
    except ImportError:  # pragma: no cover - a Numba without the threading layers
        return None
    if getattr(parallel, "_is_initialized", False):
        return None
    try:
        ctypes.CDLL(_LIBRARY)
        return _LIBRARY
    except OSError:
        pass
    path = _wheel_library()
    if path is None:
        _log.debug("numba threading layer: no TBB runtime found; Numba picks OpenMP or workqueue")
        return None
    try:
        mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0)
        ctypes.CDLL(str(path), mode=mode)
    except OSError as err:
        _log.debug("numba threading layer: cannot load %s (%s)", path, err)
        return None
    return str(path)


def current() -> str:
    """The threading layer in use, or the one Numba will try first when no parallel kernel has run yet."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return f"not started ({numba.config.THREADING_LAYER})"
