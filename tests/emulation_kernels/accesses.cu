// Kernels with known global-memory access patterns, for the access counters of
// the CPU emulation (tests/test_cuda_emulation_accesses.py). Never compiled by
// NVRTC or shipped.

// y = 2 x through shared memory: 128-bit vectors for the first n / 4 * 4 values,
// one scalar per value after them. One block.
__global__ void double_vectors(float* __restrict__ y, const float* __restrict__ x, int n) {
  __shared__ float4 stage[256];
  const int nv = n / 4;
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    stage[threadIdx.x] = reinterpret_cast<const float4*>(x)[i];
    float4 v = stage[threadIdx.x];
    v.x *= 2.0f;
    v.y *= 2.0f;
    v.z *= 2.0f;
    v.w *= 2.0f;
    reinterpret_cast<float4*>(y)[i] = v;
  }
  for (int i = nv * 4 + threadIdx.x; i < n; i += blockDim.x) y[i] = 2.0f * x[i];
}

// out[0] = sum of the arrays whose addresses and sizes are in the tables, each value
// read `times` times by thread 0 (the arrays are not arguments of the kernel).
__global__ void sum_through_table(double* __restrict__ out, const long long* __restrict__ ptrs,
                                  const int* __restrict__ sizes, int count, int times) {
  if (threadIdx.x != 0) return;
  double total = 0.0;
  for (int t = 0; t < count; ++t) {
    const double* a = reinterpret_cast<const double*>(ptrs[t]);
    const int n = sizes[t];
    for (int k = 0; k < times; ++k)
      for (int i = 0; i < n; ++i) total += a[i];
  }
  out[0] = total;
}
