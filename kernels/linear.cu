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
// stages (gemm_staging.cuh: SliceRing), both operands stored k-major ([k][m]
// and [k][n]), moved with cp.async, STAGES - 1 slices in flight behind the
// math. An operand stored with m (or n) contiguous is copied in 16-byte pieces
// when VEC (every leading dimension a multiple of W, every pointer 16-byte
// aligned: decided by the launcher), element by element otherwise; an operand
// stored with k contiguous is transposed on the way in, element by element,
// its rows padded by W so that the eight k of a warp's writes land in distinct
// banks. Elements outside the matrix are zero-filled by the copy and outputs
// outside it are never stored, so any M, N, K works.
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
#include "gemm_staging.cuh"

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
    static_assert(BM % WM == 0 && BN % WN == 0, "warps must tile the block");
    static_assert(TM % W == 0 && TN % W == 0, "a lane's rows and columns are whole vectors");

    // A element (m, k) is at A[m * K + k] (not TA) or A[k * M + m] (TA);
    // B element (n, k) is at B[k * N + n] (not TB) or B[n * K + k] (TB).
    typedef nnf::OperandCopier<T, BM, BK, NT, !TA, VEC, true, TA ? 0 : W> CopyA;
    typedef nnf::OperandCopier<T, BN, BK, NT, TB, VEC, true, TB ? W : 0> CopyB;

    // Row tiles along x (up to 2^31 - 1 blocks: any batch), column tiles along y, K splits along z.
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int am = (warp / (BN / WN)) * WM + (lane / 8) * W;  // the lane's first row in the block tile
    const int bn = (warp % (BN / WN)) * WN + (lane % 8) * W;  // and its first column

    // The ring of stages, this block's share of the K slices (all of them without split K).
    nnf::SliceRing<T, CopyA, CopyB, STAGES, BK> ring(A, TA ? M : K, m0, M, B, TB ? K : N, n0, N, nnf::k_share<BK>(K));

    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    ring.prologue();
#pragma unroll 1
    for (int t = 0; t < ring.count; ++t) {
        ring.wait_and_refill(t);
        const T* as = ring.a_stage(am);
        const T* bs = ring.b_stage(bn);
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
        ring.advance();
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
        nnf::load_bias(bv, bias, col, N);
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int row = m0 + am + (i / W) * 4 * W + i % W;
            if (row >= M) break;  // rows grow with i
            T z[W];
#pragma unroll
            for (int l = 0; l < W; ++l) z[l] = acc[i][q * W + l] + bv[l];
            nnf::store_run<T, ACT, VEC>(C + (long long)row * N, Z != nullptr ? Z + (long long)row * N : nullptr,
                                        col, N, z, alpha);
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
