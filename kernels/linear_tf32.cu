// nnfast CUDA kernels: the linear layer's GEMMs on the tensor cores, in TF32.
//
// gemm_tf32<BM, BN, BK, WM, WN, STAGES, TA, TB, ACT, VEC> computes, in float32
// storage, C[M, N] = act(op(A)[M, K] @ op(B)[K, N] + bias) as gemm<float, ...>
// of linear.cu does (same arguments, same op(A) / op(B), same split K and
// epilogue), but multiplies on the tensor cores through nvcuda::wmma
// (m16n16k8, precision::tf32): every operand element is rounded to TF32 (10
// mantissa bits, __float_to_tf32: to nearest, ties away from zero), the
// products are exact and accumulated in float. The relative error of a dot
// product of length K is then about 2^-11 sqrt(K) times the norm of its terms
// (random rounding errors of the operands, which dominate the float
// accumulation's). The launcher uses it for float32 GEMMs when the matmul
// precision is "high" (nnfast.precision); float64 never comes here.
//
// Tiling. A block of (BM / WM) x (BN / WN) warps owns a BM x BN tile of C, each
// warp a WM x WN part of it as (WM / 16) x (WN / 16) accumulator fragments of
// 16 x 16. Per 8-deep step of k a warp loads WM / 16 fragments of A and WN / 16
// of B from shared memory and issues one mma_sync per pair: with 64 x 64 per
// warp that is 16 tensor-core operations on 8 fragments (32 floats a lane), so
// each shared-memory value read feeds 4 products of 16 x 16 x 8.
//
// Stages. K is walked in BK-deep slices through the ring of STAGES stages of
// gemm_staging.cuh (cp.async, STAGES - 1 slices in flight behind the math). A
// stage keeps its operand's layout in global memory, so every copy is a
// straight 16-byte cp.async when VEC (4 bytes otherwise) and never a transpose:
// A not transposed is stored [m][k] and read as a row_major matrix_a, A^T is
// stored [k][m] and read col_major; B is stored [k][n] (row_major matrix_b),
// B^T [n][k] (col_major). Rows are padded so that the eight rows (or k) a
// fragment load touches at once start in different banks: rows of k (BK + 4
// floats) by 4 banks, rows of m or n (BX + 8) by 8. Padding keeps every row
// and fragment 32-byte aligned (wmma's pointer rule) and every ldm a multiple
// of 4 floats (its ldm rule). Elements outside the matrix are zero-filled by
// the copies, so any M, N, K works.
//
// Epilogue, through shared memory. The fragments' element-to-lane mapping is
// unspecified, so the accumulators are stored (store_matrix_sync) into a
// BM x (BN + 8) float tile in the stages' memory once the last slice is done;
// then every thread takes runs of 4 consecutive columns of it, adds the bias,
// writes the pre-activation Z when the backward pass needs it and the
// activation, as 16-byte stores when VEC (a warp writes 512 contiguous bytes of
// a row), with gemm_staging.cuh's store_run: the same epilogue as the FMA GEMM.
//
// Shared memory: max(STAGES stages of both operands, the C tile), more than the
// 48 KiB default for the large tiles (the launcher raises the kernel's limit).
// Registers: no cap beyond 255 (__launch_bounds__(threads, 1)); the 128 x 256
// tile's 64 x 64 warp tiles hold 128 accumulator floats a lane.
#ifndef NNFAST_CUDA_HOST_EMULATION
#include <mma.h>
#endif
#include "gemm_staging.cuh"

namespace {

template <bool C, class T, class F>
struct Pick {
    typedef T type;
};
template <class T, class F>
struct Pick<false, T, F> {
    typedef F type;
};

// Rounds a thread's copies of a slice to tf32 (cvt.rna: to nearest, ties away from zero) in
// shared memory, as they land: every fragment loaded from the stage then holds tf32 values,
// as mma_sync requires. Once per element and slice, where rounding each fragment after its
// load would round every element once per warp reading it (2 to 4 times), at two integer
// instructions an element on sm_90.
struct RoundToTf32 {
    __device__ __forceinline__ void operator()(float* p, nnf::Run<4>) const {
        float4 v = nnf::load_vec(p);
        v.x = nvcuda::wmma::__float_to_tf32(v.x);
        v.y = nvcuda::wmma::__float_to_tf32(v.y);
        v.z = nvcuda::wmma::__float_to_tf32(v.z);
        v.w = nvcuda::wmma::__float_to_tf32(v.w);
        nnf::store_vec(p, v);
    }
    __device__ __forceinline__ void operator()(float* p, nnf::Run<1>) const { *p = nvcuda::wmma::__float_to_tf32(*p); }
};

}  // namespace

template <int BM, int BN, int BK, int WM, int WN, int STAGES, bool TA, bool TB, int ACT, bool VEC>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32, 1)
gemm_tf32(float* __restrict__ C, float* __restrict__ Z, const float* __restrict__ A, const float* __restrict__ B,
          const float* __restrict__ bias, int M, int N, int K, float alpha) {
    using namespace nvcuda;
    constexpr int NT = (BM / WM) * (BN / WN) * 32;
    constexpr int W = 4;            // floats per 16-byte vector
    constexpr int FM = WM / 16;     // accumulator fragments per warp, down ...
    constexpr int FN = WN / 16;     // ... and across
    constexpr int CPITCH = BN + 8;  // floats per row of the epilogue's C tile
    constexpr int RUNS = BN / W;    // runs of W columns per row of the C tile
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0, "warps must tile the block");
    static_assert(BK % 8 == 0, "a slice is whole k-steps of 8");
    static_assert(BM * RUNS % NT == 0, "the epilogue's runs must tile the block");

    // A element (m, k) is at A[m * K + k] (not TA) or A[k * M + m] (TA);
    // B element (n, k) is at B[k * N + n] (not TB) or B[n * K + k] (TB).
    typedef nnf::OperandCopier<float, BM, BK, NT, !TA, VEC, false, TA ? 8 : 4> CopyA;
    typedef nnf::OperandCopier<float, BN, BK, NT, TB, VEC, false, TB ? 4 : 8> CopyB;
    typedef typename Pick<TA, wmma::col_major, wmma::row_major>::type LayoutA;
    typedef typename Pick<TB, wmma::col_major, wmma::row_major>::type LayoutB;
    static_assert(CopyA::PITCH % 4 == 0 && CopyB::PITCH % 4 == 0 && CopyA::SIZE % 8 == 0,
                  "wmma: ldm a multiple of 16 bytes, fragments 32-byte aligned");

    // Row tiles along x (any batch), column tiles along y, K splits along z.
    const int m0 = blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / (BN / WN)) * WM;  // the warp's first row in the block tile
    const int wn = (warp % (BN / WN)) * WN;  // and its first column

    nnf::SliceRing<float, CopyA, CopyB, STAGES, BK> ring(A, TA ? M : K, m0, M, B, TB ? K : N, n0, N,
                                                         nnf::k_share<BK>(K));

    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    ring.prologue();
#pragma unroll 1
    for (int t = 0; t < ring.count; ++t) {
        ring.wait_and_refill(t, RoundToTf32());
        // The k-steps unrolled let the compiler load the next step's fragments during this
        // step's mma_sync (it uses up to 255 registers for that); the scalar path, whose
        // copies keep more registers busy, would spill a few bytes, so it goes step by step.
#pragma unroll(VEC ? BK / 8 : 1)
        for (int k = 0; k < BK; k += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LayoutA> a[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB> b[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i) {
                wmma::load_matrix_sync(a[i], ring.a_stage(CopyA::offset(wm + 16 * i, k)), CopyA::PITCH);
            }
#pragma unroll
            for (int j = 0; j < FN; ++j) {
                wmma::load_matrix_sync(b[j], ring.b_stage(CopyB::offset(wn + 16 * j, k)), CopyB::PITCH);
            }
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        ring.advance();
    }

    // Epilogue. The C tile reuses the stages: every warp must be done with them (the groups
    // still open are empty; waiting for them costs nothing and keeps that true by construction).
    nnf::cp_async_wait<0>();
    __syncthreads();
    float* Cs = nnf::dynamic_smem<float>();  // [BM][CPITCH]
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
            wmma::store_matrix_sync(Cs + (wm + 16 * i) * CPITCH + wn + 16 * j, acc[i][j], CPITCH, wmma::mem_row_major);
    __syncthreads();

    if (gridDim.z > 1) C += (long long)blockIdx.z * M * N;  // split K: this block's partial product
#pragma unroll 4
    for (int it = 0; it < BM * RUNS / NT; ++it) {
        const int idx = it * NT + (int)threadIdx.x;
        const int r = idx / RUNS, c = (idx % RUNS) * W;  // consecutive threads: consecutive runs of a row
        const int row = m0 + r, col = n0 + c;
        if (row >= M || col >= N) continue;
        float bv[W];
        nnf::load_bias(bv, bias, col, N);
        const float4 v = nnf::load_vec(Cs + r * CPITCH + c);
        const float z[W] = {v.x + bv[0], v.y + bv[1], v.z + bv[2], v.w + bv[3]};
        nnf::store_run<float, ACT, VEC>(C + (long long)row * N, Z != nullptr ? Z + (long long)row * N : nullptr,
                                        col, N, z, alpha);
    }
}
