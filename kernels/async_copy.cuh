// nnfast CUDA kernels: asynchronous global -> shared memory copies (cp.async).
//
// A thread issues copies with cp_async<BYTES>(dst, src, full), closes the
// copies issued since the last commit into a group with cp_async_commit(),
// and cp_async_wait<N>() blocks until at most the N most recent groups are
// still in flight. A copy writes nothing the thread may rely on before that
// wait, and other threads see it only after the wait and a barrier:
//
//     cp_async<16>(stage + i, src + i, true);   // issue
//     cp_async_commit();                         // one group per pipeline stage
//     ...                                        // math on an older stage
//     cp_async_wait<STAGES - 2>();               // this thread's copies of the stage landed
//     __syncthreads();                           // ... and every other thread's
//
// `full` false turns the copy into a zero fill of the BYTES destination bytes:
// the src-size operand of cp.async is 0 and nothing is read from src (callers
// pass a valid address all the same: the PTX manual does not promise that an
// unused one is never translated).
// 16-byte copies use cp.async.cg (L2 only: a GEMM tile is read once per
// block), 4- and 8-byte copies cp.async.ca. src and dst must be aligned to
// BYTES.
//
// This is the one file of kernels/ with inline PTX: the CUDA spelling of these
// instructions (cuda_pipeline_primitives.h) is a system header that NVRTC
// installations do not always ship. Before sm_80 the copies are synchronous
// loads and stores and the commit and wait do nothing, which is a correct (if
// slower) schedule. Under the CPU emulation (NNFAST_CUDA_HOST_EMULATION) the
// copies go to the emulator, which lands a copy at its wait and poisons the
// destination until then, so a stage read too early shows up as NaN.
#ifndef NNFAST_ASYNC_COPY_CUH
#define NNFAST_ASYNC_COPY_CUH

namespace nnf {

#ifdef NNFAST_CUDA_HOST_EMULATION

template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool full, CUEMU_SITE) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async moves 4, 8 or 16 bytes");
    ::cuemu::cp_async(dst, src, BYTES, full ? BYTES : 0, cuemu_file, cuemu_line);
}

__device__ __forceinline__ void cp_async_commit() { ::cuemu::cp_async_commit(); }

template <int N>
__device__ __forceinline__ void cp_async_wait(CUEMU_SITE) {
    ::cuemu::cp_async_wait(N, cuemu_file, cuemu_line);
}

#else

template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool full) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async moves 4, 8 or 16 bytes");
#if __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int src_bytes = full ? BYTES : 0;
    if (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes)
                     : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src), "n"(BYTES),
                     "r"(src_bytes)
                     : "memory");
    }
#else
    struct alignas(BYTES) Chunk {
        unsigned char b[BYTES];
    };
    Chunk c;
    if (full) {
        c = *static_cast<const Chunk*>(src);
    } else {
#pragma unroll
        for (int i = 0; i < BYTES; ++i) c.b[i] = 0;
    }
    *static_cast<Chunk*>(dst) = c;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

#endif  // NNFAST_CUDA_HOST_EMULATION

}  // namespace nnf

#endif  // NNFAST_ASYNC_COPY_CUH
