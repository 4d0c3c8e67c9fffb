// nnfast CUDA kernels: fused softmax cross-entropy, loss and gradient in one pass.
//
// Three launches on one stream, no host synchronisation:
//  1. ce_prepare (one block): scans the labels once; info[0] = the first row
//     whose label is neither ignore_index nor in [0, classes) (rows if none),
//     info[1] = the number of rows that count towards "mean", info[2] = the
//     label of row info[0] (0 if none), scale[0] = the factor of the
//     reduction (1 / info[1] for "mean", 0 when every row is ignored; 1 for
//     "sum" and "none"). A bad label is only recorded, never trapped on: the
//     context stays usable, and the host raises ValueError from a copy of info
//     (no later than when it reads the loss). The label is kept in info, so
//     the message holds even after the labels' buffer is reused.
//  2. ce_rows<T, RT>: RT threads per row (one warp for short rows, one block
//     for long ones). Pass 1 reads the row once, keeping a running max, sum of
//     exp and mean logit (online softmax), reduced by warp shuffles (and
//     shared memory across warps). Pass 2 reads it again and writes the
//     gradient scale * (softmax - s / C - (1 - s) * onehot(label)). The row
//     loss (1 - s) * (lse - x[label]) + s * (lse - mean(x)) goes to
//     row_loss[row]. Ignored rows and rows with a bad label get zero loss and
//     zero gradient, and the label is never used as an index unless it is in
//     range.
//  3. ce_reduce<T> (one block, "mean" and "sum" only): loss = scale * sum of
//     row_loss, in a fixed order (deterministic).
#include "rows.cuh"

namespace {

// reduction codes, as cuda_launch.REDUCTION_CODES
enum { RED_MEAN = 0 };

// softmax is exp((x - max) - log(sum)): x - max is formed first so that large
// logits keep their precision (max + log(sum) would round).
template <typename T>
struct CeGrad {
    T m, log_s, scale, smooth_term, hit_term;
    int label;
    __device__ __forceinline__ T operator()(T x, int j) const {
        const T p = nnf::m_exp((x - m) - log_s);
        return scale * ((p - smooth_term) - (j == label ? hit_term : T(0)));
    }
};

}  // namespace

// One block of blockDim.x threads (a multiple of 32, at most 1024); shared
// memory 2 * blockDim.x / 32 ints.
__global__ void __launch_bounds__(1024)
ce_prepare(long long* __restrict__ info, double* __restrict__ scale, const long long* __restrict__ labels,
           int rows, int classes, long long ignore_index, int reduction) {
    int* scratch = nnf::dynamic_smem<int>();
    int first_bad = rows;
    int count = 0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const long long y = labels[r];
        if (y == ignore_index) continue;
        if (y < 0 || y >= classes) {
            first_bad = r < first_bad ? r : first_bad;
        } else {
            ++count;
        }
    }
    for (int off = nnf::WARP / 2; off > 0; off >>= 1) {
        const int other = __shfl_xor_sync(nnf::FULL_MASK, first_bad, off);
        first_bad = other < first_bad ? other : first_bad;
        count += __shfl_xor_sync(nnf::FULL_MASK, count, off);
    }
    const int warps = blockDim.x / nnf::WARP;
    const int warp = threadIdx.x / nnf::WARP;
    if (threadIdx.x % nnf::WARP == 0) {
        scratch[warp] = first_bad;
        scratch[warps + warp] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int bad = scratch[0], total = scratch[warps];
        for (int w = 1; w < warps; ++w) {
            bad = scratch[w] < bad ? scratch[w] : bad;
            total += scratch[warps + w];
        }
        info[0] = bad;
        info[1] = total;
        info[2] = bad < rows ? labels[bad] : 0;
        scale[0] = reduction != RED_MEAN ? 1.0 : (total > 0 ? 1.0 / (double)total : 0.0);
    }
}

template <typename T, int RT>
__global__ void __launch_bounds__(nnf::RowLayout<RT>::threads, sizeof(T) == 4 ? nnf::RowLayout<RT>::min_blocks : 1)
ce_rows(T* __restrict__ grad, T* __restrict__ row_loss, const T* __restrict__ logits,
        const long long* __restrict__ labels, const double* __restrict__ scale, int rows, int classes,
        T smoothing, T inv_classes, long long ignore_index) {
    T* scratch = nnf::dynamic_smem<T>();
    constexpr int RPB = nnf::RowLayout<RT>::rows_per_block;
    const int row = blockIdx.x * RPB + (int)threadIdx.x / RT;
    const int lane_id = threadIdx.x % RT;
    if (row >= rows) return;  // uniform per row
    const T* xr = logits + (long long)row * classes;
    T* gr = grad + (long long)row * classes;

    const long long y = labels[row];
    if (y == ignore_index || y < 0 || y >= classes) {  // ignored, or bad (recorded by ce_prepare)
        nnf::row_fill<T, RT>(gr, classes, lane_id, T(0));
        if (lane_id == 0) row_loss[row] = T(0);
        return;
    }
    const int label = (int)y;

    nnf::OnlineMaxSum<T> acc(inv_classes, xr[0]);  // acc.sx: the mean logit less xr[0]
    nnf::row_visit<T, RT>(xr, classes, lane_id, acc);
    nnf::row_reduce<T, RT>(acc, scratch);
    const T log_s = nnf::m_log(acc.s);  // lse = acc.m + log_s

    if (lane_id == 0) {
        const T nll = (acc.m - xr[label]) + log_s;
        // max - mean = (max - pivot) - acc.sx, unless max - pivot overflows (logits
        // on either side of zero near the float limits): then the mean is formed first.
        const T above = acc.m - acc.pivot;
        const T max_less_mean = nnf::m_abs(above) <= -nnf::Constants<T>::lowest() ? above - acc.sx
                                                                                  : acc.m - (acc.pivot + acc.sx);
        const T smooth = max_less_mean + log_s;
        // A term of weight 0 (no smoothing, or full smoothing) is left out, not multiplied
        // by 0: a logit spread beyond the float range makes it inf, and 0 * inf is NaN.
        const T hit = T(1) - smoothing;
        row_loss[row] = smoothing == T(0) ? nll
                        : hit == T(0)     ? smoothing * smooth
                                          : hit * nll + smoothing * smooth;
    }

    CeGrad<T> g;
    g.m = acc.m;
    g.log_s = log_s;
    g.scale = (T)scale[0];
    g.smooth_term = smoothing * inv_classes;
    g.hit_term = T(1) - smoothing;
    g.label = label;
    nnf::row_map<T, RT>(gr, xr, classes, lane_id, g);
}

// loss[0] = scale * sum(row_loss). One block of blockDim.x threads (a multiple
// of 32); shared memory blockDim.x / 32 doubles.
template <typename T>
__global__ void __launch_bounds__(1024)
ce_reduce(T* __restrict__ loss, const T* __restrict__ row_loss, const double* __restrict__ scale,
          int rows) {
    double* scratch = nnf::dynamic_smem<double>();
    double total = 0.0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) total += (double)row_loss[r];
    total = nnf::warp_sum(total);
    const int warps = blockDim.x / nnf::WARP;
    if (threadIdx.x % nnf::WARP == 0) scratch[threadIdx.x / nnf::WARP] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum = 0.0;
        for (int w = 0; w < warps; ++w) sum += scratch[w];
        loss[0] = (T)(sum * scale[0]);
    }
}
