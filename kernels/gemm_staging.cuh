// nnfast CUDA kernels: what the GEMMs of linear.cu (FMA) and linear_tf32.cu
// (tensor cores) share: the cp.async copies of operand slices into shared
// memory, the share of the K slices a block takes under split K, and the
// epilogue that stores one run of outputs.
//
// Operands. A GEMM reads op(A)[M, K] and op(B)[K, N]. For one operand, x is
// its M (or N) index and k its K index; its element (x, k) lives at
// src[x * ld + k] when K_CONTIG (k is the contiguous axis of the source) and
// at src[k * ld + x] otherwise. K is walked in BK-deep slices; a slice of one
// operand is BX x BK elements.
//
// Stage layout. A stage is either k-major, stage[k * PITCH + x] (what the FMA
// kernel reads: per k, a row of x values), or in the source's own layout
// (what wmma::load_matrix_sync reads, as row- or column-major fragments):
// x-major, stage[x * PITCH + k], for a K_CONTIG source, k-major otherwise.
// TRANSPOSE asks for a k-major stage whatever the source; it is then written
// element by element when the source is K_CONTIG. PAD elements end each stage
// row (bank-conflict padding, chosen by the kernel).
#ifndef NNFAST_GEMM_STAGING_CUH
#define NNFAST_GEMM_STAGING_CUH

#include "async_copy.cuh"
#include "common.cuh"

namespace nnf {

// A run of N consecutive elements (the tag of OperandCopier::for_each_copy's calls).
template <int N>
struct Run {};

// A for_each_copy function that leaves the copies as they landed.
struct AsLanded {
    template <typename T, int N>
    __device__ __forceinline__ void operator()(T*, Run<N>) const {}
};

// The copies of one operand's BX x BK slices, global -> shared memory. The
// copies of a slice, V consecutive elements each, are numbered along the
// contiguous axis of the source (a warp reads whole 32-byte sectors) and
// thread t moves copies t, t + NT, ...: its copies sit at the same x
// (K_CONTIG: the same k) a fixed distance apart, so everything but one pointer
// per slice is worked out once, in the constructor. Elements with x >= xmax or
// k >= kmax are zero-filled. VEC: 16-byte copies along the contiguous axis,
// which needs 16-byte aligned pointers and a leading dimension that is a
// multiple of the vector width (decided by the launcher); the extent of that
// axis (xmax, or K = ld for a K_CONTIG source) is then a multiple of it too,
// so a copy is entirely in range or entirely out.
template <typename T, int BX, int BK, int NT, bool K_CONTIG, bool VEC, bool TRANSPOSE, int PAD>
struct OperandCopier {
    static constexpr int W = Vec<T>::width;
    static constexpr bool X_MAJOR = K_CONTIG && !TRANSPOSE;                 // stage[x * PITCH + k]
    static constexpr int V = (VEC && !(K_CONTIG && TRANSPOSE)) ? W : 1;     // elements per copy
    static constexpr int PITCH = (X_MAJOR ? BK : BX) + PAD;                 // elements per stage row
    static constexpr int SIZE = (X_MAJOR ? BX : BK) * PITCH;                // elements of one stage
    static constexpr int PER_ROW = (K_CONTIG ? BK : BX) / V;  // copies per contiguous source row
    static constexpr int ITEMS = BX * BK / V / NT;             // copies per thread and slice
    static constexpr int ROWS = NT / PER_ROW;                  // source rows between a thread's copies
    // Stage elements between a thread's consecutive copies: ROWS source rows further on.
    static constexpr int STEP = (K_CONTIG && TRANSPOSE) ? ROWS : ROWS * PITCH;
    static_assert((K_CONTIG ? BK : BX) % V == 0 && (BX * BK / V) % NT == 0 && NT % PER_ROW == 0,
                  "copies must tile the slice");
    static_assert(ITEMS <= 32, "one bit of x_in per copy");

    const T* next;  // the thread's first copy of the next slice
    int ld;
    unsigned x_in;  // bit i: copy i has x < xmax

    // The thread's first copy: its x and k in the slice.
    static __device__ __forceinline__ int first_x() {
        return K_CONTIG ? (int)threadIdx.x / PER_ROW : ((int)threadIdx.x % PER_ROW) * V;
    }
    static __device__ __forceinline__ int first_k() {
        return K_CONTIG ? ((int)threadIdx.x % PER_ROW) * V : (int)threadIdx.x / PER_ROW;
    }
    // Where element (x, k) of a slice sits in its stage.
    static __device__ __forceinline__ int offset(int x, int k) { return X_MAJOR ? x * PITCH + k : k * PITCH + x; }
    static __device__ __forceinline__ int first_offset() { return offset(first_x(), first_k()); }

    __device__ __forceinline__ OperandCopier(const T* src, int ld_, int x0, int xmax, int k0) : ld(ld_), x_in(0) {
        const int x = x0 + first_x(), k = k0 + first_k();
        next = K_CONTIG ? src + (long long)x * ld + k : src + (long long)k * ld + x;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            // With VEC, xmax is a multiple of V: a copy is entirely in range or entirely out.
            if (x + (K_CONTIG ? i * ROWS : 0) < xmax) x_in |= 1u << i;
        }
    }

    // Call f(p, Run<V>()) for each of this thread's copies of a slice in `stage` (V elements at p,
    // 16-byte aligned when V is the vector width): once they have landed, a kernel may rewrite
    // its own copies in place before the barrier that publishes the stage.
    template <class F>
    __device__ __forceinline__ void for_each_copy(T* stage, F f) const {
        T* dst = stage + first_offset();
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) f(dst + i * STEP, Run<V>());
    }

    // Issue the copies of the slice that starts at k0 (the slice after the previous call's) into
    // `stage`; `src` is the operand's first element, the address given to zero fills (which read
    // nothing, but get a valid address all the same). The few registers kept between slices are
    // what lets the large FMA tile hold its 64 accumulators without spilling.
    __device__ __forceinline__ void copy(T* __restrict__ stage, const T* src, int k0, int kmax) {
        const T* p = next;
        const int k = k0 + first_k();
        T* dst = stage + first_offset();
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const bool in = (x_in >> i & 1u) && k + (K_CONTIG ? 0 : i * ROWS) < kmax;
            cp_async<V * (int)sizeof(T)>(dst + i * STEP, in ? p : src, in);
            p += (long long)ROWS * ld;
        }
        next += K_CONTIG ? (long long)BK : (long long)BK * ld;
    }
};

// The K slices of this block: [s0, s0 + count), elements [kbeg, kend). With
// gridDim.z = S > 1 (split K) block z takes cdiv(cdiv(K, BK), S) of them.
struct KShare {
    int count, kbeg, kend;
};

template <int BK>
__device__ __forceinline__ KShare k_share(int K) {
    const int slices = (int)(((long long)K + BK - 1) / BK);
    const int per = (slices + (int)gridDim.z - 1) / (int)gridDim.z;
    const int s0 = (int)blockIdx.z * per;
    const int count = max(0, min(slices - s0, per));
    KShare s;
    s.count = count;
    s.kbeg = s0 * BK;
    s.kend = (int)min((long long)K, (long long)(s0 + count) * BK);
    return s;
}

// The ring of STAGES shared-memory stages through which the K slices of one
// block flow, A's stages first, then B's, from the start of the dynamic shared
// memory. The copies of slice t + STAGES - 1 are issued before the math on
// slice t: STAGES - 1 slices are in flight behind the math, one barrier per
// slice, one commit group per slice (empty past the last, so that the wait
// count stays fixed). No register holds a loaded value, so the compiler cannot
// sink the loads below the math (it did with plain loads into registers: a
// double buffer that no longer overlapped anything). Use:
//
//     ring.prologue();
//     for (int t = 0; t < ring.count; ++t) {
//         ring.wait_and_refill(t);  // or (t, f): f rewrites the thread's copies as they land
//         ... math on ring.a_stage(...) and ring.b_stage(...) ...
//         ring.advance();
//     }
template <typename T, class CopyA, class CopyB, int STAGES, int BK>
struct SliceRing {
    static_assert(STAGES >= 2, "a pipeline needs two stages");
    static constexpr int SIZE = STAGES * (CopyA::SIZE + CopyB::SIZE);  // elements of shared memory

    T* const As;  // [STAGES][CopyA::SIZE]
    T* const Bs;  // [STAGES][CopyB::SIZE]
    const T* const A;
    const T* const B;
    CopyA copy_a;
    CopyB copy_b;
    const int count, kbeg, kend;  // this block's K slices (k_share)
    int read, write;              // the stage of slice t, and the one refilled during its math

    __device__ __forceinline__ SliceRing(const T* A_, int lda, int m0, int M, const T* B_, int ldb, int n0, int N,
                                         KShare share)
        : As(dynamic_smem<T>()), Bs(dynamic_smem<T>() + STAGES * CopyA::SIZE), A(A_), B(B_),
          copy_a(A_, lda, m0, M, share.kbeg), copy_b(B_, ldb, n0, N, share.kbeg), count(share.count),
          kbeg(share.kbeg), kend(share.kend), read(0), write(STAGES - 1) {}

    // Slices 0 .. STAGES - 2 in flight, one commit group each (empty past the end).
    __device__ __forceinline__ void prologue() {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < count) {
                copy_a.copy(As + s * CopyA::SIZE, A, kbeg + s * BK, kend);
                copy_b.copy(Bs + s * CopyB::SIZE, B, kbeg + s * BK, kend);
            }
            cp_async_commit();
        }
    }

    // `landed` may rewrite the thread's own copies of slice t in place (see for_each_copy).
    template <class Landed = AsLanded>
    __device__ __forceinline__ void wait_and_refill(int t, Landed landed = Landed()) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of slice t have landed;
        copy_a.for_each_copy(As + read * CopyA::SIZE, landed);
        copy_b.for_each_copy(Bs + read * CopyB::SIZE, landed);
        __syncthreads();              // everyone's have, and nobody reads slice t - 1 any more
        if (t + STAGES - 1 < count) {  // refill slice t - 1's stage before the math on slice t
            copy_a.copy(As + write * CopyA::SIZE, A, kbeg + (t + STAGES - 1) * BK, kend);
            copy_b.copy(Bs + write * CopyB::SIZE, B, kbeg + (t + STAGES - 1) * BK, kend);
        }
        cp_async_commit();
    }

    // Element `offset` of slice t's stage of A (of B). The offset is added to the stage's before
    // the pointer is formed: ptxas then folds the per-k offsets into the shared loads (with
    // the pointer formed first it recomputed every address, 6% more instructions in the loop).
    __device__ __forceinline__ const T* a_stage(int offset) const { return As + (read * CopyA::SIZE + offset); }
    __device__ __forceinline__ const T* b_stage(int offset) const { return Bs + (read * CopyB::SIZE + offset); }

    __device__ __forceinline__ void advance() {
        read = read == STAGES - 1 ? 0 : read + 1;
        write = write == STAGES - 1 ? 0 : write + 1;
    }
};

// The bias of columns col .. col + W - 1 (0 past N, or without a bias).
template <typename T>
__device__ __forceinline__ void load_bias(T (&bv)[Vec<T>::width], const T* __restrict__ bias, int col, int N) {
#pragma unroll
    for (int l = 0; l < Vec<T>::width; ++l) bv[l] = (bias != nullptr && col + l < N) ? bias[col + l] : T(0);
}

// The epilogue of one run of W outputs of a row, z[l] the pre-activation (bias
// added) of column col + l: Z gets z when the backward pass needs it
// (zrow != nullptr), C the activation, each stored once, as one 128-bit vector
// when VEC (N is then a multiple of W: the run is entirely in range), element
// by element below N otherwise.
template <typename T, int ACT, bool VEC>
__device__ __forceinline__ void store_run(T* __restrict__ crow, T* __restrict__ zrow, int col, int N,
                                          const T (&z)[Vec<T>::width], T alpha) {
    constexpr int W = Vec<T>::width;
    if (VEC) {
        if (zrow != nullptr) {  // stored before the activation: z's vector is dead while it runs
            typename Vec<T>::type zv;
#pragma unroll
            for (int l = 0; l < W; ++l) lane<T>(zv, l) = z[l];
            store_vec(zrow + col, zv);
        }
        typename Vec<T>::type yv;
#pragma unroll
        for (int l = 0; l < W; ++l) lane<T>(yv, l) = Act<T, ACT>::fwd(z[l], alpha);
        store_vec(crow + col, yv);
    } else {
#pragma unroll
        for (int l = 0; l < W; ++l) {
            if (col + l < N) {
                if (zrow != nullptr) zrow[col + l] = z[l];
                crow[col + l] = Act<T, ACT>::fwd(z[l], alpha);
            }
        }
    }
}

}  // namespace nnf

#endif  // NNFAST_GEMM_STAGING_CUH
