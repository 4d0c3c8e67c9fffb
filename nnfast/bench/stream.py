"""The CPU memory limit of a GB/s kernel: the same arrays streamed by a plain loop, at the same size.

A memory-bound kernel is credited ``(reads + writes + 2 updates) n s``
bytes (its op's ``streams``, :class:`~nnfast.op_spec.Benchmark`). Its limit
is the rate of a loop that does nothing but that traffic: read ``reads``
arrays of ``n`` elements, write ``writes`` arrays, read and write back
``updates`` arrays, with ``n`` and the dtype of the case, so that the
working set is the kernel's and sits in the same level of the memory
hierarchy (L2, L3 or DRAM). It is run on every thread (work items taken
dynamically, as the kernels do) and on the calling thread alone; the row's
limit is the faster of the two, since a kernel may run either way. A copy
of one 64 MiB array on one thread is not a limit for a kernel that runs on
every core, or from cache.

The loops are compiled by Numba (cached on disk), one serial and one
parallel per dtype; LLVM vectorises them to full-width loads and stores.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: Elements per work item of the parallel loop (and per pass over the L1-resident sum).
BLOCK = 4096


def describe(streams: tuple[int, int, int]) -> str:
    """``'2R 1W'``, ``'1R 2RW'``: the arrays a pattern reads, writes and updates."""
    reads, writes, updates = streams
    parts = [f"{reads}R" if reads else "", f"{writes}W" if writes else "", f"{updates}RW" if updates else ""]
    return " ".join(p for p in parts if p)


def bytes_per_element(streams: tuple[int, int, int]) -> int:
    """Array passes per element: a read or a write counts once, an update twice."""
    reads, writes, updates = streams
    return reads + writes + 2 * updates


_kernels: dict[str, Any] = {}


def _compile() -> dict[str, Any]:
    """The serial and parallel stream loops (Numba imported only when a limit is measured)."""
    if _kernels:
        return _kernels
    from numba import njit, prange

    from ..backends.numba_kernels._schedule import set_chunksize

    @njit(cache=True, error_model="numpy")
    def block(src, dst, upd, lo, hi, acc):
        # Each array is touched once per element, as in the kernel measured;
        # with several arrays read, their sum goes through acc (in L1).
        m = hi - lo
        if src.shape[0] == 1:
            s0 = src[0, lo:hi]
            for k in range(upd.shape[0]):
                uk = upd[k, lo:hi]
                for i in range(m):
                    uk[i] = s0[i] - uk[i]  # bounded over any number of calls
            for k in range(dst.shape[0]):
                dk = dst[k, lo:hi]
                for i in range(m):
                    dk[i] = s0[i]
            return
        s0 = src[0, lo:hi]
        for i in range(m):
            acc[i] = s0[i]
        for k in range(1, src.shape[0]):
            sk = src[k, lo:hi]
            for i in range(m):
                acc[i] += sk[i]
        for k in range(upd.shape[0]):
            uk = upd[k, lo:hi]
            for i in range(m):
                uk[i] = acc[i] - uk[i]
        for k in range(dst.shape[0]):
            dk = dst[k, lo:hi]
            for i in range(m):
                dk[i] = acc[i]

    @njit(cache=True, error_model="numpy")
    def serial(src, dst, upd):
        n = src.shape[1]
        acc = np.empty(BLOCK, src.dtype)
        for lo in range(0, n, BLOCK):
            block(src, dst, upd, lo, min(n, lo + BLOCK), acc)

    @njit(parallel=True, cache=True, error_model="numpy")
    def parallel(src, dst, upd):
        n = src.shape[1]
        outer = set_chunksize(1)
        for c in prange((n + BLOCK - 1) // BLOCK):
            acc = np.empty(BLOCK, src.dtype)
            block(src, dst, upd, c * BLOCK, min(n, (c + 1) * BLOCK), acc)
        set_chunksize(outer)

    _kernels.update(serial=serial, parallel=parallel)
    return _kernels


def stream_arrays(streams: tuple[int, int, int], n: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays a pattern streams, one per row: (read, written, updated), ``n`` elements each.

    Every pattern reads at least one array (``streams[0] >= 1``).
    """
    reads, writes, updates = streams
    if reads < 1:
        raise ValueError(f"streams: expected at least one array read, got {streams}")
    rng = np.random.default_rng(2)
    return (rng.standard_normal((reads, n)).astype(dtype), np.empty((writes, n), dtype),
            rng.standard_normal((updates, n)).astype(dtype))


def stream(src: np.ndarray, dst: np.ndarray, upd: np.ndarray, threads: str) -> None:
    """One pass: every row of ``dst`` = the sum of the rows of ``src``, every row of ``upd`` = that sum - itself.

    ``threads``: ``"all"`` (every Numba thread) or ``"one"`` (the calling thread).
    """
    _compile()["parallel" if threads == "all" else "serial"](src, dst, upd)


def make_stream(streams: tuple[int, int, int], n: int, dtype: str, threads: str) -> Callable[[], Any]:
    """A call that streams the pattern over new arrays of ``n`` elements (see :func:`stream`)."""
    src, dst, upd = stream_arrays(streams, n, dtype)
    kernel = _compile()["parallel" if threads == "all" else "serial"]
    return lambda: kernel(src, dst, upd)
