// nnfast CUDA kernels: shared definitions.
//
// Everything the kernel files have in common: math constants per float type,
// overloaded math wrappers (so templates over float/double call the right
// single- or double-precision builtin), 128-bit vector types, the activation
// functors (forward and derivative), and warp / block reductions.
//
// Portability rules for every kernel file: no CUDA system headers (NVRTC
// provides the math builtins), no inline PTX outside async_copy.cuh (cp.async,
// with its emulation branch), all shared memory dynamic
// (nnf::dynamic_smem<T>(), sized by the launch configuration in
// nnfast/backends/cuda_launch.py), only __syncthreads, __shfl_xor_sync,
// __shfl_down_sync, __ballot_sync and atomicAdd as CUDA intrinsics (and
// __cvta_generic_to_shared in async_copy.cuh).
#ifndef NNFAST_COMMON_CUH
#define NNFAST_COMMON_CUH

namespace nnf {

// ------------------------------------------------------------ activations
// The integer codes of the activation table (nnfast/activations.py: a row's
// position); the test suite checks that these values match the table.
enum ActCode {
    ACT_IDENTITY = 0,
    ACT_RELU = 1,
    ACT_LEAKY_RELU = 2,
    ACT_SIGMOID = 3,
    ACT_TANH = 4,
    ACT_GELU = 5,
    ACT_GELU_TANH = 6,
    ACT_SILU = 7,
    ACT_SOFTPLUS = 8,
    ACT_ELU = 9,
    ACT_MISH = 10,
    ACT_HARDSWISH = 11,
};

// ------------------------------------------------------------ constants
template <typename T>
struct Constants;

template <>
struct Constants<float> {
    static __device__ __forceinline__ float inv_sqrt2() { return 0.70710678118654752440f; }
    static __device__ __forceinline__ float sqrt_2_over_pi() { return 0.79788456080286535588f; }
    static __device__ __forceinline__ float inv_sqrt_2pi() { return 0.39894228040143267794f; }
    static __device__ __forceinline__ float gelu_tanh_c() { return 0.044715f; }
    static __device__ __forceinline__ float softplus_threshold() { return 20.0f; }
    // The most negative finite value: the neutral element of a running max.
    static __device__ __forceinline__ float lowest() { return -3.402823466e+38f; }
};

template <>
struct Constants<double> {
    static __device__ __forceinline__ double inv_sqrt2() { return 0.70710678118654752440; }
    static __device__ __forceinline__ double sqrt_2_over_pi() { return 0.79788456080286535588; }
    static __device__ __forceinline__ double inv_sqrt_2pi() { return 0.39894228040143267794; }
    static __device__ __forceinline__ double gelu_tanh_c() { return 0.044715; }
    static __device__ __forceinline__ double softplus_threshold() { return 20.0; }
    static __device__ __forceinline__ double lowest() { return -1.7976931348623157e+308; }
};

// ------------------------------------------------------------ math
__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double m_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float m_erf(float x) { return erff(x); }
__device__ __forceinline__ double m_erf(double x) { return erf(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }
__device__ __forceinline__ float m_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double m_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float m_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double m_min(double a, double b) { return fmin(a, b); }

// 1 / y for y in [1, 2], without a division. An IEEE division compiles to a
// fast path plus a slow-path subroutine call, and the call makes ptxas spill
// registers in otherwise small element-wise kernels. Newton's iteration
// r <- r + r (1 - y r) from the minimax line 24/17 - 8/17 y (relative error
// <= 1/17) squares the error each step: 3 steps reach 2e-10 (float), 4 steps
// 2e-20 (double), i.e. correct to the last bit or one below it.
template <typename T>
__device__ __forceinline__ T rcp_1_2(T y) {
    constexpr int STEPS = sizeof(T) == 4 ? 3 : 4;
    T r = T(24.0 / 17.0) - T(8.0 / 17.0) * y;
#pragma unroll
    for (int i = 0; i < STEPS; ++i) r = r + r * (T(1) - y * r);
    return r;
}

// Logistic sigmoid without overflow: exp is only taken of -|x|.
template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
    const T e = m_exp(-m_abs(x));
    const T r = rcp_1_2(T(1) + e);  // 1 + e is in (1, 2]
    return x >= T(0) ? r : e * r;
}

// ------------------------------------------------------------ shared memory
// The block's dynamic shared memory (128-byte aligned: wmma fragments load from
// 32-byte aligned addresses; its size is the launch's shared_mem, see
// cuda_launch.py). Declared once, in a non-template function, so every kernel
// and every instantiation names the same array.
__device__ __forceinline__ float4* dynamic_smem_base() {
    extern __shared__ float4 __align__(128) nnf_dynamic_smem[];
    return nnf_dynamic_smem;
}

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
    return reinterpret_cast<T*>(dynamic_smem_base());
}

// ------------------------------------------------------------ 128-bit vectors
// A 16-byte aligned pair of doubles (the double counterpart of float4).
struct alignas(16) double2v {
    double x, y;
};

template <typename T>
struct Vec;

template <>
struct Vec<float> {
    typedef float4 type;
    static constexpr int width = 4;
};

template <>
struct Vec<double> {
    typedef double2v type;
    static constexpr int width = 2;
};

// Lane i of a 128-bit vector.
template <typename T>
__device__ __forceinline__ T& lane(typename Vec<T>::type& v, int i) {
    return reinterpret_cast<T*>(&v)[i];
}

template <typename T>
__device__ __forceinline__ typename Vec<T>::type load_vec(const T* p) {
    return *reinterpret_cast<const typename Vec<T>::type*>(p);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const typename Vec<T>::type& v) {
    *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}

// ------------------------------------------------------------ activation functors
// Act<T, CODE>::fwd(x, alpha) is the activation; Act<T, CODE>::grad(saved, alpha)
// its derivative, from the input x or from the output y as the activation's
// row of nnfast/activations.py says (derivative_from).
template <typename T, int CODE>
struct Act;

template <typename T>
struct Act<T, ACT_IDENTITY> {
    static __device__ __forceinline__ T fwd(T x, T) { return x; }
    static __device__ __forceinline__ T grad(T, T) { return T(1); }
};

template <typename T>
struct Act<T, ACT_RELU> {
    // NaN passes through, as with numpy.maximum.
    static __device__ __forceinline__ T fwd(T x, T) { return (x > T(0) || x != x) ? x : T(0); }
    static __device__ __forceinline__ T grad(T y, T) { return y > T(0) ? T(1) : T(0); }
};

template <typename T>
struct Act<T, ACT_LEAKY_RELU> {
    static __device__ __forceinline__ T fwd(T x, T alpha) { return x > T(0) ? x : alpha * x; }
    static __device__ __forceinline__ T grad(T y, T alpha) { return y > T(0) ? T(1) : alpha; }
};

template <typename T>
struct Act<T, ACT_SIGMOID> {
    static __device__ __forceinline__ T fwd(T x, T) { return sigmoid(x); }
    static __device__ __forceinline__ T grad(T y, T) { return y * (T(1) - y); }
};

template <typename T>
struct Act<T, ACT_TANH> {
    static __device__ __forceinline__ T fwd(T x, T) { return m_tanh(x); }
    static __device__ __forceinline__ T grad(T y, T) { return T(1) - y * y; }
};

template <typename T>
struct Act<T, ACT_GELU> {
    // x * Phi(x), Phi the standard normal CDF.
    static __device__ __forceinline__ T fwd(T x, T) {
        return T(0.5) * x * (T(1) + m_erf(x * Constants<T>::inv_sqrt2()));
    }
    static __device__ __forceinline__ T grad(T x, T) {
        const T cdf = T(0.5) * (T(1) + m_erf(x * Constants<T>::inv_sqrt2()));
        const T pdf = Constants<T>::inv_sqrt_2pi() * m_exp(T(-0.5) * x * x);
        return cdf + x * pdf;
    }
};

// 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), evaluated through
// 1 + tanh(u) = 2 sigmoid(2u) and 1 - tanh(u)^2 = 4 sigmoid(2u) sigmoid(-2u),
// which do not cancel where tanh(u) rounds to -1 (x below about -4).
template <typename T>
struct Act<T, ACT_GELU_TANH> {
    static __device__ __forceinline__ T two_u(T x) {
        return T(2) * Constants<T>::sqrt_2_over_pi() * (x + Constants<T>::gelu_tanh_c() * x * x * x);
    }
    static __device__ __forceinline__ T fwd(T x, T) { return x * sigmoid(two_u(x)); }
    // Beyond |x| = 10 the derivative is exactly 1 or 0; x is clipped there so
    // that x * x * sigmoid(2u) * sigmoid(-2u) never becomes inf * 0.
    static __device__ __forceinline__ T grad(T x_in, T) {
        const T x = x_in > T(10) ? T(10) : (x_in < T(-10) ? T(-10) : x_in);  // NaN stays NaN
        const T u2 = two_u(x);
        const T e = m_exp(-m_abs(u2));
        const T r = rcp_1_2(T(1) + e);
        const T s_pos = u2 >= T(0) ? r : e * r;  // sigmoid(2u)  = (1 + tanh u) / 2
        const T s_neg = u2 >= T(0) ? e * r : r;  // sigmoid(-2u) = (1 - tanh u) / 2
        const T d_u = Constants<T>::sqrt_2_over_pi() * (T(1) + T(3) * Constants<T>::gelu_tanh_c() * x * x);
        return s_pos + T(2) * x * s_pos * s_neg * d_u;
    }
};

template <typename T>
struct Act<T, ACT_SILU> {
    static __device__ __forceinline__ T fwd(T x, T) { return x * sigmoid(x); }
    static __device__ __forceinline__ T grad(T x, T) {
        const T s = sigmoid(x);
        return s * (T(1) + x * (T(1) - s));
    }
};

template <typename T>
struct Act<T, ACT_SOFTPLUS> {
    // log(1 + e^x), linear above the threshold (PyTorch, beta 1, threshold 20).
    // NaN propagates (fmin would turn it into the threshold).
    static __device__ __forceinline__ T fwd(T x, T) {
        return x > Constants<T>::softplus_threshold() ? x : m_log1p(m_exp(x));
    }
    static __device__ __forceinline__ T grad(T x, T) {
        return x > Constants<T>::softplus_threshold() ? T(1) : sigmoid(x);
    }
};

template <typename T>
struct Act<T, ACT_ELU> {
    static __device__ __forceinline__ T fwd(T x, T alpha) {
        return x > T(0) ? x : alpha * m_expm1(x);  // NaN propagates
    }
    // For x <= 0, alpha * e^x = y + alpha.
    static __device__ __forceinline__ T grad(T y, T alpha) { return y > T(0) ? T(1) : y + alpha; }
};

template <typename T>
struct Act<T, ACT_MISH> {
    // tanh(softplus(x)), softplus linear above its threshold: tanh is exactly 1
    // there in both types, as in PyTorch's mish. NaN propagates; -inf gives NaN
    // (-inf * 0) as PyTorch does.
    static __device__ __forceinline__ T tanh_softplus(T x) {
        return m_tanh(x > Constants<T>::softplus_threshold() ? x : m_log1p(m_exp(x)));
    }
    static __device__ __forceinline__ T fwd(T x, T) { return x * tanh_softplus(x); }
    static __device__ __forceinline__ T grad(T x, T) {
        const T t = tanh_softplus(x);
        return t + x * sigmoid(x) * (T(1) - t * t);
    }
};

template <typename T>
struct Act<T, ACT_HARDSWISH> {
    // x * relu6(x + 3) / 6, scaled first (no overflow near the float maximum),
    // by a product: a division would call the IEEE slow path. NaN gives
    // NaN * 0 = NaN.
    static __device__ __forceinline__ T fwd(T x, T) {
        const T r = x + T(3);
        const T r6 = r > T(6) ? T(6) : (r > T(0) ? r : T(0));
        return x * (r6 * T(1.0 / 6.0));
    }
    // PyTorch's: 0 up to -3, x / 3 + 1/2 strictly between, 1 from 3 on (NaN: 1).
    static __device__ __forceinline__ T grad(T x, T) {
        return x <= T(-3) ? T(0) : (x < T(3) ? x * T(1.0 / 3.0) + T(0.5) : T(1));
    }
};

// ------------------------------------------------------------ reductions
// (enumerators rather than variables: no unused-variable warnings)
enum : unsigned { FULL_MASK = 0xffffffffu };
enum { WARP = 32 };

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int off = WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
    for (int off = WARP / 2; off > 0; off >>= 1) v = m_max(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

// Merge two running (max, sum of exp(x - max)) pairs.
template <typename T>
__device__ __forceinline__ void merge_max_sum(T& m, T& s, T m2, T s2) {
    const T mm = m_max(m, m2);
    s = s * m_exp(m - mm) + s2 * m_exp(m2 - mm);
    m = mm;
}

// Warp-wide merge of running (max, sumexp) pairs; every lane gets the result.
template <typename T>
__device__ __forceinline__ void warp_max_sum(T& m, T& s) {
    for (int off = WARP / 2; off > 0; off >>= 1) {
        const T m2 = __shfl_xor_sync(FULL_MASK, m, off);
        const T s2 = __shfl_xor_sync(FULL_MASK, s, off);
        merge_max_sum(m, s, m2, s2);
    }
}

// Block-wide all-reduce of (max, sumexp, extra sum) over THREADS threads
// (a multiple of 32). `scratch` holds 3 * THREADS / 32 values of T. Every
// thread gets the result. Starts and ends with __syncthreads so the scratch
// can be reused by the caller.
template <typename T, int THREADS>
__device__ __forceinline__ void block_max_sum(T& m, T& s, T& extra, T* scratch) {
    warp_max_sum(m, s);
    extra = warp_sum(extra);
    if (THREADS > WARP) {
        constexpr int WARPS = THREADS / WARP;
        const int warp = threadIdx.x / WARP;
        const int lane_id = threadIdx.x % WARP;
        __syncthreads();
        if (lane_id == 0) {
            scratch[warp] = m;
            scratch[WARPS + warp] = s;
            scratch[2 * WARPS + warp] = extra;
        }
        __syncthreads();
        T mm = scratch[0], ss = scratch[WARPS], ee = scratch[2 * WARPS];
        for (int w = 1; w < WARPS; ++w) {
            merge_max_sum(mm, ss, scratch[w], scratch[WARPS + w]);
            ee += scratch[2 * WARPS + w];
        }
        m = mm;
        s = ss;
        extra = ee;
        __syncthreads();
    }
}

}  // namespace nnf

#endif  // NNFAST_COMMON_CUH
