// Kernels that test the CPU emulation of the tensor-core fragment API nvcuda::wmma
// (tests/test_cuda_wmma_emulation.py). Several are broken on purpose: the emulation must
// catch them. Never compiled by NVRTC or shipped.
#include "common.cuh"

using namespace nvcuda;

typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> Acc;

template <class Fragment>
__device__ void round_all(Fragment& f) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
}

// One warp: D = A (16 x 8) @ B (8 x 16) + C, every matrix in global memory with its own
// layout and leading dimension: A row-major (a_col 0) or column-major, B likewise, C and D
// by the memory layout of the accumulator loads and stores. convert 0 skips the tf32
// rounding (a bug the emulation must report).
template <class LA, class LB>
__global__ void mma_one(float* d, const float* a, const float* b, const float* c, int lda, int ldb, int ldc,
                        int ldd, int c_col, int d_col, int convert) {
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> fb;
  Acc fc;
  wmma::load_matrix_sync(fa, a, lda);
  wmma::load_matrix_sync(fb, b, ldb);
  wmma::load_matrix_sync(fc, c, ldc, c_col ? wmma::mem_col_major : wmma::mem_row_major);
  if (convert) {
    round_all(fa);
    round_all(fb);
  }
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, ldd, d_col ? wmma::mem_col_major : wmma::mem_row_major);
}

// out[i] = __float_to_tf32(x[i]), one thread per element.
__global__ void to_tf32(float* out, const float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = wmma::__float_to_tf32(x[i]);
}

// Which (lane, element) holds each accumulator element: lane l sets x[e] = 8 l + e and the
// fragment is stored row-major, so out[r * 16 + c] names the slot of (r, c).
__global__ void acc_slots(float* out) {
  Acc f;
  wmma::fill_fragment(f, 0.0f);
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = float(threadIdx.x * f.num_elements + e);
  wmma::store_matrix_sync(out, f, 16, wmma::mem_row_major);
}

// A kernel that relies on one register layout (the one of mma.m16n8k8's accumulator: lane
// l holds rows l / 4 and l / 4 + 8, columns 2 (l % 4) and 2 (l % 4) + 1 of each 8-column
// half) to add a bias per column inside the fragment: right on hardware with that layout,
// wrong wherever the layout differs. The emulation's layout is drawn at random.
__global__ void layout_dependent_bias(float* out, const float* bias) {
  Acc f;
  wmma::fill_fragment(f, 0.0f);
  const int lane = threadIdx.x % 32;
  for (int e = 0; e < f.num_elements; ++e) f.x[e] += bias[(e / 4) * 8 + 2 * (lane % 4) + (e % 2)];
  wmma::store_matrix_sync(out, f, 16, wmma::mem_row_major);
}

// Loads, fills and stores that break a rule of the API, by `mode`:
//   0: none (loads from shared memory, stores to global)
//   1: the matrix pointer 16 bytes off a 32-byte boundary
//   2: ldm not a multiple of 4 floats
//   3: lane 5 passes another pointer than the others
//   4: lanes fill with different values
//   5: the block is not a whole number of warps (launch with 48 threads)
//   6: lane 31 has returned before the warp's load
//   7: a load reaching past the dynamic shared memory given at launch
__global__ void api_rules(float* out, const float* in, int mode) {
  float* s = nnf::dynamic_smem<float>();
  for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) s[i] = in[i];
  __syncthreads();
  if (mode == 6 && threadIdx.x == 31) return;
  Acc f;
  wmma::fill_fragment(f, mode == 4 ? float(threadIdx.x % 2) : 1.0f);
  const float* p = s + (mode == 1 ? 4 : 0) + (mode == 3 && threadIdx.x == 5 ? 16 : 0) + (mode == 7 ? 16 : 0);
  wmma::load_matrix_sync(f, p, mode == 2 ? 18 : 16, wmma::mem_row_major);
  wmma::store_matrix_sync(out, f, 16, wmma::mem_row_major);
}
