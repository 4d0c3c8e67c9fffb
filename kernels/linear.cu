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
// accumulates a TM x TN register tile (register blocking). Global loads are
// 128-bit vectors when VEC (every leading dimension a multiple of the vector
// width, every pointer 16-byte aligned: decided by the launcher), scalar
// otherwise; out-of-range elements load as zero and out-of-range outputs are
// never stored, so any M, N, K works. The epilogue adds the bias, writes the
// pre-activation z when the backward pass needs it (Z != nullptr), applies the
// activation and stores once.
//
// bias_act_backward<T, ACT> fuses dz = dy * act'(saved) with the column sums
// of dz (the bias gradient), in row splits whose partial sums column_sum<T>
// adds in a fixed order (deterministic, no atomics).
#include "common.cuh"

namespace {

// Stage one BK x BX slice of an operand into shared memory as dst[k][x],
// row pitch BX + Vec<T>::width. The operand element (x, k) lives at
// src[x * ld + k] when K_CONTIG and at src[k * ld + x] otherwise; elements
// with x >= xmax or k >= kmax read as zero.
template <typename T, int BX, int BK, int NT, bool K_CONTIG, bool VEC>
__device__ __forceinline__ void stage_tile(T* __restrict__ dst, const T* __restrict__ src, long long ld,
                                           int x0, int xmax, int k0, int kmax) {
    constexpr int W = nnf::Vec<T>::width;
    constexpr int V = VEC ? W : 1;
    constexpr int PITCH = BX + W;
    const int tid = threadIdx.x;
    if (K_CONTIG) {
        constexpr int PER_ROW = BK / V;
        for (int i = tid; i < BX * PER_ROW; i += NT) {
            const int x = i / PER_ROW;
            const int k = (i % PER_ROW) * V;
            const int gx = x0 + x, gk = k0 + k;
            const bool in = gx < xmax && gk < kmax;
            if (VEC) {
                typename nnf::Vec<T>::type v;
                if (in) {
                    v = nnf::load_vec(src + (long long)gx * ld + gk);
                } else {
#pragma unroll
                    for (int j = 0; j < W; ++j) nnf::lane<T>(v, j) = T(0);
                }
#pragma unroll
                for (int j = 0; j < W; ++j) dst[(k + j) * PITCH + x] = nnf::lane<T>(v, j);
            } else {
                dst[k * PITCH + x] = in ? src[(long long)gx * ld + gk] : T(0);
            }
        }
    } else {
        constexpr int PER_ROW = BX / V;
        for (int i = tid; i < BK * PER_ROW; i += NT) {
            const int k = i / PER_ROW;
            const int x = (i % PER_ROW) * V;
            const int gx = x0 + x, gk = k0 + k;
            const bool in = gx < xmax && gk < kmax;
            if (VEC) {
                typename nnf::Vec<T>::type v;
                if (in) {
                    v = nnf::load_vec(src + (long long)gk * ld + gx);
                } else {
#pragma unroll
                    for (int j = 0; j < W; ++j) nnf::lane<T>(v, j) = T(0);
                }
                nnf::store_vec(dst + k * PITCH + x, v);
            } else {
                dst[k * PITCH + x] = in ? src[(long long)gk * ld + gx] : T(0);
            }
        }
    }
}

}  // namespace

template <typename T, int BM, int BN, int BK, int TM, int TN, bool TA, bool TB, int ACT, bool VEC>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
gemm(T* __restrict__ C, T* __restrict__ Z, const T* __restrict__ A, const T* __restrict__ B,
     const T* __restrict__ bias, int M, int N, int K, T alpha) {
    constexpr int NT = (BM / TM) * (BN / TN);
    constexpr int W = nnf::Vec<T>::width;
    constexpr int PA = BM + W;  // shared row pitch of the A slice
    constexpr int PB = BN + W;
    static_assert(TM % W == 0 && TN % W == 0, "thread tile must be whole vectors");
    static_assert(BK % W == 0 && BM % W == 0 && BN % W == 0, "block tile must be whole vectors");

    T* As = nnf::dynamic_smem<T>();  // [BK][PA]
    T* Bs = As + BK * PA;                    // [BK][PB]

    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int ty = threadIdx.x / (BN / TN);
    const int tx = threadIdx.x % (BN / TN);
    const long long lda = TA ? M : K;
    const long long ldb = TB ? K : N;

    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    for (int k0 = 0; k0 < K; k0 += BK) {
        // A element (m, k) is at A[m * K + k] (not TA) or A[k * M + m] (TA).
        stage_tile<T, BM, BK, NT, !TA, VEC>(As, A, lda, m0, M, k0, K);
        // B element (n, k) is at B[k * N + n] (not TB) or B[n * K + k] (TB).
        stage_tile<T, BN, BK, NT, TB, VEC>(Bs, B, ldb, n0, N, k0, K);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            T a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; i += W) {
                const typename nnf::Vec<T>::type v = nnf::load_vec(As + k * PA + ty * TM + i);
#pragma unroll
                for (int j = 0; j < W; ++j) a[i + j] = reinterpret_cast<const T*>(&v)[j];
            }
#pragma unroll
            for (int i = 0; i < TN; i += W) {
                const typename nnf::Vec<T>::type v = nnf::load_vec(Bs + k * PB + tx * TN + i);
#pragma unroll
                for (int j = 0; j < W; ++j) b[i + j] = reinterpret_cast<const T*>(&v)[j];
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }

    // Epilogue: bias, pre-activation (when saved), activation, one store.
    const int col0 = n0 + tx * TN;
    T bv[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = (bias != nullptr && col0 + j < N) ? bias[col0 + j] : T(0);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = m0 + ty * TM + i;
        if (row >= M) break;
        T* crow = C + (long long)row * N;
        T* zrow = Z != nullptr ? Z + (long long)row * N : nullptr;
        if (VEC) {
#pragma unroll
            for (int j = 0; j < TN; j += W) {
                if (col0 + j < N) {  // N is a multiple of W: the whole vector is in range
                    typename nnf::Vec<T>::type zv, yv;
#pragma unroll
                    for (int l = 0; l < W; ++l) {
                        const T z = acc[i][j + l] + bv[j + l];
                        nnf::lane<T>(zv, l) = z;
                        nnf::lane<T>(yv, l) = nnf::Act<T, ACT>::fwd(z, alpha);
                    }
                    if (zrow != nullptr) nnf::store_vec(zrow + col0 + j, zv);
                    nnf::store_vec(crow + col0 + j, yv);
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                if (col0 + j < N) {
                    const T z = acc[i][j] + bv[j];
                    if (zrow != nullptr) zrow[col0 + j] = z;
                    crow[col0 + j] = nnf::Act<T, ACT>::fwd(z, alpha);
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
