// nnfast CUDA kernels: row-wise traversal shared by softmax and cross-entropy.
//
// A row of n values is processed by RT cooperating threads: RT == 32 is one
// warp per row (short rows, several rows per block), RT > 32 one block per row
// (long rows). Each pass over a row moves 128-bit vectors: a scalar head runs
// up to the first 16-byte boundary, the body is vectors, a scalar tail ends
// it, so any row length and any row offset are handled.
//
// Callers guarantee that an input row and the matching output row have the
// same address modulo 16 (both matrices start 16-byte aligned and have the
// same shape); the head is computed from the input pointer.
#ifndef NNFAST_ROWS_CUH
#define NNFAST_ROWS_CUH

#include "common.cuh"

namespace nnf {

// Rows per block for RT threads per row.
// min_blocks is the float __launch_bounds__ occupancy hint: with it ptxas
// budgets up to 65536 / (2 * threads) registers instead of squeezing the short
// row loops into 32 registers with a spill (double kernels, which need more
// registers, use 1).
template <int RT>
struct RowLayout {
    static constexpr int rows_per_block = RT == WARP ? 8 : 1;
    static constexpr int threads = RT * rows_per_block;
    static constexpr int min_blocks = 2;
};

// Number of leading scalars before the first 16-byte boundary (at most n).
template <typename T>
__device__ __forceinline__ int row_head(const T* p, int n) {
    const unsigned long long addr = reinterpret_cast<unsigned long long>(p);
    const int h = (int)(((16ull - (addr & 15ull)) & 15ull) / sizeof(T));
    return h < n ? h : n;
}

// Visit every element of the row (this thread's share): f.one(x) for the
// scalar head and tail, f.vec(v) for each 128-bit vector of the body.
template <typename T, int RT, typename F>
__device__ __forceinline__ void row_visit(const T* __restrict__ p, int n, int lane_id, F& f) {
    constexpr int W = Vec<T>::width;
    const int h = row_head(p, n);
    if (lane_id < h) f.one(p[lane_id]);
    const int nv = (n - h) / W;
    const T* body = p + h;
#pragma unroll 4  // several 128-bit loads in flight per thread
    for (int v = lane_id; v < nv; v += RT) f.vec(load_vec(body + v * W));
    const int t = h + nv * W + lane_id;
    if (t < n) f.one(p[t]);
}

// out[j] = f(in[j], j) for every element of the row; this thread's share.
template <typename T, int RT, typename F>
__device__ __forceinline__ void row_map(T* __restrict__ out, const T* __restrict__ in, int n, int lane_id,
                                        F& f) {
    constexpr int W = Vec<T>::width;
    const int h = row_head(in, n);
    if (lane_id < h) out[lane_id] = f(in[lane_id], lane_id);
    const int nv = (n - h) / W;
#pragma unroll 4
    for (int v = lane_id; v < nv; v += RT) {
        const int j = h + v * W;
        typename Vec<T>::type x = load_vec(in + j);
#pragma unroll
        for (int k = 0; k < W; ++k) lane<T>(x, k) = f(lane<T>(x, k), j + k);
        store_vec(out + j, x);
    }
    const int t = h + nv * W + lane_id;
    if (t < n) out[t] = f(in[t], t);
}

// out[j] = value for every element of the row; this thread's share.
template <typename T, int RT>
__device__ __forceinline__ void row_fill(T* __restrict__ out, int n, int lane_id, T value) {
    for (int j = lane_id; j < n; j += RT) out[j] = value;
}

// Running (max, sum of exp(x - max), sum of (x - pivot) * mean_scale) of a row.
// A vector updates the max once (rescaling the sum only when it grows), then
// adds its exps. With mean_scale = 1 / n, sx is the row mean less the pivot
// (one of the row's values, the same for every thread): measured from a value
// of the row, the mean keeps its precision when every logit sits near one
// large offset (max - mean of logits around 1e5 would cancel to the float
// ulp of 1e5), and the scaled terms cannot overflow where a plain sum would.
template <typename T>
struct OnlineMaxSum {
    T m, s, sx, mean_scale, pivot;
    __device__ __forceinline__ OnlineMaxSum(T scale, T row_pivot)
        : m(Constants<T>::lowest()), s(T(0)), sx(T(0)), mean_scale(scale), pivot(row_pivot) {}
    // (x - pivot) * mean_scale. The difference overflows only for values on
    // either side of zero near the float limits: there the terms are scaled first.
    __device__ __forceinline__ T centred(T x) const {
        const T d = x - pivot;
        return m_abs(d) <= -Constants<T>::lowest() ? d * mean_scale : x * mean_scale - pivot * mean_scale;
    }
    __device__ __forceinline__ void one(T x) {
        if (x > m) {
            s *= m_exp(m - x);
            m = x;
        }
        s += m_exp(x - m);
        sx += centred(x);
    }
    __device__ __forceinline__ void vec(const typename Vec<T>::type& v) {
        constexpr int W = Vec<T>::width;
        const T* x = reinterpret_cast<const T*>(&v);
        T vm = x[0];
#pragma unroll
        for (int k = 1; k < W; ++k) vm = m_max(vm, x[k]);
        if (vm > m) {
            s *= m_exp(m - vm);
            m = vm;
        }
#pragma unroll
        for (int k = 0; k < W; ++k) {
            s += m_exp(x[k] - m);
            sx += centred(x[k]);
        }
    }
};

// All-reduce an OnlineMaxSum over the RT threads of a row (warp shuffles, then
// shared memory across warps when RT > 32). `scratch`: 3 * RT / 32 values.
template <typename T, int RT>
__device__ __forceinline__ void row_reduce(OnlineMaxSum<T>& acc, T* scratch) {
    if (RT == WARP) {
        warp_max_sum(acc.m, acc.s);
        acc.sx = warp_sum(acc.sx);
    } else {
        block_max_sum<T, RT>(acc.m, acc.s, acc.sx, scratch);
    }
}

}  // namespace nnf

#endif  // NNFAST_ROWS_CUH
