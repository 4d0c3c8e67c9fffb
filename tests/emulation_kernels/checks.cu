// Small kernels that test the CPU emulation of the CUDA execution model itself
// (tests/test_cuda_emulation.py). Some are broken on purpose: the emulation must
// catch them. They are never compiled by NVRTC or shipped.

// Tree reduction in shared memory: one partial sum per block, added atomically.
template <typename T>
__global__ void __launch_bounds__(256) block_sum(T* __restrict__ out, const T* __restrict__ x, int n) {
  __shared__ T partial[256];
  const unsigned tid = threadIdx.x;
  T acc = 0;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += blockDim.x * gridDim.x) acc += x[i];
  partial[tid] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    __syncthreads();
  }
  if (tid == 0) atomicAdd(out, partial[0]);
}

// The same reduction with its __syncthreads() calls forgotten: a data race.
template <typename T>
__global__ void block_sum_missing_sync(T* __restrict__ out, const T* __restrict__ x, int n) {
  __shared__ T partial[256];
  const unsigned tid = threadIdx.x;
  T acc = 0;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += blockDim.x * gridDim.x) acc += x[i];
  partial[tid] = acc;
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (tid < stride) partial[tid] += partial[tid + stride];
  }
  if (tid == 0) atomicAdd(out, partial[0]);
}

// Only the barrier inside the loop is forgotten (the subtler variant).
template <typename T>
__global__ void block_sum_missing_loop_sync(T* __restrict__ out, const T* __restrict__ x, int n) {
  __shared__ T partial[256];
  const unsigned tid = threadIdx.x;
  T acc = 0;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += blockDim.x * gridDim.x) acc += x[i];
  partial[tid] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (tid < stride) partial[tid] += partial[tid + stride];
  }
  if (tid == 0) atomicAdd(out, partial[0]);
}

template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Warp-shuffle reduction: warps reduce with shuffles, warp 0 reduces the warp sums.
template <typename T>
__global__ void warp_sum(T* __restrict__ out, const T* __restrict__ x, int n) {
  __shared__ T warp_sums[32];
  const unsigned tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  T acc = 0;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += blockDim.x * gridDim.x) acc += x[i];
  acc = warp_reduce_sum(acc);
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    const unsigned nwarps = (blockDim.x + 31) / 32;
    T v = lane < nwarps ? warp_sums[lane] : T(0);
    v = warp_reduce_sum(v);
    if (lane == 0) atomicAdd(out, v);
  }
}

// Row-wise maximum with __shfl_down_sync; one warp per row. Needs blockDim.x == 32.
template <typename T>
__global__ void row_max_down(T* __restrict__ out, const T* __restrict__ x, int rows, int cols) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps leave together
  T m = -INFINITY;
  for (int c = threadIdx.x; c < cols; c += 32) m = max(m, x[row * cols + c]);
  for (int offset = 16; offset > 0; offset >>= 1) m = max(m, __shfl_down_sync(0xffffffffu, m, offset));
  if (threadIdx.x == 0) out[row] = m;
}

// Every shuffle flavour, with and without a width, for a check of the lane rules.
// out has 8 * blockDim.x ints.
__global__ void shuffle_table(int* __restrict__ out, int b) {
  const int lane = threadIdx.x % 32;
  const int v = 100 * (int)(threadIdx.x / 32) + lane;
  const int n = blockDim.x;
  const int t = threadIdx.x;
  out[0 * n + t] = __shfl_sync(0xffffffffu, v, b);
  out[1 * n + t] = __shfl_sync(0xffffffffu, v, b, 8);
  out[2 * n + t] = __shfl_up_sync(0xffffffffu, v, b);
  out[3 * n + t] = __shfl_up_sync(0xffffffffu, v, b, 8);
  out[4 * n + t] = __shfl_down_sync(0xffffffffu, v, b);
  out[5 * n + t] = __shfl_down_sync(0xffffffffu, v, b, 8);
  out[6 * n + t] = __shfl_xor_sync(0xffffffffu, v, b);
  out[7 * n + t] = __shfl_xor_sync(0xffffffffu, v, b, 8);
}

// Ballot / any / all of "x[i] > 0"; one result triple per warp.
__global__ void vote(unsigned* __restrict__ out, const float* __restrict__ x) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = x[i] > 0.0f;
  const unsigned ballot = __ballot_sync(0xffffffffu, p);
  const int any = __any_sync(0xffffffffu, p);
  const int all = __all_sync(0xffffffffu, p);
  if (threadIdx.x % 32 == 0) {
    const unsigned w = i / 32;
    out[3 * w] = ballot;
    out[3 * w + 1] = any;
    out[3 * w + 2] = all;
  }
}

// Reverses each block's slice through dynamic shared memory (two extern arrays alias).
template <typename T>
__global__ void reverse_dynamic(T* __restrict__ out, const T* __restrict__ x, int n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* buf = reinterpret_cast<T*>(smem_raw);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) buf[threadIdx.x] = x[i];
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
  if (i < n && j < n) out[i] = buf[blockDim.x - 1 - threadIdx.x];
}

// Copy with an off-by-one bound: reads (and writes) element n.
__global__ void copy_off_by_one(float* __restrict__ out, const float* __restrict__ x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = x[i];
}

// Correct copy, for contrast.
__global__ void copy_checked(float* __restrict__ out, const float* __restrict__ x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i];
}

// Threads past n return, the rest wait at a barrier: undefined behaviour in CUDA.
__global__ void early_return_then_sync(float* __restrict__ out, const float* __restrict__ x, int n) {
  __shared__ float tile[128];
  const int i = threadIdx.x;
  if (i >= n) return;
  tile[i] = x[i];
  __syncthreads();
  out[i] = tile[(i + 1) % n];
}

// Reads a neighbour's shared slot that no thread wrote (the last thread's neighbour).
__global__ void reads_unwritten_shared(float* __restrict__ out, const float* __restrict__ x, int n) {
  __shared__ float tile[256];
  const int i = threadIdx.x;
  if (i < n) tile[i] = x[i];
  __syncthreads();
  if (i < n) out[i] = tile[i] + tile[i + 1];
}

// Writes one element past the dynamic shared memory it was given.
__global__ void dynamic_shared_overrun(float* __restrict__ out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x + 1] = 1.0f;  // blockDim.x floats were given
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x];
}

// A shuffle inside a branch that only half the warp takes, with a full mask: the
// other half waits at the barrier, so the named lanes never all arrive.
__global__ void divergent_shuffle(float* __restrict__ out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Reads x[i - 1]: element -1 for the first thread.
__global__ void read_before_start(float* __restrict__ out, const float* __restrict__ x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i - 1];
}

// Shuffle down in a partial warp: lanes past blockDim.x do not exist.
__global__ void partial_warp_sum(float* __restrict__ out, const float* __restrict__ x) {
  float v = x[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x == 0) out[0] = v;
}

__global__ void traps(float* __restrict__ out, int which) {
  if (threadIdx.x == 3) {
    if (which == 0) __trap();
    assert(which != 1);
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void spins(int* __restrict__ flag) {
  // Waits for a flag another thread sets without a barrier in between: works on a
  // GPU, but the cooperative emulation never switches threads, so it times out.
  if (threadIdx.x == 1) {
    flag[0] = 1;
  } else if (threadIdx.x == 0) {
    while (atomicAdd(flag, 0) == 0) {
    }
  }
}

__global__ void count_barrier(int* __restrict__ out, const float* __restrict__ x) {
  const int c = __syncthreads_count(x[threadIdx.x] > 0.0f);
  const int a = __syncthreads_and(x[threadIdx.x] > -1.0f);
  const int o = __syncthreads_or(x[threadIdx.x] > 100.0f);
  if (threadIdx.x == 0) {
    out[0] = c;
    out[1] = a;
    out[2] = o;
  }
}

// Scalar parameters of every width, echoed back (checks the argument packing).
__global__ void echo_scalars(double* __restrict__ out, float f, double d, int i, long long l, unsigned u, bool b) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    out[0] = f;
    out[1] = d;
    out[2] = i;
    out[3] = (double)l;
    out[4] = u;
    out[5] = b ? 1.0 : 0.0;
  }
}

// 2-D grid and block indices: out[(y * W + x)] = linear block id * 1000 + linear thread id.
__global__ void index_map(int* __restrict__ out, int width) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  if (x < width) out[y * width + x] = block * 1000 + thread;
}

// Writes through a pointer to const (with a cast): the input is read-only in the emulation.
__global__ void writes_input(float* __restrict__ out, const float* __restrict__ x) {
  const_cast<float*>(x)[threadIdx.x] = 0.0f;
  out[threadIdx.x] = 1.0f;
}

// Atomics of every width; the value converts to the pointer's type as with CUDA's overloads.
__global__ void atomics(int* __restrict__ i, unsigned* __restrict__ u, unsigned long long* __restrict__ ull,
                        float* __restrict__ f, double* __restrict__ d) {
  const int t = threadIdx.x;
  atomicAdd(&i[0], 1);
  atomicMax(&i[1], t);
  atomicMin(&i[2], -t);
  atomicAdd(&u[0], 2u);
  atomicOr(&u[1], 1u << (t % 32));
  atomicAdd(&ull[0], 3ull);
  atomicAdd(&f[0], 0.5);  // a double literal: converted to float
  atomicAdd(&d[0], 0.25);
  atomicCAS(&i[3], 0, t + 1);  // only the first thread to arrive swaps
  atomicExch(&i[4], 7);
}
