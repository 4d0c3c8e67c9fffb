"""The GEMM's inner parts: the MR x NR register-tile micro-kernel and the packing routines.

See :mod:`.gemm` for the loop nest around them. None of these is compiled on
its own for a caller: they are linked into the GEMM task (one compiled body
per dtype, :func:`.gemm.task_kernel`), so they carry no ``cache=True``.

* **Micro-kernel**: MR = 6 rows x NR = two SIMD vectors (16 float32 or 8
  float64). The 12 accumulators are explicit ``ymm`` values (see
  :mod:`._simd`); per K step it loads two B vectors, broadcasts six A values
  and issues 12 ``vfmadd231ps``. 12 accumulators + 2 B + 1 broadcast = 15
  of the 16 ``ymm`` registers, enough independent FMAs to cover the FMA
  latency (4 cycles x 2 ports). It takes raw data pointers, not arrays, so
  a call costs no atomic reference-count updates (which also spilled the
  accumulators around the runtime calls).
* **Packing** copies each operand block once into a contiguous buffer laid out
  in exactly the order the micro-kernel reads it (``Ap[p*MR + r]``,
  ``Bp[p*NR + c]``), so the K loop streams two unit-stride arrays and every
  cache line fetched is fully used. Edge panels are zero-padded to MR / NR,
  so the micro-kernel never branches on the matrix edge. A full panel of a
  row-major A is packed six rows abreast (six sequential read streams, one
  sequential write stream); B row by row with vector copies.
"""

from __future__ import annotations

from numba import njit

from ._simd import prefetch, vadd, vbroadcast, vfma, vlanes, vload, vrelu, vstore, vzero

#: Rows of the register tile.
MR = 6


@njit(error_model="numpy")
def nr_of(a):
    """Columns of the register tile for ``a``'s dtype: two 256-bit vectors."""
    return 64 // a.itemsize


@njit(error_model="numpy")
def micro(kc, Ap, aoff, rs, cs, Bp, boff, T, Cf, coff, ldc, direct, acc_c, bias, jb, relu):
    """One MR x NR tile: op(A)'s MR x kc panel at ``Ap[aoff:]`` @ ``Bp[boff:]`` (kc x NR panel).

    Element ``(r, p)`` of the A panel is ``Ap[aoff + r*rs + p*cs]``: a packed
    panel has ``rs = 1, cs = MR``; a row-major A read in place ``rs = lda,
    cs = 1``; a transposed one ``rs = 1, cs = lda``.

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
    # Rows 3-5 from a second base: each broadcast address is then a base plus a constant multiple of rs (an
    # x86 addressing mode), not the end of a chain of six additions per K step.
    pa = aoff
    pa3 = aoff + 3 * rs
    rs2 = 2 * rs
    pb = boff
    for _ in range(kc):
        b0 = vload(Bp, pb)
        b1 = vload(Bp, pb + h)
        a = vbroadcast(Ap, pa)
        c00 = vfma(a, b0, c00)
        c01 = vfma(a, b1, c01)
        a = vbroadcast(Ap, pa + rs)
        c10 = vfma(a, b0, c10)
        c11 = vfma(a, b1, c11)
        a = vbroadcast(Ap, pa + rs2)
        c20 = vfma(a, b0, c20)
        c21 = vfma(a, b1, c21)
        a = vbroadcast(Ap, pa3)
        c30 = vfma(a, b0, c30)
        c31 = vfma(a, b1, c31)
        a = vbroadcast(Ap, pa3 + rs)
        c40 = vfma(a, b0, c40)
        c41 = vfma(a, b1, c41)
        a = vbroadcast(Ap, pa3 + rs2)
        c50 = vfma(a, b0, c50)
        c51 = vfma(a, b1, c51)
        pa += cs
        pa3 += cs
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


@njit(error_model="numpy")
def pack_a(A, trans, i0, mc, p0, kc, Ap):
    """Ap[(ip*kc + p)*MR + r] = op(A)[i0 + ip*MR + r, p0 + p], rows past mc zeroed."""
    lda = A.shape[1]
    Af = A.reshape(A.size)
    for ip in range((mc + MR - 1) // MR):
        base = ip * kc * MR
        rows = min(MR, mc - ip * MR)
        row0 = i0 + ip * MR
        if trans and rows == MR:  # op(A)[i, p] = A[p, i]: MR consecutive values of each row of A
            for p in range(kc):
                src = (p0 + p) * lda + row0
                dst = base + p * MR
                Ap[dst] = Af[src]
                Ap[dst + 1] = Af[src + 1]
                Ap[dst + 2] = Af[src + 2]
                Ap[dst + 3] = Af[src + 3]
                Ap[dst + 4] = Af[src + 4]
                Ap[dst + 5] = Af[src + 5]
        elif trans:
            for p in range(kc):
                src = (p0 + p) * lda + row0
                dst = base + p * MR
                for r in range(rows):
                    Ap[dst + r] = Af[src + r]
                for r in range(rows, MR):
                    Ap[dst + r] = 0
        elif rows == MR:  # six rows abreast: sequential reads, sequential writes
            s0 = row0 * lda + p0
            s1 = s0 + lda
            s2 = s1 + lda
            s3 = s2 + lda
            s4 = s3 + lda
            s5 = s4 + lda
            for p in range(kc):
                dst = base + p * MR
                Ap[dst] = Af[s0 + p]
                Ap[dst + 1] = Af[s1 + p]
                Ap[dst + 2] = Af[s2 + p]
                Ap[dst + 3] = Af[s3 + p]
                Ap[dst + 4] = Af[s4 + p]
                Ap[dst + 5] = Af[s5 + p]
        else:
            for p in range(kc):
                dst = base + p * MR
                for r in range(rows):
                    Ap[dst + r] = Af[(row0 + r) * lda + p0 + p]
                for r in range(rows, MR):
                    Ap[dst + r] = 0


@njit(error_model="numpy")
def pack_b(B, trans, p0, kc, j0, nc, Bp):
    """Bp[(jp*kc + p)*NR + c] = op(B)[p0 + p, j0 + jp*NR + c], columns past nc zeroed."""
    NR = nr_of(Bp)
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
