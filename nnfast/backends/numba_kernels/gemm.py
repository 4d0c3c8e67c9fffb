"""Packed, cache-blocked, register-blocked GEMM with a fused bias + activation epilogue.

``C = act(op(A) @ op(B) + bias)`` where ``op(X)`` is ``X`` or ``X.T``: the
transposed operands of the linear backward (``dW = x.T @ dz``,
``dx = dz @ W.T``) are read in place by the packing routines, never copied
into a transposed array.

Structure (the GotoBLAS / BLIS loop nest)::

    for each task (columns jc:jc+NC of C, x a row group)  <- prange over tasks
      for pc in K, step KC:
        pack op(B)[pc:pc+KC, jc:jc+NC] -> Bp     (KC x NR micro-panels, once per task)
        for ic in the task's rows, step MC:
          pack op(A)[ic:ic+MC, pc:pc+KC] -> Ap   (MR x KC micro-panels)
          for each NR-wide B micro-panel:        <- stays in L1 (KC*NR*4 = 16 KB)
            for each MR-tall A micro-panel:      <- the A block stays in L2
              micro-kernel: MR x NR tile = Ap_panel @ Bp_panel (+ C of earlier pc)
              epilogue (last pc only): + bias, keep z, act, store

* **Packing** copies each operand block once into a contiguous buffer laid out
  in exactly the order the micro-kernel reads it (``Ap[p*MR + r]``,
  ``Bp[p*NR + c]``), so the K loop streams two unit-stride arrays and every
  cache line fetched is fully used. Edge panels are zero-padded to MR / NR,
  so the micro-kernel never branches on the matrix edge; only the epilogue
  stores a partial tile. B is packed row by row with vector copies (each
  row segment read once, sequentially).
* **Epilogue**: a full tile with no activation or ReLU is finished in
  registers (``+ C`` of earlier K blocks, ``+ bias``, ``max(., 0)``) and
  stored straight into C, with the C lines prefetched (``prefetchw``) before
  the K loop. Other activations (and edge tiles) go through a scratch tile
  and the activation's vectorised loop (:mod:`.activations`, called through
  its address, so this GEMM is compiled once per dtype for every
  activation), a tile at a time while it is in L1.
* **Micro-kernel**: MR = 6 rows x NR = two SIMD vectors (16 float32 or 8
  float64). The 12 accumulators are explicit ``ymm`` values (see
  :mod:`._simd`); per K step it loads two B vectors, broadcasts six A values
  and issues 12 ``vfmadd231ps``. 12 accumulators + 2 B + 1 broadcast = 15
  of the 16 ``ymm`` registers, enough independent FMAs to cover the FMA
  latency (4 cycles x 2 ports). It takes raw data pointers, not arrays, so
  a call costs no atomic reference-count updates (which also spilled the
  accumulators around the runtime calls).
* **Blocking**: KC = 256 (a B micro-panel, 16 KB, sits in the 32 KB L1),
  MC = 120 (the A block, 120 KB, sits in the L2), NC = 512 (the B block,
  512 KB, in L2/L3). Block sizes are shrunk to split M, N, K evenly.
* **Threads**: ``prange`` over tasks, each a column block of C (times a row
  group when N alone gives too few blocks). A task packs each B block once
  and reuses it for all its rows, so packing B costs O(K N) in total, not
  O(K N M / MC). Each thread packs into its own slice of a workspace
  allocated once per thread and dtype (no allocation and no page faults per
  call). Small products run serially (a thread launch costs more).

No ``np.dot`` / BLAS is called. FMA contraction changes rounding by at most
one ulp per product versus separate multiply-add; float64 results agree with
NumPy to ~1e-15 relative, well inside the rtol 1e-10 contract.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

from ._calls import call_forward, ptr_at
from ._simd import addr, prefetch, vadd, vbroadcast, vfma, vlanes, vload, vrelu, vstore, vzero
from .activations import forward_kernel

#: Rows of the register tile.
MR = 6
#: K block: a KC x NR micro-panel of B fits in L1.
KC = 256
#: M block (a multiple of MR): an MC x KC block of A fits in L2.
MC = 120
#: N block (a multiple of 16 and 8): a KC x NC block of B fits in L2/L3.
NC = 512
#: Below this many multiply-adds a product runs on the calling thread.
PARALLEL_MIN_MACS = 1 << 21


@njit(cache=True)
def _nr(a):
    """Columns of the register tile for ``a``'s dtype: two 256-bit vectors."""
    return 64 // a.itemsize


@njit(cache=True, error_model="numpy")
def _micro(kc, Ap, aoff, Bp, boff, T, Cf, coff, ldc, direct, acc_c, bias, jb, relu):
    """One MR x NR tile: ``Ap[aoff:]`` (MR x kc panel) @ ``Bp[boff:]`` (kc x NR panel).

    The accumulator tile lives in 12 SIMD registers for the whole K loop.
    Then either (``direct``, a full tile) it is finished in registers and
    stored straight into C (flat ``Cf``, row stride ``ldc``, tile origin
    ``coff``): ``+= C`` when ``acc_c`` (a later K block), ``+ bias[jb:]`` when
    ``jb >= 0``, ReLU when ``relu``; or it is stored to the scratch tile ``T``
    for :func:`_store_tile` (edge tiles and the other activations).

    Every buffer is a data pointer (:func:`._simd.addr`), not an array: no
    reference counting around the call.
    """
    h = vlanes(T)
    c00 = vzero(T)
    c01 = vzero(T)
    c10 = vzero(T)
    c11 = vzero(T)
    c20 = vzero(T)
    c21 = vzero(T)
    c30 = vzero(T)
    c31 = vzero(T)
    c40 = vzero(T)
    c41 = vzero(T)
    c50 = vzero(T)
    c51 = vzero(T)
    if direct:
        # The C tile is touched only after the K loop: start fetching it now.
        for r in range(MR):
            prefetch(Cf, coff + r * ldc)
            prefetch(Cf, coff + r * ldc + 2 * h - 1)
    pa = aoff
    pb = boff
    for _ in range(kc):
        b0 = vload(Bp, pb)
        b1 = vload(Bp, pb + h)
        a = vbroadcast(Ap, pa)
        c00 = vfma(a, b0, c00)
        c01 = vfma(a, b1, c01)
        a = vbroadcast(Ap, pa + 1)
        c10 = vfma(a, b0, c10)
        c11 = vfma(a, b1, c11)
        a = vbroadcast(Ap, pa + 2)
        c20 = vfma(a, b0, c20)
        c21 = vfma(a, b1, c21)
        a = vbroadcast(Ap, pa + 3)
        c30 = vfma(a, b0, c30)
        c31 = vfma(a, b1, c31)
        a = vbroadcast(Ap, pa + 4)
        c40 = vfma(a, b0, c40)
        c41 = vfma(a, b1, c41)
        a = vbroadcast(Ap, pa + 5)
        c50 = vfma(a, b0, c50)
        c51 = vfma(a, b1, c51)
        pa += MR
        pb += 2 * h
    if not direct:
        nr = 2 * h
        vstore(T, 0, c00)
        vstore(T, h, c01)
        vstore(T, nr, c10)
        vstore(T, nr + h, c11)
        vstore(T, 2 * nr, c20)
        vstore(T, 2 * nr + h, c21)
        vstore(T, 3 * nr, c30)
        vstore(T, 3 * nr + h, c31)
        vstore(T, 4 * nr, c40)
        vstore(T, 4 * nr + h, c41)
        vstore(T, 5 * nr, c50)
        vstore(T, 5 * nr + h, c51)
        return
    r0 = coff
    r1 = r0 + ldc
    r2 = r1 + ldc
    r3 = r2 + ldc
    r4 = r3 + ldc
    r5 = r4 + ldc
    if acc_c:
        c00 = vadd(c00, vload(Cf, r0))
        c01 = vadd(c01, vload(Cf, r0 + h))
        c10 = vadd(c10, vload(Cf, r1))
        c11 = vadd(c11, vload(Cf, r1 + h))
        c20 = vadd(c20, vload(Cf, r2))
        c21 = vadd(c21, vload(Cf, r2 + h))
        c30 = vadd(c30, vload(Cf, r3))
        c31 = vadd(c31, vload(Cf, r3 + h))
        c40 = vadd(c40, vload(Cf, r4))
        c41 = vadd(c41, vload(Cf, r4 + h))
        c50 = vadd(c50, vload(Cf, r5))
        c51 = vadd(c51, vload(Cf, r5 + h))
    if jb >= 0:
        b0 = vload(bias, jb)
        b1 = vload(bias, jb + h)
        c00 = vadd(c00, b0)
        c01 = vadd(c01, b1)
        c10 = vadd(c10, b0)
        c11 = vadd(c11, b1)
        c20 = vadd(c20, b0)
        c21 = vadd(c21, b1)
        c30 = vadd(c30, b0)
        c31 = vadd(c31, b1)
        c40 = vadd(c40, b0)
        c41 = vadd(c41, b1)
        c50 = vadd(c50, b0)
        c51 = vadd(c51, b1)
    if relu:
        c00 = vrelu(c00)
        c01 = vrelu(c01)
        c10 = vrelu(c10)
        c11 = vrelu(c11)
        c20 = vrelu(c20)
        c21 = vrelu(c21)
        c30 = vrelu(c30)
        c31 = vrelu(c31)
        c40 = vrelu(c40)
        c41 = vrelu(c41)
        c50 = vrelu(c50)
        c51 = vrelu(c51)
    vstore(Cf, r0, c00)
    vstore(Cf, r0 + h, c01)
    vstore(Cf, r1, c10)
    vstore(Cf, r1 + h, c11)
    vstore(Cf, r2, c20)
    vstore(Cf, r2 + h, c21)
    vstore(Cf, r3, c30)
    vstore(Cf, r3 + h, c31)
    vstore(Cf, r4, c40)
    vstore(Cf, r4 + h, c41)
    vstore(Cf, r5, c50)
    vstore(Cf, r5 + h, c51)


@njit(cache=True, error_model="numpy")
def _pack_a(A, trans, i0, mc, p0, kc, Ap):
    """Ap[(ip*kc + p)*MR + r] = op(A)[i0 + ip*MR + r, p0 + p], rows past mc zeroed."""
    for ip in range((mc + MR - 1) // MR):
        base = ip * kc * MR
        rows = min(MR, mc - ip * MR)
        if trans:  # op(A)[i, p] = A[p, i]: read rows of A, MR at a time
            for p in range(kc):
                src = A[p0 + p]
                dst = base + p * MR
                for r in range(rows):
                    Ap[dst + r] = src[i0 + ip * MR + r]
                for r in range(rows, MR):
                    Ap[dst + r] = 0
        else:
            for r in range(rows):
                src = A[i0 + ip * MR + r, p0:p0 + kc]
                for p in range(kc):
                    Ap[base + p * MR + r] = src[p]
            for r in range(rows, MR):
                for p in range(kc):
                    Ap[base + p * MR + r] = 0


@njit(cache=True, error_model="numpy")
def _pack_b(B, trans, p0, kc, j0, nc, Bp):
    """Bp[(jp*kc + p)*NR + c] = op(B)[p0 + p, j0 + jp*NR + c], columns past nc zeroed."""
    NR = _nr(Bp)
    h = NR // 2
    full = nc // NR  # panels without padding
    if trans:  # op(B)[p, j] = B[j, p]: read rows of B, write with stride NR
        for jp in range((nc + NR - 1) // NR):
            base = jp * kc * NR
            cols = min(NR, nc - jp * NR)
            for c in range(cols):
                src = B[j0 + jp * NR + c, p0:p0 + kc]
                for p in range(kc):
                    Bp[base + p * NR + c] = src[p]
            for c in range(cols, NR):
                for p in range(kc):
                    Bp[base + p * NR + c] = 0
        return
    # Row by row: each row segment of B is read once, sequentially, and its
    # 16-float (two-vector) pieces are scattered to the panels.
    ldb = B.shape[1]
    Bf = B.reshape(B.size)
    for p in range(kc):
        src = (p0 + p) * ldb + j0
        for jp in range(full):
            dst = (jp * kc + p) * NR
            vstore(Bp, dst, vload(Bf, src + jp * NR))
            vstore(Bp, dst + h, vload(Bf, src + jp * NR + h))
        if full * NR < nc:
            dst = (full * kc + p) * NR
            cols = nc - full * NR
            for c in range(cols):
                Bp[dst + c] = Bf[src + full * NR + c]
            for c in range(cols, NR):
                Bp[dst + c] = 0


@njit(cache=True, error_model="numpy")
def _store_tile(T, C, ci, cj, mr, nr, first, last, bias, has_bias, act, alpha, Z, save_z):
    """Write the valid mr x nr part of the tile: accumulate over K blocks, and on
    the last one add the bias, keep the pre-activation if asked, apply the
    activation whose forward loop is at address ``act`` (0: none)."""
    NR = _nr(T)
    for i in range(mr):
        crow = C[ci + i, cj:cj + nr]
        t = T[i * NR:i * NR + nr]
        if not first:
            for j in range(nr):
                t[j] += crow[j]
        if last and has_bias:
            b = bias[cj:cj + nr]
            for j in range(nr):
                t[j] += b[j]
        if last and save_z:
            zrow = Z[ci + i, cj:cj + nr]
            for j in range(nr):
                zrow[j] = t[j]
    src = 0
    if last and act != 0:
        # The whole tile at once (padding included, then dropped) with the
        # activation's vectorised loop, into the second half of the scratch
        # (in place, LLVM's overlap check would fall back to scalar code).
        src = MR * NR
        pT = addr(T)
        call_forward(act, pT, ptr_at(pT, src), src, alpha)
    for i in range(mr):
        crow = C[ci + i, cj:cj + nr]
        t = T[src + i * NR:src + i * NR + nr]
        for j in range(nr):
            crow[j] = t[j]


@njit(cache=True, error_model="numpy")
def _task(t, A, ta, B, tb, C, bias, has_bias, act, relu, alpha, Z, save_z, Ap, Bp, T,
          K, mcb, ncb, kcb, nnb, mg):
    """One task: columns ``[jc, jc + ncb)`` of C for the rows ``[m0, m0 + mg)``.

    The B block of each K step is packed once and reused for every M block
    of the task; an A block is packed per (M block, K step).
    """
    M, N = C.shape
    NR = _nr(T)
    pA = addr(Ap)
    pB = addr(Bp)
    pT = addr(T)
    pC = addr(C)
    pbias = addr(bias)
    m0 = (t // nnb) * mg
    m1 = min(M, m0 + mg)
    jc = (t % nnb) * ncb
    nc = min(ncb, N - jc)
    nkb = (K + kcb - 1) // kcb
    for kb in range(nkb):
        pc = kb * kcb
        kc = min(kcb, K - pc)
        first = kb == 0
        last = kb == nkb - 1
        # Full tiles finish in registers unless the epilogue needs the scalar path.
        fast_epilogue = not last or (not save_z and (act == 0 or relu))
        _pack_b(B, tb, pc, kc, jc, nc, Bp)
        for ic in range(m0, m1, mcb):
            mc = min(mcb, m1 - ic)
            _pack_a(A, ta, ic, mc, pc, kc, Ap)
            for jp in range((nc + NR - 1) // NR):
                nr = min(NR, nc - jp * NR)
                j = jc + jp * NR
                jb = j if (last and has_bias) else -1
                for ip in range((mc + MR - 1) // MR):
                    mr = min(MR, mc - ip * MR)
                    i = ic + ip * MR
                    if fast_epilogue and mr == MR and nr == NR:
                        _micro(kc, pA, ip * MR * kc, pB, jp * NR * kc, pT, pC, i * N + j, N,
                               True, not first, pbias, jb, last and relu)
                    else:
                        _micro(kc, pA, ip * MR * kc, pB, jp * NR * kc, pT, pC, 0, N,
                               False, False, pbias, -1, False)
                        _store_tile(T, C, i, j, mr, nr, first, last,
                                    bias, has_bias, act, alpha, Z, save_z)


@njit(parallel=True, cache=True, error_model="numpy")
def _gemm_parallel(A, ta, B, tb, C, bias, has_bias, act, relu, alpha, Z, save_z, wsA, wsB, wsT,
                   K, mcb, ncb, kcb, nnb, mg, ntasks):
    for t in prange(ntasks):
        tid = numba.get_thread_id()
        _task(t, A, ta, B, tb, C, bias, has_bias, act, relu, alpha, Z, save_z,
              wsA[tid], wsB[tid], wsT[tid], K, mcb, ncb, kcb, nnb, mg)


@njit(cache=True, error_model="numpy")
def _gemm_serial(A, ta, B, tb, C, bias, has_bias, act, relu, alpha, Z, save_z, wsA, wsB, wsT,
                 K, mcb, ncb, kcb, nnb, mg, ntasks):
    for t in range(ntasks):
        _task(t, A, ta, B, tb, C, bias, has_bias, act, relu, alpha, Z, save_z,
              wsA[0], wsB[0], wsT[0], K, mcb, ncb, kcb, nnb, mg)


# ------------------------------------------------------------ Python side
_workspaces = threading.local()


def _workspace(dtype: np.dtype, threads: int):
    """Per-thread packing buffers, kept across calls (one set per Python thread)."""
    key = (np.dtype(dtype).char, threads)
    cache = getattr(_workspaces, "cache", None)
    if cache is None:
        cache = _workspaces.cache = {}
    ws = cache.get(key)
    if ws is None:
        nr = 64 // np.dtype(dtype).itemsize
        # 64 spare elements: vector loads of a padded panel never leave the buffer.
        ws = (np.zeros((threads, MC * KC + 64), dtype),
              np.zeros((threads, KC * NC + 64), dtype),
              np.zeros((threads, 2 * MR * nr + 64), dtype))
        cache[key] = ws
    return ws


def _split(n: int, block: int, multiple: int) -> tuple[int, int]:
    """(block size, count): ``n`` cut into equal blocks of at most ~``block``."""
    count = -(-n // block)
    size = -(-n // count)
    size = -(-size // multiple) * multiple
    return size, -(-n // size)


_DUMMY = {np.dtype(np.float32): (np.zeros(1, np.float32), np.zeros((1, 1), np.float32)),
          np.dtype(np.float64): (np.zeros(1, np.float64), np.zeros((1, 1), np.float64))}


def gemm(a: np.ndarray, b: np.ndarray, *, trans_a: bool = False, trans_b: bool = False,
         bias: np.ndarray | None = None, activation: str = "identity", alpha: float = 0.0,
         save_z: bool = False, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``act(op(a) @ op(b) + bias)``; returns ``(y, z)`` with ``z`` the
    pre-activation when ``save_z`` (else None).

    ``a`` and ``b`` are C-contiguous 2-D arrays of one float dtype; ``op`` is
    a transpose where ``trans_a`` / ``trans_b``.
    """
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    K2, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    assert K == K2, (a.shape, b.shape, trans_a, trans_b)
    dtype = a.dtype
    y = np.empty((M, N), dtype) if out is None else out
    dummy_b, dummy_z = _DUMMY[dtype]
    z = np.empty((M, N), dtype) if save_z else None
    nr = 64 // dtype.itemsize
    threads = numba.get_num_threads()
    parallel = threads > 1 and M * N * K >= PARALLEL_MIN_MACS
    workers = threads if parallel else 1
    # Tasks: N cut into column blocks (a multiple of the thread count when N
    # is wide enough), and M into as many row groups as still needed so that
    # every thread gets work.
    nnb = -(-N // NC)
    if nnb > 1 or N >= 2 * nr * workers:
        nnb = -(-max(nnb, workers) // workers) * workers
    ncb = -(-(-(-N // nnb)) // nr) * nr
    nnb = -(-N // ncb)
    groups = -(-workers // nnb) if workers > nnb else 1
    mg = -(-(-(-M // groups)) // MR) * MR
    groups = -(-M // mg)
    mcb, _ = _split(mg, MC, MR)
    kcb, _ = _split(K, KC, 1)
    ws = _workspace(dtype, numba.config.NUMBA_NUM_THREADS)
    kernel = _gemm_parallel if parallel else _gemm_serial
    # ReLU is finished in registers; every other activation runs its own loop on the tile.
    act = 0 if activation == "identity" else forward_kernel(activation, dtype).address
    kernel(a, bool(trans_a), b, bool(trans_b), y,
           dummy_b if bias is None else bias, bias is not None, act, activation == "relu", dtype.type(alpha),
           dummy_z if z is None else z, z is not None, ws[0], ws[1], ws[2],
           K, mcb, ncb, kcb, nnb, mg, nnb * groups)
    return y, z
