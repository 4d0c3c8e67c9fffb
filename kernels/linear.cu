// nnfast CUDA kernels: the linear layer, act(x @ W + b), forward and backward.
//
// gemm<T, BM, BN, BK, WM, WN, STAGES, TA, TB, ACT, VEC> computes
//     C[M, N] = act(op(A)[M, K] @ op(B)[K, N] + bias)
// with every matrix row-major and contiguous. op(A) = A (stored M x K) when
// TA is false and A^T (A stored K x M) when true; likewise op(B) = B (stored
// K x N) or B^T (B stored N x K). The three products of a linear layer are
//     forward  y  = act(x @ W + b)  : gemm<..., false, false, ACT, ...>
//     backward dW = x^T @ dz        : gemm<..., true,  false, IDENTITY, ...>
//              dx = dz @ W^T        : gemm<..., false, true,  IDENTITY, ...>
// so no transpose is ever materialised.
//
// Tiling. A block of (BM / WM) x (BN / WN) warps owns a BM x BN tile of C, each
// warp a WM x WN part of it. The 32 lanes of a warp form a 4 x 8 grid; a lane
// owns WM / 4 rows and WN / 8 columns of the warp's part, in runs of W (the
// elements of a 128-bit vector) spaced 4 W rows and 8 W columns apart. Per k a
// lane then reads its A and B values as 128-bit vectors from shared memory,
// the eight lanes of a quarter warp read one A vector (a broadcast) and eight
// consecutive B vectors (one 128-byte line: no bank conflict), and each value
// is used WN / 8 (or WM / 4) times from a register.
//
// Pipeline. K is walked in BK-deep slices through a ring of STAGES shared-memory
// stages, both operands stored k-major ([k][m] and [k][n]). The slices are
// moved with cp.async (async_copy.cuh), and the copies of slice t + STAGES - 1
// are issued before the arithmetic on slice t: STAGES - 1 slices are in flight
// behind the math, one barrier per slice. No register holds a loaded value, so
// the compiler cannot sink the loads below the math (it did with plain loads
// into registers: a double buffer that no longer overlapped anything). An
// operand stored with m (or n) contiguous is copied in 16-byte pieces when VEC
// (every leading dimension a multiple of W, every pointer 16-byte aligned:
// decided by the launcher), element by element otherwise; an operand stored
// with k contiguous is transposed on the way in, element by element, its rows
// padded by W so that the eight k of a warp's writes land in distinct banks.
// Elements outside the matrix are zero-filled by the copy and outputs outside
// it are never stored, so any M, N, K works.
//
// Split K. With gridDim.z = S > 1, block z takes only its share of the slices
// (cdiv(cdiv(K, BK), S) of them) and stores its raw partial product at
// C + z * M * N, a workspace of S x M x N; the launcher uses this with the
// identity epilogue and no bias, and gemm_splitk_reduce adds the S partial
// products in a fixed order and applies the epilogue (deterministic: no
// atomics).
//
// Epilogue: the bias is added, the pre-activation z is written when the
// backward pass needs it (Z != nullptr), the activation applied and the
// result stored once, as 128-bit vectors when VEC.
//
// bias_act_backward<T, ACT> fuses dz = dy * act'(saved) with the column sums
// of dz (the bias gradient), in row splits whose partial sums column_sum<T>
// adds in a fixed order (deterministic, no atomics).
#include "async_copy.cuh"
#include "common.cuh"

namespace {

// The copies of one operand's BK x BX slices, global -> shared memory, stored
// k-major: stage[k * PITCH + x]. The operand element (x, k) lives at
// src[x * ld + k] when K_CONTIG and at src[k * ld + x] otherwise; elements with
// x >= xmax or k >= kmax are zero-filled. The copies of a slice, V consecutive
// elements each, are numbered along the contiguous axis of the source (a warp
// reads whole 32-byte sectors) and thread t moves copies t, t + NT, ...: its
// copies sit at the same x (k-contiguous: the same k) a fixed distance apart,
// so everything but one pointer per slice is worked out once, here.
template <typename T, int BX, int BK, int NT, bool K_CONTIG, bool VEC>
struct OperandCopier {
    static constexpr int W = nnf::Vec<T>::width;
    static constexpr int V = (VEC && !K_CONTIG) ? W : 1;     // elements per copy
    static constexpr int PITCH = BX + (K_CONTIG ? W : 0);    // transposed rows are padded
    static constexpr int SIZE = BK * PITCH;                  // elements of one stage
    static constexpr int PER_ROW = (K_CONTIG ? BK : BX) / V;  // copies per contiguous source row
    static constexpr int ITEMS = BX * BK / V / NT;             // copies per thread and slice
    static constexpr int ROWS = NT / PER_ROW;                  // source rows between a thread's copies
    static_assert(BX % V == 0 && (BX * BK / V) % NT == 0 && NT % PER_ROW == 0, "copies must tile the slice");
    static_assert(ITEMS <= 32, "one bit of x_in per copy");

    const T* next;  // the thread's first copy of the next slice
    int ld;
    unsigned x_in;  // bit i: copy i has x < xmax

    // The thread's first copy: its x and k in the slice.
    static __device__ __forceinline__ int first_x() {
        return K_CONTIG ? (int)threadIdx.x / PER_ROW : ((int)threadIdx.x % PER_ROW) * V;
    }
    static __device__ __forceinline__ int first_k() {
        return K_CONTIG ? (int)threadIdx.x % PER_ROW : (int)threadIdx.x / PER_ROW;
    }

    __device__ __forceinline__ OperandCopier(const T* src, int ld_, int x0, int xmax, int k0) : ld(ld_), x_in(0) {
        const int x = x0 + first_x(), k = k0 + first_k();
        next = K_CONTIG ? src + (long long)x * ld + k : src + (long long)k * ld + x;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            // With VEC, xmax is a multiple of V: a copy is entirely in range or entirely out.
            if (x + (K_CONTIG ? i * ROWS : 0) < xmax) x_in |= 1u << i;
        }
    }

    // Issue the copies of the slice that starts at k0 (the slice after the previous call's) into
    // `stage`; `src` is the operand's first element, the address given to zero fills (which read
    // nothing, but get a valid address all the same). The few registers kept between slices are
    // what lets the large tile hold its 64 accumulators without spilling.
    __device__ __forceinline__ void copy(T* __restrict__ stage, const T* src, int k0, int kmax) {
        const T* p = next;
        const int k = k0 + first_k();
        T* dst = stage + first_k() * PITCH + first_x();
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const bool in = (x_in >> i & 1u) && k + (K_CONTIG ? 0 : i * ROWS) < kmax;
            nnf::cp_async<V * (int)sizeof(T)>(dst + i * (K_CONTIG ? ROWS : ROWS * PITCH), in ? p : src, in);
            p += (long long)ROWS * ld;
        }
        next += K_CONTIG ? (long long)BK : (long long)BK * ld;
    }
};

}  // namespace

// Registers are capped at 128 a thread (65536 / (threads * 128) blocks per SM):
// two 256-thread blocks of the large tile per SM, none spilled.
template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool TA, bool TB, int ACT, bool VEC>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32, 65536 / ((BM / WM) * (BN / WN) * 32 * 128))
gemm(T* __restrict__ C, T* __restrict__ Z, const T* __restrict__ A, const T* __restrict__ B,
     const T* __restrict__ bias, int M, int N, int K, T alpha) {
    constexpr int NT = (BM / WM) * (BN / WN) * 32;
    constexpr int W = nnf::Vec<T>::width;
    constexpr int TM = WM / 4;  // a lane's rows ...
    constexpr int TN = WN / 8;  // ... and columns
    constexpr int RM = TM / W;  // as runs of W, 4 W rows apart
    constexpr int RN = TN / W;  // and 8 W columns apart
    static_assert(STAGES >= 2, "a pipeline needs two stages");
    static_assert(BM % WM == 0 && BN % WN == 0, "warps must tile the block");
    static_assert(TM % W == 0 && TN % W == 0, "a lane's rows and columns are whole vectors");

    // A element (m, k) is at A[m * K + k] (not TA) or A[k * M + m] (TA);
    // B element (n, k) is at B[k * N + n] (not TB) or B[n * K + k] (TB).
    typedef OperandCopier<T, BM, BK, NT, !TA, VEC> CopyA;
    typedef OperandCopier<T, BN, BK, NT, TB, VEC> CopyB;
    T* As = nnf::dynamic_smem<T>();      // [STAGES][BK][CopyA::PITCH]
    T* Bs = As + STAGES * CopyA::SIZE;   // [STAGES][BK][CopyB::PITCH]

    // Row tiles along x (up to 2^31 - 1 blocks: any batch), column tiles along y, K splits along z.
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int am = (warp / (BN / WN)) * WM + (lane / 8) * W;  // the lane's first row in the block tile
    const int bn = (warp % (BN / WN)) * WN + (lane % 8) * W;  // and its first column

    // This block's share of the K slices: [s0, s0 + count), elements [s0 * BK, kend).
    const int slices = (int)(((long long)K + BK - 1) / BK);
    const int per = (slices + (int)gridDim.z - 1) / (int)gridDim.z;
    const int s0 = (int)blockIdx.z * per;
    const int count = max(0, min(slices - s0, per));
    const int kbeg = s0 * BK;
    const int kend = (int)min((long long)K, (long long)(s0 + count) * BK);
    CopyA copy_a(A, TA ? M : K, m0, M, kbeg);
    CopyB copy_b(B, TB ? K : N, n0, N, kbeg);

    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    // Prologue: slices 0 .. STAGES - 2 in flight, one commit group each (empty past the end).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < count) {
            copy_a.copy(As + s * CopyA::SIZE, A, kbeg + s * BK, kend);
            copy_b.copy(Bs + s * CopyB::SIZE, B, kbeg + s * BK, kend);
        }
        nnf::cp_async_commit();
    }

    int read = 0, write = STAGES - 1;
#pragma unroll 1
    for (int t = 0; t < count; ++t) {
        nnf::cp_async_wait<STAGES - 2>();  // this thread's copies of slice t have landed;
        __syncthreads();                   // everyone's have, and nobody reads slice t - 1 any more
        if (t + STAGES - 1 < count) {      // refill slice t - 1's stage before the math on slice t
            copy_a.copy(As + write * CopyA::SIZE, A, kbeg + (t + STAGES - 1) * BK, kend);
            copy_b.copy(Bs + write * CopyB::SIZE, B, kbeg + (t + STAGES - 1) * BK, kend);
        }
        nnf::cp_async_commit();
        const T* as = As + read * CopyA::SIZE + am;
        const T* bs = Bs + read * CopyB::SIZE + bn;
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            T a[TM], b[TN];
#pragma unroll
            for (int r = 0; r < RM; ++r) {
                const typename nnf::Vec<T>::type v = nnf::load_vec(as + k * CopyA::PITCH + r * 4 * W);
#pragma unroll
                for (int j = 0; j < W; ++j) a[r * W + j] = reinterpret_cast<const T*>(&v)[j];
            }
#pragma unroll
            for (int r = 0; r < RN; ++r) {
                const typename nnf::Vec<T>::type v = nnf::load_vec(bs + k * CopyB::PITCH + r * 8 * W);
#pragma unroll
                for (int j = 0; j < W; ++j) b[r * W + j] = reinterpret_cast<const T*>(&v)[j];
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        read = read == STAGES - 1 ? 0 : read + 1;
        write = write == STAGES - 1 ? 0 : write + 1;
    }

    // Epilogue: bias, pre-activation (when saved), activation, one store.
    // acc[r * W + v][q * W + l] is C[m0 + am + r * 4W + v][n0 + bn + q * 8W + l]. Column runs
    // outside, so that only one run's bias is live next to the accumulators.
    if (gridDim.z > 1) C += (long long)blockIdx.z * M * N;  // split K: this block's partial product
#pragma unroll
    for (int q = 0; q < RN; ++q) {
        const int col = n0 + bn + q * 8 * W;
        if (col >= N) break;  // columns grow with q
        T bv[W];
#pragma unroll
        for (int l = 0; l < W; ++l) bv[l] = (bias != nullptr && col + l < N) ? bias[col + l] : T(0);
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int row = m0 + am + (i / W) * 4 * W + i % W;
            if (row >= M) break;  // rows grow with i
            T* crow = C + (long long)row * N;
            T* zrow = Z != nullptr ? Z + (long long)row * N : nullptr;
            if (VEC) {  // N is a multiple of W: the whole vector is in range
                typename nnf::Vec<T>::type zv, yv;
#pragma unroll
                for (int l = 0; l < W; ++l) {
                    const T z = acc[i][q * W + l] + bv[l];
                    nnf::lane<T>(zv, l) = z;
                    nnf::lane<T>(yv, l) = nnf::Act<T, ACT>::fwd(z, alpha);
                }
                if (zrow != nullptr) nnf::store_vec(zrow + col, zv);
                nnf::store_vec(crow + col, yv);
            } else {
#pragma unroll
                for (int l = 0; l < W; ++l) {
                    if (col + l < N) {
                        const T z = acc[i][q * W + l] + bv[l];
                        if (zrow != nullptr) zrow[col + l] = z;
                        crow[col + l] = nnf::Act<T, ACT>::fwd(z, alpha);
                    }
                }
            }
        }
    }
}

// Split K, second pass: C = act(ws[0] + ws[1] + ... + ws[splits - 1] + bias),
// the partial products of gemm added in that order, with Z = the
// pre-activation when saved (Z != nullptr). ws is splits x M x N. Rows
// grid-stride along y, columns along x: a warp reads 32 consecutive elements
// of each partial product (memory-bound; wider loads would only unroll the
// activation four times over).
template <typename T, int ACT>
__global__ void __launch_bounds__(256)
gemm_splitk_reduce(T* __restrict__ C, T* __restrict__ Z, const T* __restrict__ ws, const T* __restrict__ bias,
                   int M, int N, int splits, T alpha) {
    const long long mn = (long long)M * N;
    for (int row = blockIdx.y; row < M; row += gridDim.y) {
        for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < N; col += gridDim.x * blockDim.x) {
            const long long i = (long long)row * N + col;
            T z = ws[i];
            for (int s = 1; s < splits; ++s) z += ws[s * mn + i];
            if (bias != nullptr) z += bias[col];
            if (Z != nullptr) Z[i] = z;
            C[i] = nnf::Act<T, ACT>::fwd(z, alpha);
        }
    }
}

// dz = dy * act'(saved) over rows [blockIdx.y * rows_per_split, ...) of an
// M x N matrix, and the column sums of those dz rows into
// partial[blockIdx.y * N + col] (skipped when partial is null). dz is not
// written when it is null (identity: dz is dy itself). Block (32, BY): 32
// consecutive columns per block, BY row lanes; shared scratch BY * 32 values.
template <typename T, int ACT>
__global__ void __launch_bounds__(256)
bias_act_backward(T* __restrict__ dz, T* __restrict__ partial, const T* __restrict__ dy,
                  const T* __restrict__ saved, int M, int N, int rows_per_split, T alpha) {
    T* scratch = nnf::dynamic_smem<T>();  // [blockDim.y][32]
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_split;
    const int r1 = r0 + rows_per_split < M ? r0 + rows_per_split : M;
    T sum = T(0);
    if (col < N) {
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            const long long idx = (long long)r * N + col;
            T g = dy[idx];
            if (ACT != nnf::ACT_IDENTITY) g *= nnf::Act<T, ACT>::grad(saved[idx], alpha);
            if (dz != nullptr) dz[idx] = g;
            sum += g;
        }
    }
    if (partial == nullptr) return;  // uniform over the block
    scratch[threadIdx.y * 32 + threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < N) {
        T total = scratch[threadIdx.x];
        for (int y = 1; y < (int)blockDim.y; ++y) total += scratch[y * 32 + threadIdx.x];
        partial[(long long)blockIdx.y * N + col] = total;
    }
}

// out[col] = sum over s < splits of partial[s * N + col], in order.
template <typename T>
__global__ void __launch_bounds__(256)
column_sum(T* __restrict__ out, const T* __restrict__ partial, int splits, int N) {
    for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < N; col += gridDim.x * blockDim.x) {
        T total = T(0);
        for (int s = 0; s < splits; ++s) total += partial[(long long)s * N + col];
        out[col] = total;
    }
}
