// nnfast CUDA kernels: element-wise activations, forward and backward.
//
// One read and one write per element. Grid-stride loops; when every pointer
// is 16-byte aligned (`vec` != 0, decided by the launcher) the body moves
// 128-bit vectors (float4 / two doubles) and a scalar loop finishes the tail.
//
// Instantiations: act_forward<T, CODE> and act_backward<T, CODE> for T in
// {float, double} and every activation code (see cuda_launch.name_expressions).
#include "common.cuh"

// y = act(x)
template <typename T, int CODE>
__global__ void __launch_bounds__(256)
act_forward(T* __restrict__ y, const T* __restrict__ x, long long n, T alpha, int vec) {
    typedef nnf::Act<T, CODE> A;
    typedef typename nnf::Vec<T>::type V;
    constexpr int W = nnf::Vec<T>::width;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long done = 0;
    if (vec) {
        const long long nv = n / W;
        for (long long i = tid; i < nv; i += stride) {
            V v = nnf::load_vec(x + i * W);
#pragma unroll
            for (int k = 0; k < W; ++k) nnf::lane<T>(v, k) = A::fwd(nnf::lane<T>(v, k), alpha);
            nnf::store_vec(y + i * W, v);
        }
        done = nv * W;
    }
    for (long long i = done + tid; i < n; i += stride) y[i] = A::fwd(x[i], alpha);
}

// dx = dy * act'(saved); `saved` is the input or the output (the row's derivative_from)
template <typename T, int CODE>
__global__ void __launch_bounds__(256)
act_backward(T* __restrict__ dx, const T* __restrict__ dy, const T* __restrict__ saved, long long n,
             T alpha, int vec) {
    typedef nnf::Act<T, CODE> A;
    typedef typename nnf::Vec<T>::type V;
    constexpr int W = nnf::Vec<T>::width;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long done = 0;
    if (vec) {
        const long long nv = n / W;
        for (long long i = tid; i < nv; i += stride) {
            V g = nnf::load_vec(dy + i * W);
            const V s = nnf::load_vec(saved + i * W);
#pragma unroll
            for (int k = 0; k < W; ++k) {
                nnf::lane<T>(g, k) *= A::grad(reinterpret_cast<const T*>(&s)[k], alpha);
            }
            nnf::store_vec(dx + i * W, g);
        }
        done = nv * W;
    }
    for (long long i = done + tid; i < n; i += stride) dx[i] = dy[i] * A::grad(saved[i], alpha);
}
