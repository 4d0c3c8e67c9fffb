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

#: Elements per pass over the L1-resident sum.
BLOCK = 4096
#: Elements per work item of the parallel loop (as many as the kernels' element-wise chunks).
ITEM = 8 * BLOCK


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
    def fused(src, dst, upd, lo, hi):
        # The patterns of the op table in one pass each, as their kernels
        # run (one pass has more misses in flight than several would); False
        # for any other pattern.
        r, w, u = src.shape[0], dst.shape[0], upd.shape[0]
        s0 = src[0, lo:hi]
        if r == 1 and w == 1 and u == 0:
            d0 = dst[0, lo:hi]
            for i in range(s0.size):
                d0[i] = s0[i]
        elif r == 2 and w == 1 and u == 0:
            s1, d0 = src[1, lo:hi], dst[0, lo:hi]
            for i in range(s0.size):
                d0[i] = s0[i] + s1[i]
        elif r == 1 and w == 0 and u == 2:  # bounded over any number of calls
            u0, u1 = upd[0, lo:hi], upd[1, lo:hi]
            for i in range(s0.size):
                u0[i] = s0[i] - u0[i]
                u1[i] = s0[i] - u1[i]
        elif r == 1 and w == 0 and u == 3:
            u0, u1, u2 = upd[0, lo:hi], upd[1, lo:hi], upd[2, lo:hi]
            for i in range(s0.size):
                u0[i] = s0[i] - u0[i]
                u1[i] = s0[i] - u1[i]
                u2[i] = s0[i] - u2[i]
        else:
            return False
        return True

    @njit(cache=True, error_model="numpy")
    def block(src, dst, upd, lo, hi, acc):
        # Any other pattern, a pass per array: the sum of the arrays read goes
        # through acc, which stays in L1.
        m = hi - lo
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
    def span(src, dst, upd, lo, hi):
        if fused(src, dst, upd, lo, hi):
            return
        acc = np.empty(BLOCK, src.dtype)
        for b in range(lo, hi, BLOCK):
            block(src, dst, upd, b, min(hi, b + BLOCK), acc)

    @njit(cache=True, error_model="numpy")
    def serial(src, dst, upd):
        n = src.shape[1]
        for lo in range(0, n, ITEM):
            span(src, dst, upd, lo, min(n, lo + ITEM))

    @njit(parallel=True, cache=True, error_model="numpy")
    def parallel(src, dst, upd):
        n = src.shape[1]
        outer = set_chunksize(1)
        for c in prange((n + ITEM - 1) // ITEM):
            span(src, dst, upd, c * ITEM, min(n, (c + 1) * ITEM))
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
