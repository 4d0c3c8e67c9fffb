// nnfast CUDA kernels: fused optimizer updates over every parameter in one launch.
//
// Multi-tensor layout (built and cached by the launcher): `ptrs` holds, per
// parameter t, the device addresses of its tensors (SGD: p, grad, velocity;
// Adam: p, grad, exp_avg, exp_avg_sq) as 64-bit integers; `sizes[t]` is its
// element count; `chunks` lists (t, start) pairs, one per chunk of
// `chunk_size` elements. Block b updates chunks b, b + gridDim.x, ...; a
// chunk's elements are spread over the block's threads (coalesced). Every
// element is read and written once; the update formulas are torch.optim's
// (see numpy_backend.py).
//
// A guarded step (a training step whose launches are fixed in advance, as in
// a captured CUDA graph) passes `control`, a small block of doubles in device
// memory: step_guard writes it from the step's loss and labels, and the
// updates read it instead of taking step-dependent values from the host. The
// eager path passes a null `control`.
#include "common.cuh"

// Layout of the control block (cuda_launch.STEP_CONTROL).
enum StepControl {
    CTRL_SKIP = 0,        // 1: leave parameters, state and the step count untouched this step
    CTRL_STEP = 1,        // updates applied so far (the optimizer's step count)
    CTRL_STEP_SIZE = 2,   // Adam: lr / (1 - beta1^step) for the current step
    CTRL_SQRT_BIAS2 = 3,  // Adam: sqrt(1 - beta2^step)
    CTRL_SIZE = 4,
};

// The guard of a guarded step, one block: the update is skipped when a loss
// value is not finite or ce_prepare found a bad label (info[0] < rows);
// otherwise the step count advances and Adam's bias corrections for the new
// count are formed here, in double, as the host forms them for the eager path.
// Shared memory: one int.
template <typename T>
__global__ void __launch_bounds__(256)
step_guard(double* __restrict__ control, const T* __restrict__ loss, long long n,
           const long long* __restrict__ info, int rows, double lr, double beta1, double beta2) {
    int* all_finite = nnf::dynamic_smem<int>();
    if (threadIdx.x == 0) *all_finite = 1;
    __syncthreads();
    bool finite = true;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) finite = finite && isfinite(loss[i]);
    if (!finite) *all_finite = 0;  // every writer stores the same value
    __syncthreads();
    if (threadIdx.x == 0) {
        const bool skip = !*all_finite || info[0] < rows;
        control[CTRL_SKIP] = skip ? 1.0 : 0.0;
        if (!skip) {
            const double step = control[CTRL_STEP] + 1.0;
            control[CTRL_STEP] = step;
            control[CTRL_STEP_SIZE] = lr / (1.0 - pow(beta1, step));
            control[CTRL_SQRT_BIAS2] = sqrt(1.0 - pow(beta2, step));
        }
    }
}

// torch.optim.SGD with dampening 0:
//   g = grad + wd * p;  v = momentum * v + g;  p -= lr * (nesterov ? g + momentum * v : v)
// momentum == 0 skips v (its pointer may be 0).
template <typename T>
__global__ void __launch_bounds__(256)
sgd_multi(const long long* __restrict__ ptrs, const long long* __restrict__ sizes,
          const long long* __restrict__ chunks, int num_chunks, int chunk_size, T lr, T momentum,
          T weight_decay, int nesterov, const double* __restrict__ control) {
    if (control != nullptr && control[CTRL_SKIP] != 0.0) return;
    for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
        const long long t = chunks[2 * c];
        const long long start = chunks[2 * c + 1];
        const long long size = sizes[t];
        const long long end = start + chunk_size < size ? start + chunk_size : size;
        T* p = reinterpret_cast<T*>(ptrs[3 * t]);
        const T* g = reinterpret_cast<const T*>(ptrs[3 * t + 1]);
        T* v = reinterpret_cast<T*>(ptrs[3 * t + 2]);
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            const T pi = p[i];
            T d = g[i];
            if (weight_decay != T(0)) d += weight_decay * pi;
            if (momentum != T(0)) {
                const T vi = momentum * v[i] + d;
                v[i] = vi;
                d = nesterov ? d + momentum * vi : vi;
            }
            p[i] = pi - lr * d;
        }
    }
}

// torch.optim.Adam (decoupled == 0: g += wd * p) and AdamW (decoupled != 0:
// p *= decay with decay = 1 - lr * wd), with the bias corrections folded into
//   step_size = lr / (1 - beta1^step),  sqrt_bias2 = sqrt(1 - beta2^step):
//   m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g * g
//   p -= step_size * m / (sqrt(v) / sqrt_bias2 + eps)
// 1 - beta1, 1 - beta2 and decay come from the host, formed in double: 1 - beta2
// taken on the device from a float beta2 = 0.999 would cancel to a relative
// error of 1e-5. The betas themselves are 1 - (1 - beta), which is exact to
// the last bit (no cancellation the other way round). With a `control` block
// the bias corrections come from it (written by step_guard for this step).
template <typename T>
__global__ void __launch_bounds__(256)
adam_multi(const long long* __restrict__ ptrs, const long long* __restrict__ sizes,
           const long long* __restrict__ chunks, int num_chunks, int chunk_size, T decay,
           T one_minus_beta1, T one_minus_beta2, T eps, T weight_decay, int decoupled, T step_size,
           T sqrt_bias2, const double* __restrict__ control) {
    if (control != nullptr) {
        if (control[CTRL_SKIP] != 0.0) return;
        step_size = (T)control[CTRL_STEP_SIZE];
        sqrt_bias2 = (T)control[CTRL_SQRT_BIAS2];
    }
    const T beta1 = T(1) - one_minus_beta1;
    const T beta2 = T(1) - one_minus_beta2;
    for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
        const long long t = chunks[2 * c];
        const long long start = chunks[2 * c + 1];
        const long long size = sizes[t];
        const long long end = start + chunk_size < size ? start + chunk_size : size;
        T* p = reinterpret_cast<T*>(ptrs[4 * t]);
        const T* g = reinterpret_cast<const T*>(ptrs[4 * t + 1]);
        T* m = reinterpret_cast<T*>(ptrs[4 * t + 2]);
        T* v = reinterpret_cast<T*>(ptrs[4 * t + 3]);
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            T pi = p[i];
            T gi = g[i];
            if (weight_decay != T(0)) {
                if (decoupled) {
                    pi *= decay;
                } else {
                    gi += weight_decay * pi;
                }
            }
            const T mi = beta1 * m[i] + one_minus_beta1 * gi;
            const T vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] = pi - step_size * mi / (nnf::m_sqrt(vi) / sqrt_bias2 + eps);
        }
    }
}
