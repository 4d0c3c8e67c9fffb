"""Packed, cache-blocked, register-blocked GEMM with fused epilogues, driven by a descriptor.

``C = epilogue(op(A) @ op(B))`` where ``op(X)`` is ``X`` or ``X.T``: the
transposed operands of the linear backward (``dW = x.T @ dz``,
``dx = dz @ W.T``) are read in place by the packing routines, never copied
into a transposed array.

Structure (the GotoBLAS / BLIS loop nest)::

    for each task (a column block of C x a row group)   <- workers take tasks dynamically
      for pc in K, step KC:
        pack op(B)[pc:pc+KC, jc:jc+NC] -> Bp     (KC x NR micro-panels, once per task)
        for ic in the task's rows, step MC:
          pack op(A)[ic:ic+MC, pc:pc+KC] -> Ap   (MR x KC micro-panels)
          for each NR-wide B micro-panel:        <- stays in L1 (KC*NR*4 = 16 KB)
            for each MR-tall A micro-panel:      <- the A block stays in L2
              micro-kernel: MR x NR tile = Ap_panel @ Bp_panel (+ C of earlier pc)
              epilogue (last pc only)

The micro-kernel and the packing are in :mod:`.gemm_micro`.

**A read in place**: packing an A block costs about as much as running one
B micro-panel over it, and pays only when many B panels reuse it. A task of
at most :data:`IN_PLACE_A_MAX_COLS` columns (the MLP shapes: a batch of 128
split over two threads gives 64-column tasks, and every task would pack the
whole A again) reads the full MR-row panels of A where they are
(:func:`.gemm_micro.micro` with the row and column strides of the matrix)
and packs only the zero-padded edge panel. Measured on 2 cores, the GEMMs of
a [784,256,256,10] batch-128 step went from 0.58x to 0.87x OpenBLAS's time.

**Epilogues** (the last K block of each tile; earlier blocks store their
partial sums in C):

* ``STORE`` / ``FORWARD``: ``+ bias``, keep the pre-activation ``z`` if
  asked, the activation. A full tile with no activation or ReLU is finished
  in registers and stored straight into C (its lines prefetched before the K
  loop); other activations (and edge tiles) go through a scratch tile and the
  activation's vectorised loop, called through its address (:mod:`._calls`).
* ``DX`` (the linear backward's ``dx = dz @ W.T`` of the next layer down):
  the activation derivative of that layer, ``dz' = dx * act'(saved)``, is
  applied to the tile while it is in L1, and the tile's rows are added to the
  partial bias gradients (``PART``, one row per block of ``PROWS`` rows of C:
  the blocks of :func:`.linear.dz_db`, added in the same order, so ``db``
  has the same bits). ``dx`` itself is never stored.
* ``UPDATE`` (``dW = x.T @ dz``): each block of ``dW`` is stored like
  ``STORE`` stores it (into a scratch array), and while it is still in L2 the
  optimizer update of that block of ``W`` consumes it (:func:`.optim.update_kernel`,
  through its address, a row of the block per call): ``dW`` makes no round
  trip through memory. (Updating each 6 x 16 tile in the epilogue itself cost
  a call per 16 elements: 2 ms of a 1024 x 1024 layer's step on this machine.)

**Descriptor**: every operand is an address in an ``int64`` array (slots
below), so one compiled task per dtype (:func:`task_kernel`) serves every
shape, epilogue and caller: the layer ops, and the fused training step
(:mod:`.train_step`), which calls it through its address and so does not
compile a GEMM of its own.

**Blocking**: KC = 256 (a B micro-panel, 16 KB, sits in the 32 KB L1),
MC = 120 (the A block, 120 KB, sits in the L2), NC = 512 (the B block,
512 KB, in L2/L3). Block sizes are shrunk to split M, N, K evenly.

**Threads**: one worker per thread; each takes the next task from an atomic
counter (:mod:`._sched`), so a thread that starts late or shares its core
takes fewer tasks instead of stalling the region. There are
:data:`TASKS_PER_WORKER` tasks per worker, column blocks of C first (a task
packs each B block once and reuses it for all its rows), then row groups.
Workers pack into their own slice of a workspace allocated once (no
allocation and no page faults per call). Small products run serially (a
thread launch costs more).

No ``np.dot`` / BLAS is called. FMA contraction changes rounding by at most
one ulp per product versus separate multiply-add; float64 results agree with
NumPy to ~1e-15 relative, well inside the rtol 1e-10 contract. The bits of an
element depend on K's blocking only (:func:`split`), never on the task split
or the thread count.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable

import numba
import numpy as np
from numba import carray, cfunc, njit, prange, types

from ._calls import call_backward, call_forward, call_update, ptr_at
from ._sched import address_of, as_ptr, call_task, next_task
from ._math import like
from ._simd import addr, vadd, vload, vmul, vselect_gt, vsplat, vstore
from .activations import forward_kernel
from .gemm_micro import MR, micro, nr_of, pack_a, pack_b

#: K block: a KC x NR micro-panel of B fits in L1.
KC = 256
#: M block (a multiple of MR): an MC x KC block of A fits in L2.
MC = 120
#: N block (a multiple of 16 and 8): a KC x NC block of B fits in L2/L3.
NC = 512
#: Below this many multiply-adds a product runs on the calling thread.
PARALLEL_MIN_MACS = 1 << 21
#: Column blocks of at most this many columns read A in place rather than packing it.
IN_PLACE_A_MAX_COLS = 128
#: Tasks per worker of a parallel product (more balance the load, fewer pack each A block less often).
TASKS_PER_WORKER = 2
#: At most this many descriptors (and float parameter arrays) cached per thread and dtype by :func:`gemm`.
MAX_CACHED = 256
#: Workspace elements per worker: an A block, a B block, two scratch tiles (+ 64: vector loads of a padded
#: panel never leave the buffer).
WS_A = MC * KC + 64
WS_B = KC * NC + 64
WS_T = 2 * MR * 16 + 64

# Descriptor slots. Addresses are 0 when absent.
(A, TA, B, TB, C, M, N, K, MCB, NCB, KCB, NNB, MG, NTASKS, EPI, BIAS, ACT, RELU, Z, SAVED, BWD, PART, PROWS,
 UPD, P, S1, S2, COEF, WSA, WSB, WST, WORKERS, DESC) = range(33)
#: Epilogue kinds.
STORE, FORWARD, DX, UPDATE = range(4)


@njit(error_model="numpy")
def _store_tile(T, C, ci, cj, mr, nr, first, last, bias, has_bias, act, alpha, Z, save_z):
    """Write the valid mr x nr part of the tile: accumulate over K blocks, and on
    the last one add the bias, keep the pre-activation if asked, apply the
    activation whose forward loop is at address ``act`` (0: none)."""
    NR = nr_of(T)
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


@njit(error_model="numpy")
def _store_dx(T, C, ci, cj, mr, nr, first, S, bwd, relu, alpha, Pt, prows):
    """``DX`` epilogue: ``C = (tile + C) * act'(S)`` (``act'`` at address ``bwd``, 0: identity;
    ReLU's in registers), each row of it added to its block's partial column sums ``Pt``
    (when ``prows > 0``), row after row as :func:`.linear.dz_db` adds them."""
    NR = nr_of(T)
    h = NR // 2
    pT = addr(T)
    pC = addr(C)
    pS = addr(S)
    pP = addr(Pt)
    ldc = C.shape[1]
    one = vsplat(pT, like(alpha, 1.0))
    zero = vsplat(pT, like(alpha, 0.0))
    for i in range(mr):
        r = ci + i
        t = i * NR
        c = r * ldc + cj
        q = (r // prows) * ldc + cj if prows > 0 else 0
        if nr == NR and (relu or bwd == 0):  # a whole row of the tile, in registers
            a0 = vload(pT, t)
            a1 = vload(pT, t + h)
            if not first:
                a0 = vadd(a0, vload(pC, c))
                a1 = vadd(a1, vload(pC, c + h))
            if relu:
                a0 = vmul(a0, vselect_gt(vload(pS, c), zero, one, zero))
                a1 = vmul(a1, vselect_gt(vload(pS, c + h), zero, one, zero))
            vstore(pC, c, a0)
            vstore(pC, c + h, a1)
            if prows > 0:
                vstore(pP, q, vadd(vload(pP, q), a0))
                vstore(pP, q + h, vadd(vload(pP, q + h), a1))
            continue
        crow = C[r, cj:cj + nr]
        trow = T[t:t + nr]
        if not first:
            for j in range(nr):
                trow[j] += crow[j]
        if bwd != 0:
            call_backward(bwd, ptr_at(pT, t), ptr_at(pS, c), ptr_at(pC, c), nr, alpha)
        else:
            for j in range(nr):
                crow[j] = trow[j]
        if prows > 0:
            prow = Pt[r // prows, cj:cj + nr]
            for j in range(nr):
                prow[j] += crow[j]


def _task_cfunc(T: types.Float, cache: bool = True):
    # The task's body is the cfunc's own rather than a call of an @njit function: Numba optimises and
    # generates machine code for every function it compiles, callees included, so a wrapper would make the
    # largest body of the backend go through LLVM twice (a second of a cold start).
    @cfunc(types.void(types.CPointer(types.int64), types.CPointer(T), types.int64, types.int64), cache=cache,
           error_model="numpy")
    def task(dp, fp, t, w):
        """Task ``t`` of the product described by ``dp`` (run by worker ``w``; ``fp``: the float parameters)."""
        d = carray(dp, DESC)
        f = carray(fp, 1)
        Mv = d[M]
        Nv = d[N]
        Kv = d[K]
        ta = d[TA] != 0
        tb = d[TB] != 0
        pf = addr(f)
        NR = nr_of(f)
        A_ = carray(as_ptr(d[A], pf), (Kv, Mv) if ta else (Mv, Kv))
        B_ = carray(as_ptr(d[B], pf), (Nv, Kv) if tb else (Kv, Nv))
        C_ = carray(as_ptr(d[C], pf), (Mv, Nv))
        pA = ptr_at(as_ptr(d[WSA], pf), w * WS_A)
        pB = ptr_at(as_ptr(d[WSB], pf), w * WS_B)
        pT = ptr_at(as_ptr(d[WST], pf), w * WS_T)
        Ap = carray(pA, WS_A)
        Bp = carray(pB, WS_B)
        T = carray(pT, WS_T)
        pC = as_ptr(d[C], pf)
        epi = d[EPI]
        alpha = f[0]
        has_bias = d[BIAS] != 0
        pbias = as_ptr(d[BIAS] if has_bias else d[C], pf)
        bias = carray(pbias, Nv)
        act = d[ACT]
        relu = d[RELU] != 0
        save_z = d[Z] != 0
        Z_ = carray(as_ptr(d[Z] if save_z else d[C], pf), (Mv, Nv))
        S_ = carray(as_ptr(d[SAVED] if d[SAVED] != 0 else d[C], pf), (Mv, Nv))
        bwd = d[BWD]
        prows = d[PROWS] if d[PART] != 0 else 0
        Pt = carray(as_ptr(d[PART] if prows > 0 else d[C], pf), ((Mv + prows - 1) // prows if prows > 0 else 1, Nv))
        upd = d[UPD]
        pP = as_ptr(d[P] if upd != 0 else d[C], pf)
        pS1 = as_ptr(d[S1] if d[S1] != 0 else d[P], pf)
        pS2 = as_ptr(d[S2] if d[S2] != 0 else d[P], pf)
        pcoef = as_ptr(d[COEF], pf)
        mcb = d[MCB]
        ncb = d[NCB]
        kcb = d[KCB]
        nnb = d[NNB]
        mg = d[MG]
        m0 = (t // nnb) * mg
        m1 = min(Mv, m0 + mg)
        jc = (t % nnb) * ncb
        nc = min(ncb, Nv - jc)
        nkb = (Kv + kcb - 1) // kcb
        # A task with few B panels reads A in place: packing an A block costs about one B panel's worth of
        # micro-kernel time, and with few panels to reuse it on, it does not pay.
        in_place = nc <= IN_PLACE_A_MAX_COLS
        pAm = as_ptr(d[A], pf)
        rsa = 1 if ta else Kv
        csa = Mv if ta else 1
        # Full tiles of the last K block finish in registers unless the epilogue needs the scalar path.
        # (UPDATE stores the gradient block like STORE and updates the parameters after it, below.)
        fast_last = (epi <= FORWARD and not save_z and (act == 0 or relu)) or epi == UPDATE
        for kb in range(nkb):
            pc = kb * kcb
            kc = min(kcb, Kv - pc)
            first = kb == 0
            last = kb == nkb - 1
            fast = not last or fast_last
            pack_b(B_, tb, pc, kc, jc, nc, Bp)
            for ic in range(m0, m1, mcb):
                mc = min(mcb, m1 - ic)
                # Full panels of an A block read in place; only the zero-padded edge panel is packed.
                full = mc // MR if in_place else 0
                if full * MR < mc:
                    pack_a(A_, ta, ic + full * MR, mc - full * MR, pc, kc, Ap)
                for jp in range((nc + NR - 1) // NR):
                    nr = min(NR, nc - jp * NR)
                    j = jc + jp * NR
                    jb = j if (last and has_bias) else -1
                    for ip in range((mc + MR - 1) // MR):
                        mr = min(MR, mc - ip * MR)
                        i = ic + ip * MR
                        direct = fast and mr == MR and nr == NR
                        # Two call sites, not one with chosen strides: the packed one keeps its strides
                        # constant (1, MR), and LLVM compiles a K loop for each.
                        if ip < full:
                            micro(kc, pAm, pc * Mv + i if ta else i * Kv + pc, rsa, csa, pB, jp * NR * kc,
                                  pT, pC, i * Nv + j, Nv, direct, direct and not first, pbias,
                                  jb if direct else -1, direct and last and relu)
                        else:
                            micro(kc, pA, (ip - full) * MR * kc, 1, MR, pB, jp * NR * kc, pT, pC, i * Nv + j, Nv,
                                  direct, direct and not first, pbias, jb if direct else -1, direct and last and relu)
                        if direct:
                            continue
                        if not last or epi != DX:
                            _store_tile(T, C_, i, j, mr, nr, first, last, bias, has_bias, act, alpha, Z_, save_z)
                        else:
                            _store_dx(T, C_, i, j, mr, nr, first, S_, bwd, relu, alpha, Pt, prows)
                if last and epi == UPDATE:
                    # The gradient block just stored (mc x nc, still in L2) is consumed by the update, a row of
                    # nc columns per call: dW makes no round trip through memory.
                    for r in range(ic, ic + mc):
                        off = r * Nv + jc
                        call_update(upd, ptr_at(pP, off), ptr_at(pC, off), ptr_at(pS1, off), ptr_at(pS2, off), nc,
                                    pcoef)

    return task


_TYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}


@functools.lru_cache(maxsize=None)
def task_kernel(dtype: np.dtype):
    """The compiled GEMM task for ``dtype``: ``void(int64* desc, T* fparams, int64 task, int64 worker)``."""
    return _task_cfunc(_TYPES[np.dtype(dtype)])


# ------------------------------------------------------------ drivers
@njit(cache=True, error_model="numpy")
def run_serial(task, d, f, counter):
    """Every task of ``d`` on the calling thread (``counter``: unused, the arguments of :func:`run`)."""
    for t in range(d[NTASKS]):
        call_task(task, addr(d), addr(f), t, 0)


@njit(parallel=True, cache=True, error_model="numpy")
def run_parallel(task, d, f, counter, workers):
    """The tasks of ``d`` on ``workers`` threads, each taking the next task from ``counter``."""
    counter[0] = 0
    n = d[NTASKS]
    for w in prange(workers):
        t = next_task(counter)
        while t < n:
            call_task(task, addr(d), addr(f), t, w)
            t = next_task(counter)


# ------------------------------------------------------------ Python side
def split(M: int, N: int, K: int, workers: int, rows: int = MR) -> tuple[int, int, int, int, int, int]:
    """``(mcb, ncb, kcb, nnb, mg, ntasks)``: the blocking and the tasks of an M x K x N product.

    Row groups are a multiple of ``rows`` (and of MR): the ``DX`` epilogue's
    partial bias gradients are per block of ``PROWS`` rows, and a block must
    belong to one task.
    """
    multiple = MR * rows // math.gcd(MR, rows)
    nr = 16  # the float32 panel width, a multiple of float64's: one split for both dtypes
    nnb = -(-N // NC)
    target = workers * TASKS_PER_WORKER if workers > 1 else 1
    nnb = max(nnb, min(target, N // (2 * nr)))
    ncb = -(-(-(-N // nnb)) // nr) * nr
    nnb = -(-N // ncb)
    groups = -(-target // nnb) if nnb < target else 1
    mg = -(-(-(-M // groups)) // multiple) * multiple
    groups = -(-M // mg)
    mcb = _block(mg, MC, MR)
    kcb = _block(K, KC, 1)
    return mcb, ncb, kcb, nnb, mg, nnb * groups


def _block(n: int, block: int, multiple: int) -> int:
    """``n`` cut into equal blocks of at most ~``block`` (a multiple of ``multiple``): their size."""
    count = -(-n // block)
    size = -(-n // count)
    return -(-size // multiple) * multiple


class Workspace:
    """Packing buffers and the task counter of ``workers`` workers (one per thread of a region)."""

    def __init__(self, dtype: np.dtype, workers: int) -> None:
        self.workers = workers
        self.a = np.zeros(workers * WS_A, dtype)
        self.b = np.zeros(workers * WS_B, dtype)
        self.t = np.zeros(workers * WS_T, dtype)
        self.counter = np.zeros(8, np.int64)  # a cache line of its own
        #: :func:`gemm`'s descriptors by shape and epilogue (their address slots are rewritten by every call)
        #: and its float parameters by value: building them costs more than a small product's arithmetic.
        self.descriptors: dict[tuple, np.ndarray] = {}
        self.fparams: dict[float, np.ndarray] = {}

    def slots(self) -> dict[int, int]:
        """The descriptor slots of the buffers, for :func:`describe`."""
        return {"WSA": self.a.ctypes.data, "WSB": self.b.ctypes.data, "WST": self.t.ctypes.data}


_workspaces = threading.local()


def workspace(dtype: np.dtype) -> Workspace:
    """The calling thread's workspace for ``dtype`` (as many workers as Numba has threads)."""
    cache = getattr(_workspaces, "cache", None)
    if cache is None:
        cache = _workspaces.cache = {}
    key = np.dtype(dtype).char
    ws = cache.get(key)
    if ws is None:
        ws = cache[key] = Workspace(dtype, numba.config.NUMBA_NUM_THREADS)
    return ws


def describe(m: int, n: int, k: int, workers: int, **slots: int) -> np.ndarray:
    """A descriptor for an m x k x n product on ``workers`` workers; ``slots``: e.g. ``A=addr, TA=1``."""
    d = np.zeros(DESC, np.int64)
    d[[MCB, NCB, KCB, NNB, MG, NTASKS]] = split(m, n, k, workers, slots.get("PROWS") or MR)
    d[[M, N, K, WORKERS]] = m, n, k, workers
    names = globals()
    for name, value in slots.items():
        d[names[name]] = value
    return d


@njit(cache=True, error_model="numpy")
def run(task, d, f, counter):
    """The tasks of ``d``: in parallel when its ``WORKERS`` slot says more than one."""
    if d[WORKERS] > 1:
        run_parallel(task, d, f, counter, d[WORKERS])
    else:
        run_serial(task, d, f, counter)


@njit(cache=True, error_model="numpy")
def _gemm_op(task, d, f, a, b, c, bias, z, ws_a, ws_b, ws_t, counter):
    d[A] = address_of(addr(a))
    d[B] = address_of(addr(b))
    d[C] = address_of(addr(c))
    if d[BIAS] != 0:
        d[BIAS] = address_of(addr(bias))
    if d[Z] != 0:
        d[Z] = address_of(addr(z))
    d[WSA] = address_of(addr(ws_a))
    d[WSB] = address_of(addr(ws_b))
    d[WST] = address_of(addr(ws_t))
    run(task, d, f, counter)


def _cached(cache: dict, key: Any, make: Callable[[], np.ndarray]) -> np.ndarray:
    """``cache[key]``, made by ``make`` when missing; a cache of :data:`MAX_CACHED` entries is emptied first."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= MAX_CACHED:
            cache.clear()
        value = cache[key] = make()
    return value


def op_types(dtype: np.dtype) -> tuple:
    """The Numba types of :func:`gemm`'s compiled call for ``dtype`` with a bias (a linear layer's forward)."""
    v, m, i = np.empty(1, dtype), np.empty((1, 1), dtype), np.empty(1, np.int64)
    return tuple(numba.typeof(a) for a in (0, i, v, m, m, m, v, m, v, v, v, i))


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
    z = np.empty((M, N), dtype) if save_z else None
    threads = numba.get_num_threads()
    workers = threads if threads > 1 and M * N * K >= PARALLEL_MIN_MACS else 1
    ws = workspace(dtype)
    d = _cached(ws.descriptors, (M, N, K, workers, trans_a, trans_b, bias is not None, activation, save_z),
                lambda: describe(M, N, K, workers, TA=trans_a, TB=trans_b, EPI=FORWARD, BIAS=bias is not None,
                                 ACT=0 if activation == "identity" else forward_kernel(activation, dtype).address,
                                 RELU=activation == "relu", Z=save_z))
    f = _cached(ws.fparams, alpha, lambda: np.full(1, alpha, dtype))
    _gemm_op(task_kernel(dtype).address, d, f, a, b, y, y if bias is None else bias,
             y if z is None else z, ws.a, ws.b, ws.t, ws.counter)
    return y, z
