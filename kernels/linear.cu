// nnfast CUDA kernels: the linear layer, act(x @ W + b), forward and backward.
//
// gemm<T, BM, BN, BK, TM, TN, TA, TB, ACT, VEC> computes
//     C[M, N] = act(op(A)[M, K] @ op(B)[K, N] + bias)
// with every matrix row-major and contiguous. op(A) = A (stored M x K) when
// TA is false and A^T (A stored K x M) when true; likewise op(B) = B (stored
// K x N) or B^T (B stored N x K). The three products of a linear layer are
//     forward  y  = act(x @ W + b)  : gemm<..., false, false, ACT, ...>
//     backward dW = x^T @ dz        : gemm<..., true,  false, IDENTITY, ...>
//              dx = dz @ W^T        : gemm<..., false, true,  IDENTITY, ...>
// so no transpose is ever materialised.
//
// Tiling: a block of (BM/TM) * (BN/TN) threads owns a BM x BN tile of C and
// walks K in steps of BK. Each step stages a BK x BM slice of op(A) and a
// BK x BN slice of op(B) in shared memory, both k-major ([k][m], [k][n]), so
// the inner product reads a TM-vector of A and a TN-vector of B per k and
// accumulates a TM x TN register tile (register blocking). The slices are
// double-buffered: the global loads of step t + 1 are issued into registers
// before the arithmetic of step t and written to the other shared buffer after
// it, one __syncthreads per step. A thread's TN columns are TN / W vectors
// spaced BN / (TN / W) apart (W = elements per 128-bit vector), so a quarter
// warp reads consecutive shared-memory words (no bank conflicts) and a warp's
// stores are contiguous. Global loads are 128-bit vectors when VEC (every
// leading dimension a multiple of W and every pointer 16-byte aligned: decided
// by the launcher), scalar otherwise; out-of-range elements load as zero and
// out-of-range outputs are never stored, so any M, N, K works. The epilogue
// adds the bias, writes the pre-activation z when the backward pass needs it
// (Z != nullptr), applies the activation and stores once.
//
// bias_act_backward<T, ACT> fuses dz = dy * act'(saved) with the column sums
// of dz (the bias gradient), in row splits whose partial sums column_sum<T>
// adds in a fixed order (deterministic, no atomics).
#include "common.cuh"

namespace {

// One BK x BX slice of an operand, moved global -> registers -> shared memory
// (dst[k][x], row pitch BX + W). The operand element (x, k) lives at
// src[x * ld + k] when K_CONTIG and at src[k * ld + x] otherwise; elements with
// x >= xmax or k >= kmax read as zero. Each thread moves ITEMS groups of V
// consecutive elements (V = W when VEC, else 1) along the contiguous axis.
template <typename T, int BX, int BK, int NT, bool K_CONTIG, bool VEC>
struct TileStage {
    static constexpr int W = nnf::Vec<T>::width;
    static constexpr int V = VEC ? W : 1;
    static constexpr int PITCH = BX + W;
    static constexpr int PER_ROW = (K_CONTIG ? BK : BX) / V;  // groups per contiguous source row
    static constexpr int COUNT = BX * BK / V;                  // groups in the slice
    static constexpr int ITEMS = (COUNT + NT - 1) / NT;        // groups per thread
    T r[ITEMS * V];

    static __device__ __forceinline__ void coords(int g, int& x, int& k) {
        if (K_CONTIG) {
            x = g / PER_ROW;
            k = (g % PER_ROW) * V;
        } else {
            k = g / PER_ROW;
            x = (g % PER_ROW) * V;
        }
    }

    __device__ __forceinline__ void load(const T* __restrict__ src, long long ld, int x0, int xmax, int k0,
                                         int kmax) {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const int g = (int)threadIdx.x + it * NT;
            if (COUNT % NT != 0 && g >= COUNT) break;
            int x, k;
            coords(g, x, k);
            const int gx = x0 + x, gk = k0 + k;
            // With VEC, xmax (or kmax) along the contiguous axis is a multiple
            // of V: a group is entirely in range or entirely out.
            if (gx < xmax && gk < kmax) {
                const T* p = K_CONTIG ? src + (long long)gx * ld + gk : src + (long long)gk * ld + gx;
                if (VEC) {
                    const typename nnf::Vec<T>::type v = nnf::load_vec(p);
#pragma unroll
                    for (int j = 0; j < V; ++j) r[it * V + j] = reinterpret_cast<const T*>(&v)[j];
                } else {
                    r[it * V] = *p;
                }
            } else {
#pragma unroll
                for (int j = 0; j < V; ++j) r[it * V + j] = T(0);
            }
        }
    }

    __device__ __forceinline__ void store(T* __restrict__ dst) const {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const int g = (int)threadIdx.x + it * NT;
            if (COUNT % NT != 0 && g >= COUNT) break;
            int x, k;
            coords(g, x, k);
            if (K_CONTIG) {
#pragma unroll
                for (int j = 0; j < V; ++j) dst[(k + j) * PITCH + x] = r[it * V + j];
            } else if (VEC) {
                typename nnf::Vec<T>::type v;
#pragma unroll
                for (int j = 0; j < V; ++j) nnf::lane<T>(v, j) = r[it * V + j];
                nnf::store_vec(dst + k * PITCH + x, v);
            } else {
                dst[k * PITCH + x] = r[it * V];
            }
        }
    }
};

}  // namespace

// Vector path: two blocks per SM (at most 128 registers, none spilled); the
// scalar fallback keeps its address arithmetic in registers at one block.
template <typename T, int BM, int BN, int BK, int TM, int TN, bool TA, bool TB, int ACT, bool VEC>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), VEC ? 2 : 1)
gemm(T* __restrict__ C, T* __restrict__ Z, const T* __restrict__ A, const T* __restrict__ B,
     const T* __restrict__ bias, int M, int N, int K, T alpha) {
    constexpr int NT = (BM / TM) * (BN / TN);
    constexpr int W = nnf::Vec<T>::width;
    constexpr int PA = BM + W;  // shared row pitch of the A slice
    constexpr int PB = BN + W;
    constexpr int NV = TN / W;        // column vectors per thread
    constexpr int VSTEP = BN / NV;    // distance between them
    static_assert(TM % W == 0 && TN % W == 0, "thread tile must be whole vectors");
    static_assert(BK % W == 0 && BM % W == 0 && BN % W == 0, "block tile must be whole vectors");
    static_assert((BN / TN) * W == VSTEP, "column vectors must tile the block");

    // Two buffers per operand: [2][BK][PA] then [2][BK][PB].
    T* As = nnf::dynamic_smem<T>();
    T* Bs = As + 2 * BK * PA;

    // Row tiles along x (up to 2^31 - 1 blocks: any batch), column tiles along y.
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int ty = threadIdx.x / (BN / TN);
    const int tx = threadIdx.x % (BN / TN);
    const long long lda = TA ? M : K;
    const long long ldb = TB ? K : N;

    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    // A element (m, k) is at A[m * K + k] (not TA) or A[k * M + m] (TA);
    // B element (n, k) is at B[k * N + n] (not TB) or B[n * K + k] (TB).
    TileStage<T, BM, BK, NT, !TA, VEC> sa;
    TileStage<T, BN, BK, NT, TB, VEC> sb;
    sa.load(A, lda, m0, M, 0, K);
    sb.load(B, ldb, n0, N, 0, K);
    sa.store(As);
    sb.store(Bs);
    __syncthreads();

    const int steps = (K + BK - 1) / BK;
    for (int t = 0; t < steps; ++t) {
        const int cur = t & 1;
        const bool more = t + 1 < steps;
        if (more) {  // next slices: global loads in flight during the arithmetic below
            sa.load(A, lda, m0, M, (t + 1) * BK, K);
            sb.load(B, ldb, n0, N, (t + 1) * BK, K);
        }
        const T* as = As + cur * BK * PA;
        const T* bs = Bs + cur * BK * PB;
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            T a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; i += W) {
                const typename nnf::Vec<T>::type v = nnf::load_vec(as + k * PA + ty * TM + i);
#pragma unroll
                for (int j = 0; j < W; ++j) a[i + j] = reinterpret_cast<const T*>(&v)[j];
            }
#pragma unroll
            for (int q = 0; q < NV; ++q) {
                const typename nnf::Vec<T>::type v = nnf::load_vec(bs + k * PB + q * VSTEP + tx * W);
#pragma unroll
                for (int j = 0; j < W; ++j) b[q * W + j] = reinterpret_cast<const T*>(&v)[j];
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        if (more) {  // the other buffer was last read before the previous barrier
            sa.store(As + (cur ^ 1) * BK * PA);
            sb.store(Bs + (cur ^ 1) * BK * PB);
        }
        __syncthreads();
    }

    // Epilogue: bias, pre-activation (when saved), activation, one store.
    // Column of acc[i][q * W + l]: n0 + q * VSTEP + tx * W + l.
    T bv[TN];
#pragma unroll
    for (int q = 0; q < NV; ++q)
#pragma unroll
        for (int l = 0; l < W; ++l) {
            const int col = n0 + q * VSTEP + tx * W + l;
            bv[q * W + l] = (bias != nullptr && col < N) ? bias[col] : T(0);
        }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = m0 + ty * TM + i;
        if (row >= M) break;
        T* crow = C + (long long)row * N;
        T* zrow = Z != nullptr ? Z + (long long)row * N : nullptr;
#pragma unroll
        for (int q = 0; q < NV; ++q) {
            const int col = n0 + q * VSTEP + tx * W;
            if (VEC) {
                if (col < N) {  // N is a multiple of W: the whole vector is in range
                    typename nnf::Vec<T>::type zv, yv;
#pragma unroll
                    for (int l = 0; l < W; ++l) {
                        const T z = acc[i][q * W + l] + bv[q * W + l];
                        nnf::lane<T>(zv, l) = z;
                        nnf::lane<T>(yv, l) = nnf::Act<T, ACT>::fwd(z, alpha);
                    }
                    if (zrow != nullptr) nnf::store_vec(zrow + col, zv);
                    nnf::store_vec(crow + col, yv);
                }
            } else {
#pragma unroll
                for (int l = 0; l < W; ++l) {
                    if (col + l < N) {
                        const T z = acc[i][q * W + l] + bv[q * W + l];
                        if (zrow != nullptr) zrow[col + l] = z;
                        crow[col + l] = nnf::Act<T, ACT>::fwd(z, alpha);
                    }
                }
            }
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
