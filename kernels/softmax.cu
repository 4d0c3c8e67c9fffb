// nnfast CUDA kernels: softmax and log-softmax over the rows of a matrix.
//
// softmax_rows<T, RT, LOG>: RT threads per row (RT == 32: one warp per row,
// 8 rows per block; RT > 32: one block per row). Pass 1 reads the row once
// keeping a running max and sum of exp (online softmax) and reduces it with
// warp shuffles (plus shared memory across warps); pass 2 reads it again and
// writes exp(x - max) / sum, or x - max - log(sum) when LOG. 128-bit loads
// and stores (see rows.cuh). Launch: rows_per_block rows per block,
// grid = ceil(rows / rows_per_block), shared memory 3 * RT / 32 values.
#include "rows.cuh"

namespace {

// exp(x - max) / sum, and (x - max) - log(sum) for log-softmax; x - max is
// formed first so that large logits keep their precision.
template <typename T, bool LOG>
struct SoftmaxOut {
    T m, inv_s;
    __device__ __forceinline__ SoftmaxOut(T max, T sum) : m(max), inv_s(T(1) / sum) {}
    __device__ __forceinline__ T operator()(T x, int) const { return nnf::m_exp(x - m) * inv_s; }
};

template <typename T>
struct SoftmaxOut<T, true> {
    T m, log_s;
    __device__ __forceinline__ SoftmaxOut(T max, T sum) : m(max), log_s(nnf::m_log(sum)) {}
    __device__ __forceinline__ T operator()(T x, int) const { return (x - m) - log_s; }
};

}  // namespace

template <typename T, int RT, bool LOG>
__global__ void __launch_bounds__(nnf::RowLayout<RT>::threads, sizeof(T) == 4 ? nnf::RowLayout<RT>::min_blocks : 1)
softmax_rows(T* __restrict__ y, const T* __restrict__ x, int rows, int cols) {
    T* scratch = nnf::dynamic_smem<T>();
    constexpr int RPB = nnf::RowLayout<RT>::rows_per_block;
    const int row = blockIdx.x * RPB + (int)threadIdx.x / RT;
    const int lane_id = threadIdx.x % RT;
    if (row >= rows) return;  // uniform per row: a whole warp (RT == 32) or the block
    const T* xr = x + (long long)row * cols;
    T* yr = y + (long long)row * cols;

    nnf::OnlineMaxSum<T> acc(T(0), T(0));  // the mean is not needed
    nnf::row_visit<T, RT>(xr, cols, lane_id, acc);
    nnf::row_reduce<T, RT>(acc, scratch);

    SoftmaxOut<T, LOG> out(acc.m, acc.s);
    nnf::row_map<T, RT>(yr, xr, cols, lane_id, out);
}
