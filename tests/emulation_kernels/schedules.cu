// Kernels that test the thread schedules of the CPU emulation
// (tests/test_cuda_emulation_schedules.py). The races here are put in on
// purpose: warps that exchange shared memory with a barrier missing, where the
// reader or the overwriter first goes through warp shuffles. Never compiled by
// NVRTC or shipped.

__device__ __forceinline__ float warp_sum_5(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// order[2 * t] and order[2 * t + 1]: when thread t passed two points with warp shuffles
// between them (tickets from one counter), i.e. the order in which the schedule ran the threads.
__global__ void ticket_order(int* __restrict__ order, int* __restrict__ counter) {
  const int t = threadIdx.x;
  order[2 * t] = atomicAdd(counter, 1);
  warp_sum_5(1.0f);
  order[2 * t + 1] = atomicAdd(counter, 1);
}

// Warp 1 publishes a value that warp 0 reads after a warp reduction. With `sync` == 0 the
// barrier between them is missing: warp 0 may finish its shuffles and read before warp 1
// writes. Launch with 64 threads; out[0] = published value + 32.
__global__ void publish_after_shuffles(float* __restrict__ out, float value, int sync) {
  __shared__ float box;
  if (threadIdx.x == 32) box = value;
  const float v = warp_sum_5(1.0f);
  if (sync) __syncthreads();
  if (threadIdx.x == 0) out[0] = box + v;
}

// Two block reductions of x (a sum, then a maximum) through one scratch array. With
// `sync` == 0 the barrier that ends the first one is missing: a warp that runs ahead
// overwrites scratch with its maximum while other warps still read the sums.
// out[t] = sum + max for every thread t. Launch with a multiple of 32 threads, at most 1024.
__global__ void two_reductions_one_scratch(float* __restrict__ out, const float* __restrict__ x, int sync) {
  __shared__ float scratch[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, warps = blockDim.x / 32;
  float v = warp_sum_5(x[t]);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float sum = 0.0f;
  for (int w = 0; w < warps; ++w) sum += scratch[w];
  if (sync) __syncthreads();
  float m = x[t];
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  float mx = scratch[0];
  for (int w = 1; w < warps; ++w) mx = fmaxf(mx, scratch[w]);
  out[t] = sum + mx;
}
