// Kernels that test the CPU emulation of asynchronous copies (cp.async) through the
// wrappers of kernels/async_copy.cuh (tests/test_cuda_async_copy_emulation.py). Several
// are broken on purpose: the emulation must catch them. Never compiled by NVRTC or shipped.
#include "async_copy.cuh"
#include "common.cuh"

// Thread t copies x[4t .. 4t + 3] into shared memory with one 16-byte cp.async and writes
// what it then reads back to out[4t ..]: its own copy (own = 1) or its right neighbour's.
//   mode 0: commit, wait, barrier, read      (correct)
//   mode 1: commit, read, no wait            (reads a copy still in flight)
//   mode 2: commit, wait, read, no barrier   (reads a neighbour's copy nobody waited for)
//   mode 3: commit, barrier, read, no wait   (a barrier does not wait for copies)
//   mode 4: no commit, wait, barrier, read   (a copy outside any group is not waited for)
__global__ void __launch_bounds__(256) async_stage(float* __restrict__ out, const float* __restrict__ x, int mode,
                                                   int own) {
  float* buf = nnf::dynamic_smem<float>();
  const int t = threadIdx.x, n = blockDim.x;
  nnf::cp_async<16>(buf + 4 * t, x + 4 * t, true);
  if (mode != 4) nnf::cp_async_commit();
  if (mode == 0 || mode == 2 || mode == 4) nnf::cp_async_wait<0>();
  if (mode == 0 || mode == 3 || mode == 4) __syncthreads();
  const int src = own ? t : (t + 1) % n;
  for (int i = 0; i < 4; ++i) out[4 * t + i] = buf[4 * src + i];
}

// A ring of STAGES shared-memory stages, as in a pipelined GEMM: slice s (blockDim.x
// floats of x) is copied STAGES - 1 slices ahead of its use, and out[s] = the sum over
// the block of slice s, read from shared memory after waiting with at most `lag` groups
// in flight (STAGES - 2 is right: one group fewer than in flight).
template <int STAGES>
__global__ void __launch_bounds__(128) async_ring(float* __restrict__ out, const float* __restrict__ x, int slices,
                                                  int lag) {
  float* ring = nnf::dynamic_smem<float>();  // [STAGES][blockDim.x]
  const int t = threadIdx.x, n = blockDim.x;
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < slices) nnf::cp_async<4>(ring + s * n + t, x + s * n + t, true);
    nnf::cp_async_commit();
  }
  for (int s = 0; s < slices; ++s) {
    if (lag == STAGES - 2) nnf::cp_async_wait<STAGES - 2>();
    else if (lag == STAGES - 1) nnf::cp_async_wait<STAGES - 1>();
    __syncthreads();
    const int next = s + STAGES - 1;
    if (next < slices) nnf::cp_async<4>(ring + (next % STAGES) * n + t, x + next * n + t, true);
    nnf::cp_async_commit();
    if (t == 0) {
      float sum = 0;
      for (int i = 0; i < n; ++i) sum += ring[(s % STAGES) * n + i];
      out[s] = sum;
    }
  }
}

// Two groups of one copy each; wait until one group is in flight: the first copy has
// landed, the second still reads as poison.
__global__ void __launch_bounds__(32) async_groups(float* __restrict__ out, const float* __restrict__ x) {
  float* buf = nnf::dynamic_smem<float>();
  const int t = threadIdx.x;
  nnf::cp_async<4>(buf + 2 * t, x + 2 * t, true);
  nnf::cp_async_commit();
  nnf::cp_async<4>(buf + 2 * t + 1, x + 2 * t + 1, true);
  nnf::cp_async_commit();
  nnf::cp_async_wait<1>();
  out[2 * t] = buf[2 * t];
  out[2 * t + 1] = buf[2 * t + 1];
}

// Zero fill (full = false): nothing is read from src, which may point anywhere.
__global__ void __launch_bounds__(64) async_zero_fill(double* __restrict__ out, const double* __restrict__ x, int n) {
  double* buf = nnf::dynamic_smem<double>();
  const int t = threadIdx.x;
  nnf::cp_async<8>(buf + t, x + t, t < n);  // x + t is past the end of x for t >= n
  nnf::cp_async_commit();
  nnf::cp_async_wait<0>();
  __syncthreads();
  out[t] = buf[t];
}

// Broken copies: 0 a destination one vector past the dynamic shared memory, 1 a source
// past the end of x (thread 31), 2 a 16-byte copy to an address that is not a multiple of 16.
__global__ void __launch_bounds__(32) async_bad_copy(float* __restrict__ out, const float* __restrict__ x, int which) {
  float* buf = nnf::dynamic_smem<float>();  // 32 * 4 floats at launch
  const int t = threadIdx.x;
  float* dst = buf + 4 * t + (which == 0 && t == 31 ? 4 : 0) + (which == 2 && t == 5 ? 1 : 0);
  const float* src = x + 4 * t + (which == 1 && t == 31 ? 4 : 0);
  nnf::cp_async<16>(dst, src, true);
  nnf::cp_async_commit();
  nnf::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = buf[4 * t + i];
}

// The CUDA primitives API (cuda_pipeline_primitives.h) on the same machinery: 8-byte
// copies, the odd threads' zero-filled after 4 bytes.
__global__ void __launch_bounds__(64) pipeline_primitives(float* __restrict__ out, const float* __restrict__ x) {
  float* buf = nnf::dynamic_smem<float>();
  const int t = threadIdx.x;
  __pipeline_memcpy_async(buf + 2 * t, x + 2 * t, 8, t % 2 ? 4 : 0);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
  out[2 * t] = buf[2 * t];
  out[2 * t + 1] = buf[2 * t + 1];
}

// Odd threads return with their copy still in flight (legal on a GPU: nothing waits for it);
// even threads copy, wait and write theirs.
__global__ void __launch_bounds__(64) async_pending_at_exit(float* __restrict__ out, const float* __restrict__ x) {
  float* buf = nnf::dynamic_smem<float>();
  const int t = threadIdx.x;
  nnf::cp_async<4>(buf + t, x + t, true);
  nnf::cp_async_commit();
  if (t % 2) return;
  nnf::cp_async_wait<0>();
  out[t] = buf[t];
}
