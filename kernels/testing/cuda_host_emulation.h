// cuda_host_emulation.h -- run unchanged CUDA C++ kernels on the CPU, for tests.
//
// This header lets a `.cu` file that sticks to the subset used in kernels/ compile
// with the host g++ (C++20) and run with the CUDA execution model emulated:
//
//   * every thread of a block is a cooperative fiber with its own stack; fibers
//     switch only at `__syncthreads()` and at warp collectives, so a thread runs
//     alone from one barrier to the next. A missing `__syncthreads()` therefore
//     makes a reader see stale or poisoned shared memory instead of what a
//     racing writer was meant to publish. The schedule (Options::schedule) says
//     in which order: all threads in step, one slice between collectives per
//     sweep (forward, reverse or random thread order), or each warp alone up to
//     its next barrier (forward or reverse warp order), so that one warp runs
//     ahead of the others through its shuffles as it may on a GPU;
//   * `__shared__` variables are per-block (thread_local storage of the one OS
//     thread that runs a block), and all shared memory is filled with 0xFF bytes
//     (NaN / -1) before each block starts, as uninitialised memory on a GPU is;
//   * `extern __shared__` arrays all alias one dynamic buffer of the size given at
//     launch; writes past that size are reported;
//   * warp intrinsics (`__shfl_*_sync`, `__ballot_sync`, `__any_sync`, ...) are
//     real exchanges between the 32 lanes of a warp with the PTX lane rules; a
//     value read from a lane that does not take part is poisoned;
//   * asynchronous copies (cp.async, __pipeline_memcpy_async) land in shared memory
//     when the issuing thread waits for their group and read as poison until then
//     (section "asynchronous copies");
//   * the tensor-core fragment API nvcuda::wmma (m16n16k8, tf32 multiplicands, float
//     accumulators) runs as warp collectives over whole warps, with an element -> lane
//     mapping of the fragments drawn at random per launch, alignment and ldm checks, and
//     multiplicands that must have been rounded to tf32 (section "tensor cores");
//   * `__syncthreads()` reached by only part of a block (others returned, or wait
//     at another barrier), warp collectives that never complete, and every other
//     deadlock are reported instead of hanging;
//   * a fault (out-of-bounds access into a guard page, stack overflow, integer
//     division by zero), `__trap()`, a failed `assert` or a timeout aborts the
//     launch with a message naming the block and thread.
//   * built with -DCUEMU_COUNT_ACCESSES (and the instrumentation flags the harness
//     adds), every global-memory load and store is counted per array and width
//     (see "global memory accounting").
//
// The Python side (tests/cuda_emulation.py) allocates global memory between guard
// pages, builds one shared library per `.cu` (this header + the source + a table
// of the requested template instantiations) and launches kernels through
// `cuemu_launch`. Include this header in exactly one translation unit.
//
// Not emulated: timing-dependent races that barriers do not order, the CUDA memory
// model (fences, volatile, acquire/release between blocks), spin-waits on other
// threads or blocks (they time out), textures, tensor cores other than the wmma
// subset above (mma.sync, wgmma), inline PTX, half types, cooperative groups,
// performance.

#ifndef NNFAST_CUDA_HOST_EMULATION_H
#define NNFAST_CUDA_HOST_EMULATION_H

#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cstdarg>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <ucontext.h>

// ---------------------------------------------------------------- compiler macros
#define __CUDACC_RTC__ 1
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define NNFAST_CUDA_HOST_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __managed__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __inline__ inline
// Block-scope `thread_local` has static storage, so one copy per block (blocks run
// one after another on one OS thread); `extern thread_local` stays a declaration,
// which the build aliases to the dynamic shared memory buffer.
#define __shared__ thread_local

// ---------------------------------------------------------------- vector types
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define CUEMU_VEC2(T, N, A) struct alignas(A) N { T x, y; }; \
  inline N make_##N(T x, T y) { N v; v.x = x; v.y = y; return v; }
#define CUEMU_VEC3(T, N) struct N { T x, y, z; }; \
  inline N make_##N(T x, T y, T z) { N v; v.x = x; v.y = y; v.z = z; return v; }
#define CUEMU_VEC4(T, N, A) struct alignas(A) N { T x, y, z, w; }; \
  inline N make_##N(T x, T y, T z, T w) { N v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }

CUEMU_VEC2(float, float2, 8)
CUEMU_VEC3(float, float3)
CUEMU_VEC4(float, float4, 16)
CUEMU_VEC2(double, double2, 16)
CUEMU_VEC3(double, double3)
CUEMU_VEC4(double, double4, 16)
CUEMU_VEC2(int, int2, 8)
CUEMU_VEC3(int, int3)
CUEMU_VEC4(int, int4, 16)
CUEMU_VEC2(unsigned int, uint2, 8)
CUEMU_VEC4(unsigned int, uint4, 16)
CUEMU_VEC2(long long, longlong2, 16)
CUEMU_VEC2(unsigned long long, ulonglong2, 16)
CUEMU_VEC4(signed char, char4, 4)
CUEMU_VEC4(unsigned char, uchar4, 4)
CUEMU_VEC2(short, short2, 4)
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
#undef CUEMU_VEC2
#undef CUEMU_VEC3
#undef CUEMU_VEC4

// ---------------------------------------------------------------- the runtime
namespace cuemu {

constexpr int kWarpSize = 32;
constexpr size_t kMaxDynamicSmem = 232448;  // 227 KiB, the opt-in limit of sm_90
constexpr size_t kSmemTail = 1024;          // poisoned bytes checked past the dynamic size

enum State : int { kRunnable = 0, kAtBarrier = 1, kAtWarp = 2, kDone = 3 };
enum BarrierKind : int { kSync = 0, kSyncCount = 1, kSyncAnd = 2, kSyncOr = 3 };
enum WarpOp : int {
  kShflIdx = 0, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp,
  kReduceAdd, kReduceMin, kReduceMax, kReduceMinS, kReduceMaxS, kMatchAny,
  kWmmaFill, kWmmaLoad, kWmmaStore, kWmmaMma  // the tensor-core fragment API (section "tensor cores")
};
inline const char* warp_op_name(int op) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp",
                                "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync",
                                "__reduce_min_sync", "__reduce_max_sync", "__match_any_sync",
                                "wmma::fill_fragment", "wmma::load_matrix_sync", "wmma::store_matrix_sync",
                                "wmma::mma_sync"};
  return (op >= 0 && op <= kWmmaMma) ? names[op] : "?";
}

// Error codes returned by cuemu_launch (mirrored in tests/cuda_emulation.py).
enum Error : int {
  kOk = 0, kErrLaunchConfig = 1, kErrFault = 2, kErrDeadlock = 3, kErrBarrierDivergence = 4,
  kErrWarpDivergence = 5, kErrTrap = 6, kErrTimeout = 7, kErrSharedOverflow = 8, kErrArgs = 9,
  kErrInternal = 10
};

struct Thread {
  void* sp;
  uint3 idx;
  unsigned linear, lane, warp;
  int state;
  // block barrier (identified by its source location)
  const char* bar_file;
  int bar_line;
  int bar_kind, bar_pred, bar_result;
  // warp collective
  const char* w_file;
  int w_line;
  int w_op, w_b, w_c, w_size;
  unsigned w_mask;
  bool w_done;
  uint64_t w_val, w_result;
  // wmma collective: the lane's fragments (d, a, b, c for mma_sync; the one fragment otherwise)
  // and the memory operand, which must be the same for every lane
  void* w_frag[4];
  const void* w_mem;
  unsigned w_ldm;
  int w_layout;
};

// The order in which the runnable threads of a block run (tests/cuda_emulation.py SCHEDULES).
// The first three sweep the block in step: every runnable thread runs one slice (up to its
// next barrier or warp collective) per sweep, so no warp gets more than one collective ahead.
// The warp schedules run each warp alone, lane after lane, until all its lanes wait at a
// barrier or have returned; only then does the next warp start.
enum Schedule : int {
  kForward = 0, kReverse = 1, kRandom = 2,  // thread order; random is reshuffled at every barrier
  kWarps = 3, kWarpsReverse = 4,            // warp 0 first, or the last warp first
};

struct Options {  // filled by the Python harness; layout mirrored there
  int schedule;           // a Schedule
  int strict_exit;        // 1: __syncthreads() after some threads returned is an error
  uint64_t seed;          // for the random schedule
  double timeout_s;       // wall-clock limit of one launch
  uint64_t max_dynamic_smem;  // dynamic shared memory allowed (48 KiB unless raised)
  uint64_t stack_bytes;   // per-thread stack
  int launch_bounds;      // > 0: threads per block allowed by __launch_bounds__
  int dry_run;            // 1: check the configuration only, run nothing
};

struct Stats {  // returned to the harness; layout mirrored there
  uint64_t blocks, threads, barriers, warp_collectives, switches, fault_addr;
};

struct Runtime {
  // launch
  dim3 grid_dim, block_dim;
  uint3 block_idx;
  void (*invoke)(void (*)(), void**);
  void (*fn)();
  void** params;
  Options opt;
  Stats stats;
  // block
  Thread* threads;
  unsigned nthreads, capacity, done;
  unsigned* order;
  Thread* cur;
  void* sched_sp;
  unsigned char* stacks;
  size_t stacks_len, stack_bytes;
  uint64_t rng;
  // shared memory (the module's TLS block, for the launching OS thread)
  unsigned char* tls_begin;
  unsigned char* tls_end;
  unsigned char* dyn_begin;
  size_t dyn_size;
  // errors
  bool in_launch;
  pthread_t launcher;
  sigjmp_buf jmp;
  int error;
  char message[8192];
  struct sigaction old_segv, old_bus, old_fpe, old_ill, old_alrm;
  stack_t old_altstack;
};
inline Runtime rt;
alignas(16) inline unsigned char g_altstack[1 << 16];

// ------------------------------------------------------------ context switching
// CUEMU_USE_UCONTEXT forces the portable fallback (tested on x86-64 too).
#if defined(__x86_64__) && !defined(CUEMU_USE_UCONTEXT)
extern "C" void cuemu_switch_context(void** save_sp, void* next_sp) __attribute__((visibility("hidden")));
extern "C" void cuemu_fiber_trampoline() __attribute__((visibility("hidden")));
// Saves the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save_sp and resumes the context at next_sp.
asm(R"(
    .text
    .globl cuemu_switch_context
    .hidden cuemu_switch_context
    .type cuemu_switch_context, @function
cuemu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch_context, .-cuemu_switch_context

    .globl cuemu_fiber_trampoline
    .hidden cuemu_fiber_trampoline
    .type cuemu_fiber_trampoline, @function
cuemu_fiber_trampoline:
    movq %r13, %rdi
    callq *%r12
    ud2
    .size cuemu_fiber_trampoline, .-cuemu_fiber_trampoline
)");

inline void* make_context(unsigned char* stack_lo, size_t size, void (*entry)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size) & ~uintptr_t(15);
  uint64_t* p = reinterpret_cast<uint64_t*>(top - 24);
  p[0] = reinterpret_cast<uint64_t>(&cuemu_fiber_trampoline);  // popped by ret
  p[-1] = 0;                                                   // rbp
  p[-2] = 0;                                                   // rbx
  p[-3] = reinterpret_cast<uint64_t>(entry);                   // r12
  p[-4] = reinterpret_cast<uint64_t>(arg);                     // r13
  p[-5] = 0;                                                   // r14
  p[-6] = 0;                                                   // r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  uint64_t ctl = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  p[-7] = ctl;
  return &p[-7];
}
inline void switch_context(void** save, void* next) { cuemu_switch_context(save, next); }
#else
// Portable fallback: ucontext (slower: each switch is a system call).
struct UContext { ucontext_t uc; };
inline UContext g_sched_uc;
inline void* make_context(unsigned char* stack_lo, size_t size, void (*entry)(void*), void* arg) {
  // The UContext lives at the top of the fiber's own stack area.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size - sizeof(UContext)) & ~uintptr_t(63);
  UContext* c = reinterpret_cast<UContext*>(top);
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack_lo;
  c->uc.uc_stack.ss_size = top - reinterpret_cast<uintptr_t>(stack_lo);
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, reinterpret_cast<void (*)()>(entry), 1, arg);
  return c;
}
inline void switch_context(void** save, void* next) {
  // save points at a slot that holds (or will hold) the UContext of the caller.
  if (*save == nullptr) *save = &g_sched_uc;
  swapcontext(&static_cast<UContext*>(*save)->uc, &static_cast<UContext*>(next)->uc);
}
#endif

// ------------------------------------------------------------ errors
inline const char* demangle_site(const void* addr, char* buf, size_t len) {
  Dl_info info;
  if (addr && dladdr(addr, &info) && info.dli_sname) {
    int status = 0;
    char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    snprintf(buf, len, "%s+0x%lx", status == 0 && name ? name : info.dli_sname,
             static_cast<unsigned long>(reinterpret_cast<uintptr_t>(addr) -
                                        reinterpret_cast<uintptr_t>(info.dli_saddr)));
    free(name);
  } else if (addr && dladdr(addr, &info) && info.dli_fname) {
    const char* base = strrchr(info.dli_fname, '/');
    snprintf(buf, len, "%s+0x%lx", base ? base + 1 : info.dli_fname,
             static_cast<unsigned long>(reinterpret_cast<uintptr_t>(addr) -
                                        reinterpret_cast<uintptr_t>(info.dli_fbase)));
  } else {
    snprintf(buf, len, "%p", addr);
  }
  return buf;
}

inline const char* site_name(const char* file, int line, char* buf, size_t len) {
  const char* base = file ? strrchr(file, '/') : nullptr;
  snprintf(buf, len, "%s:%d", base ? base + 1 : (file ? file : "?"), line);
  return buf;
}

inline bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && strcmp(f1, f2) == 0));
}

inline void where(char* buf, size_t len, const Thread* t) {
  if (t) {
    snprintf(buf, len, "block (%u,%u,%u) thread (%u,%u,%u)", rt.block_idx.x, rt.block_idx.y, rt.block_idx.z,
             t->idx.x, t->idx.y, t->idx.z);
  } else {
    snprintf(buf, len, "block (%u,%u,%u)", rt.block_idx.x, rt.block_idx.y, rt.block_idx.z);
  }
}

// Record an error; the first one wins.
__attribute__((format(printf, 2, 3))) inline void set_error(int code, const char* fmt, ...) {
  if (rt.error != kOk) return;
  rt.error = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(rt.message, sizeof rt.message, fmt, ap);
  va_end(ap);
}

// Abort the launch from anywhere (a fiber, a signal handler): back to cuemu_launch.
[[noreturn]] inline void abort_launch() { siglongjmp(rt.jmp, 1); }

[[noreturn]] inline void fail_in_thread(int code, const char* what) {
  char w[160];
  where(w, sizeof w, rt.cur);
  set_error(code, "%s in %s", what, w);
  abort_launch();
}

// ------------------------------------------------------------ asynchronous copies (cp.async)
// cp.async / __pipeline_memcpy_async from global into shared memory, commit groups and
// waits, with exactly the guarantees PTX gives a kernel:
//
//   * a copy reads its source when it is issued (an out-of-bounds source faults there, naming
//     the argument) and lands in shared memory only when the issuing thread waits for its
//     group (cp.async.wait_group / __pipeline_wait_prior / wait_all). Until then the
//     destination holds poison (0xFF bytes: NaN, -1), so a stage read before the wait, or by
//     another thread before the issuing thread's wait and a barrier, reads NaN;
//   * wait_group N lands every copy of the groups committed before the N most recent ones;
//     copies issued after the last commit belong to no group yet and stay pending;
//   * __syncthreads() lands nothing (on a GPU a barrier does not wait for cp.async either);
//   * copies still in flight when their thread returns never land: on a GPU they complete at
//     a time no other thread can wait for, so whoever reads them races (reads poison here);
//   * the destination must lie in shared memory (inside the launch's dynamic size when it is
//     in the dynamic buffer), source and destination aligned to the copy size, and the copy 4,
//     8 or 16 bytes with at most that many source bytes (the rest is zero-filled): anything
//     else fails the launch naming the thread and the call's file:line.
struct AsyncCopy {
  unsigned char* dst;
  uint64_t group;  // commit group number (the open group while not yet committed)
  unsigned size;
  unsigned char bytes[16];
};
struct AsyncCopies {  // one per thread of the running block
  AsyncCopy* items;   // issued and not landed, in issue order
  unsigned count, capacity;
  uint64_t committed;  // groups closed by the thread so far
};
inline AsyncCopies* g_async = nullptr;
inline unsigned g_async_threads = 0;

// Called as each block starts (run_block): what the previous block left in flight is dropped.
inline void async_copies_reset(unsigned nthreads) {
  if (nthreads > g_async_threads) {
    g_async = static_cast<AsyncCopies*>(realloc(static_cast<void*>(g_async), nthreads * sizeof(AsyncCopies)));
    if (!g_async) {
      g_async_threads = 0;
      return;
    }
    memset(static_cast<void*>(g_async + g_async_threads), 0, (nthreads - g_async_threads) * sizeof(AsyncCopies));
    g_async_threads = nthreads;
  }
  for (unsigned i = 0; i < nthreads; ++i) {
    g_async[i].count = 0;
    g_async[i].committed = 0;
  }
}

[[noreturn]] inline void async_copy_error(int code, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
inline void async_copy_error(int code, const char* file, int line, const char* fmt, ...) {
  char what[512], w[160], s[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  where(w, sizeof w, rt.cur);
  set_error(code, "%s in %s (at %s)", what, w, site_name(file, line, s, sizeof s));
  abort_launch();
}

inline AsyncCopies& async_copies_of_current_thread(const char* file, int line) {
  if (!rt.cur || !g_async || rt.cur->linear >= g_async_threads)
    async_copy_error(kErrInternal, file, line, "asynchronous copy outside a running thread");
  return g_async[rt.cur->linear];
}

inline void cp_async(void* dst_ptr, const void* src, unsigned size, unsigned src_size, const char* file, int line) {
  AsyncCopies& a = async_copies_of_current_thread(file, line);
  unsigned char* dst = static_cast<unsigned char*>(dst_ptr);
  if (size != 4 && size != 8 && size != 16)
    async_copy_error(kErrTrap, file, line, "cp.async of %u bytes (4, 8 or 16 only)", size);
  if (src_size > size)
    async_copy_error(kErrTrap, file, line, "cp.async reads %u source bytes into a %u-byte copy", src_size, size);
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0)
    async_copy_error(kErrFault, file, line, "misaligned address: %u-byte cp.async from %p to %p", size, src,
                     static_cast<void*>(dst));
  const bool in_tls = dst >= rt.tls_begin && dst + size <= rt.tls_end;
  const bool in_dynamic_area = dst + size > rt.dyn_begin && dst < rt.dyn_begin + kMaxDynamicSmem + kSmemTail;
  if (!in_tls)
    async_copy_error(kErrFault, file, line, "cp.async destination %p is not in shared memory",
                     static_cast<void*>(dst));
  if (in_dynamic_area && (dst < rt.dyn_begin || dst + size > rt.dyn_begin + rt.dyn_size))
    async_copy_error(kErrSharedOverflow, file, line,
                     "cp.async writes dynamic shared memory bytes [%ld, %ld), outside the %zu bytes given at launch",
                     static_cast<long>(dst - rt.dyn_begin), static_cast<long>(dst - rt.dyn_begin + size),
                     rt.dyn_size);
  if (a.count == a.capacity) {
    unsigned cap = a.capacity ? 2 * a.capacity : 16;
    AsyncCopy* grown = static_cast<AsyncCopy*>(realloc(static_cast<void*>(a.items), cap * sizeof(AsyncCopy)));
    if (!grown) async_copy_error(kErrInternal, file, line, "out of memory for pending cp.async copies");
    a.items = grown;
    a.capacity = cap;
  }
  AsyncCopy& c = a.items[a.count++];
  c.dst = dst;
  c.group = a.committed;
  c.size = size;
  memset(c.bytes, 0, sizeof c.bytes);
  if (src_size) memcpy(c.bytes, src, src_size);  // faults here on a bad source
  memset(dst, 0xFF, size);                        // undefined until the wait
}

inline void cp_async_commit() {
  if (rt.cur && g_async && rt.cur->linear < g_async_threads) ++g_async[rt.cur->linear].committed;
}

// Land the copies of every group but the `pending` most recent ones.
inline void cp_async_wait(unsigned pending, const char* file, int line) {
  AsyncCopies& a = async_copies_of_current_thread(file, line);
  const uint64_t complete = a.committed > pending ? a.committed - pending : 0;
  unsigned kept = 0;
  for (unsigned i = 0; i < a.count; ++i) {
    AsyncCopy& c = a.items[i];
    if (c.group < complete) memcpy(c.dst, c.bytes, c.size);
    else a.items[kept++] = c;
  }
  a.count = kept;
  asm volatile("" ::: "memory");
}

inline void cp_async_wait_all(const char* file, int line) {
  cp_async_commit();
  cp_async_wait(0, file, line);
}

// The pending copies of the current thread (for tests of the emulation itself).
inline unsigned cp_async_pending() {
  return rt.cur && g_async && rt.cur->linear < g_async_threads ? g_async[rt.cur->linear].count : 0;
}
}  // namespace cuemu

// The CUDA primitives API (cuda_pipeline_primitives.h) on the same machinery.
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0,
                                    const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if (zfill > size_and_align)
    ::cuemu::async_copy_error(::cuemu::kErrTrap, file, line, "__pipeline_memcpy_async: zfill %zu > size %zu", zfill,
                              size_and_align);
  ::cuemu::cp_async(dst, src, static_cast<unsigned>(size_and_align), static_cast<unsigned>(size_and_align - zfill),
                    file, line);
}
inline void __pipeline_commit() { ::cuemu::cp_async_commit(); }
inline void __pipeline_wait_prior(size_t prior, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuemu::cp_async_wait(static_cast<unsigned>(prior), file, line);
}

namespace cuemu {
// ------------------------------------------------------------ end of asynchronous copies

// ------------------------------------------------------------ scheduling
inline void yield() {
  Thread* t = rt.cur;
  ++rt.stats.switches;
  switch_context(&t->sp, rt.sched_sp);
}

inline void fiber_main(void* arg) {
  Thread* t = static_cast<Thread*>(arg);
  rt.invoke(rt.fn, rt.params);
  t->state = kDone;
  switch_context(&t->sp, rt.sched_sp);
  __builtin_trap();
}

inline uint64_t next_random() {  // splitmix64
  uint64_t z = (rt.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// rt.order: the threads in the order of a sweep. For the warp schedules it lists whole warps
// (lanes ascending), so that a warp is a contiguous group of it.
inline void make_order() {
  unsigned n = rt.nthreads;
  if (rt.opt.schedule == kWarpsReverse) {
    const unsigned ws = kWarpSize;
    unsigned k = 0;
    for (unsigned w = (n + ws - 1) / ws; w-- > 0;)
      for (unsigned i = w * ws; i < std::min(n, (w + 1) * ws); ++i) rt.order[k++] = i;
    return;
  }
  for (unsigned i = 0; i < n; ++i) rt.order[i] = (rt.opt.schedule == kReverse) ? n - 1 - i : i;
  if (rt.opt.schedule == kRandom) {
    for (unsigned i = n; i > 1; --i) std::swap(rt.order[i - 1], rt.order[next_random() % i]);
  }
}

// Lanes of warp w that exist and have not returned.
inline unsigned live_lanes(unsigned w) {
  unsigned m = 0, base = w * kWarpSize;
  for (unsigned l = 0; l < kWarpSize && base + l < rt.nthreads; ++l)
    if (rt.threads[base + l].state != kDone) m |= 1u << l;
  return m;
}

inline uint64_t poison_bits(int size) { return size >= 8 ? ~uint64_t(0) : ((uint64_t(1) << (8 * size)) - 1); }

inline void wmma_complete(unsigned base, unsigned need, const Thread& first);  // section "tensor cores"

// Complete the warp collectives of warp w whose participants have all arrived.
inline void try_complete_warp(unsigned w) {
  unsigned base = w * kWarpSize;
  unsigned live = live_lanes(w);
  for (unsigned l = 0; l < kWarpSize && base + l < rt.nthreads; ++l) {
    Thread& first = rt.threads[base + l];
    if (first.state != kAtWarp || first.w_done) continue;
    unsigned mask = first.w_mask;
    unsigned need = mask & live;  // named lanes that exist and have not returned
    bool ready = true;
    for (unsigned j = 0; j < kWarpSize && ready; ++j) {
      if (!(need >> j & 1)) continue;
      const Thread& o = rt.threads[base + j];
      ready = o.state == kAtWarp && !o.w_done && o.w_mask == mask;
    }
    if (!ready) continue;
    // All participants are here: check they agree on the operation.
    for (unsigned j = 0; j < kWarpSize; ++j) {
      if (!(need >> j & 1)) continue;
      const Thread& o = rt.threads[base + j];
      if (o.w_op != first.w_op || o.w_size != first.w_size) {
        char w1[160], s1[256], s2[256];
        where(w1, sizeof w1, &first);
        set_error(kErrWarpDivergence,
                  "warp collectives with mask 0x%08x disagree: %s calls %s (at %s), lane %u calls %s (at %s)",
                  mask, w1, warp_op_name(first.w_op), site_name(first.w_file, first.w_line, s1, sizeof s1), j,
                  warp_op_name(o.w_op), site_name(o.w_file, o.w_line, s2, sizeof s2));
        return;
      }
    }
    ++rt.stats.warp_collectives;
    if (first.w_op >= kWmmaFill) wmma_complete(base, need, first);  // fails the launch, or completes it
    int op = first.w_op;
    uint64_t ballot = 0, sum = 0;
    uint64_t umin = ~uint64_t(0), umax = 0;
    int64_t smin = INT64_MAX, smax = INT64_MIN;
    for (unsigned j = 0; j < kWarpSize; ++j) {
      if (!(need >> j & 1)) continue;
      const Thread& o = rt.threads[base + j];
      if (o.w_val) ballot |= uint64_t(1) << j;
      uint32_t u = static_cast<uint32_t>(o.w_val);
      int32_t s = static_cast<int32_t>(u);
      sum += u;
      umin = std::min<uint64_t>(umin, u);
      umax = std::max<uint64_t>(umax, u);
      smin = std::min<int64_t>(smin, s);
      smax = std::max<int64_t>(smax, s);
    }
    for (unsigned i = 0; i < kWarpSize; ++i) {
      if (!(need >> i & 1)) continue;
      Thread& t = rt.threads[base + i];
      uint64_t r = 0;
      switch (op) {
        case kShflIdx: case kShflUp: case kShflDown: case kShflXor: {
          // PTX shfl.sync: c = (segmask << 8) | clamp.
          int b = t.w_b, c = t.w_c;
          int lane = static_cast<int>(i);
          int clamp = c & 0x1f, segmask = (c >> 8) & 0x1f;
          int min_lane = lane & segmask;
          int max_lane = min_lane | (clamp & ~segmask);
          int j = lane;
          bool in_range = true;
          if (op == kShflUp) { j = lane - b; in_range = j >= max_lane; }
          else if (op == kShflDown) { j = lane + b; in_range = j <= max_lane; }
          else if (op == kShflXor) { j = lane ^ b; in_range = j <= max_lane; }
          else { j = min_lane | (b & ~segmask); in_range = j <= max_lane; }
          if (!in_range) j = lane;
          if (j >= 0 && j < kWarpSize && (need >> j & 1)) r = rt.threads[base + j].w_val;
          else r = poison_bits(t.w_size);  // source lane inactive: undefined on hardware
          break;
        }
        case kBallot: r = ballot; break;
        case kAny: r = ballot != 0; break;
        case kAll: r = ballot == need; break;
        case kSyncWarp: r = 0; break;
        case kReduceAdd: r = static_cast<uint32_t>(sum); break;
        case kReduceMin: r = umin; break;
        case kReduceMax: r = umax; break;
        case kReduceMinS: r = static_cast<uint32_t>(static_cast<int32_t>(smin)); break;
        case kReduceMaxS: r = static_cast<uint32_t>(static_cast<int32_t>(smax)); break;
        case kMatchAny: {
          uint64_t m = 0;
          for (unsigned j = 0; j < kWarpSize; ++j)
            if ((need >> j & 1) && rt.threads[base + j].w_val == t.w_val) m |= uint64_t(1) << j;
          r = m;
          break;
        }
      }
      t.w_result = r;
      t.w_done = true;
      t.state = kRunnable;
    }
  }
}

inline uint64_t warp_collective(int op, unsigned mask, uint64_t value, int b, int c, int size,
                                const char* file, int line) {
  Thread* t = rt.cur;
  if (!(mask >> t->lane & 1)) {
    char w[160], s[256];
    where(w, sizeof w, t);
    set_error(kErrWarpDivergence, "%s with mask 0x%08x called by lane %u, which the mask leaves out (%s, at %s)",
              warp_op_name(op), mask, t->lane, w, site_name(file, line, s, sizeof s));
    abort_launch();
  }
  t->state = kAtWarp;
  t->w_op = op;
  t->w_mask = mask;
  t->w_val = value;
  t->w_b = b;
  t->w_c = c;
  t->w_size = size;
  t->w_file = file;
  t->w_line = line;
  t->w_done = false;
  try_complete_warp(t->warp);
  if (rt.error != kOk) abort_launch();
  if (!t->w_done) yield();
  t->state = kRunnable;
  return t->w_result;
}

// ------------------------------------------------------------ tensor cores (wmma)
// nvcuda::wmma for the shape a kernel here uses: m16n16k8 with tf32 multiplicands and a float
// accumulator. A fragment is a per-warp object: each lane holds num_elements values of it in
// `x`, and which matrix element sits in which lane's x[i] is unspecified by CUDA. The emulation
// draws that mapping at random at every launch (a permutation per kind of fragment), so a
// kernel is right only if it treats x[] as the opaque bag CUDA says it is (an element-wise
// conversion or scaling of every x[i] is fine; reading x[i] as "row lane / 4" is not).
//
// fill_fragment, load_matrix_sync, store_matrix_sync and mma_sync are warp collectives over
// the whole warp, as on a GPU: every one of the 32 lanes must call the same function, with the
// same pointer, ldm and layout (a warp with a lane that returned or does not exist fails the
// launch). load_ / store_matrix_sync check what the CUDA programming guide requires: a
// pointer aligned to 256 bits and an ldm that is a multiple of 16 bytes (4 floats); shared
// memory accesses must lie inside the launch's dynamic size. mma_sync requires its tf32
// operands to be tf32 values (the low 13 bits of every finite element zero): CUDA asks
// kernels to convert the elements with __float_to_tf32 (cvt.rna.tf32.f32: round to nearest,
// ties away from zero). A GPU does not check it; its tensor cores ignore the low 13 bits (the
// value is truncated, not rounded), which biases every product towards zero. Here an element
// that was not converted fails the launch, so the missing conversion cannot pass unnoticed.
// The product is computed exactly (a tf32 x tf32 product fits a double), summed over k in
// double and rounded to float once, with the accumulator added: at least as accurate as the
// hardware's float accumulation, so results agree with a GPU to rounding, not bit for bit.
enum WmmaKind : int { kFragA = 0, kFragB = 1, kFragAcc = 2 };
enum WmmaLayout : int { kRowMajor = 0, kColMajor = 1, kNoLayout = 2 };
constexpr int kWmmaM = 16, kWmmaN = 16, kWmmaK = 8;

constexpr int wmma_rows(int kind) { return kind == kFragB ? kWmmaK : kWmmaM; }
constexpr int wmma_cols(int kind) { return kind == kFragA ? kWmmaK : kWmmaN; }
constexpr int wmma_elements(int kind) { return wmma_rows(kind) * wmma_cols(kind) / kWarpSize; }
constexpr int wmma_code(int kind, int layout) { return kind * 4 + layout; }  // Thread::w_size

// g_wmma_slot[kind][r * cols + c]: the slot lane * elements + i holding matrix element (r, c).
inline unsigned g_wmma_slot[3][kWmmaM * kWmmaN];
inline uint64_t g_wmma_launches = 0;

inline void wmma_new_mapping(uint64_t seed) {
  uint64_t s = seed ^ (0x5851f42d4c957f2dull * ++g_wmma_launches);
  for (int kind = 0; kind < 3; ++kind) {
    const unsigned n = static_cast<unsigned>(wmma_rows(kind) * wmma_cols(kind));
    for (unsigned i = 0; i < n; ++i) g_wmma_slot[kind][i] = i;
    for (unsigned i = n; i > 1; --i) {
      uint64_t z = (s += 0x9e3779b97f4a7c15ull);  // splitmix64
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      std::swap(g_wmma_slot[kind][i - 1], g_wmma_slot[kind][(z ^ (z >> 31)) % i]);
    }
  }
}

inline float& wmma_element(unsigned base, int frag, int kind, int e) {
  const unsigned slot = g_wmma_slot[kind][e], per = static_cast<unsigned>(wmma_elements(kind));
  return static_cast<float*>(rt.threads[base + slot / per].w_frag[frag])[slot % per];
}

inline bool is_tf32(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return (u & 0x7f800000u) == 0x7f800000u || (u & 0x1fffu) == 0;  // NaN and Inf pass as they are
}

// Fail the launch from a wmma collective, naming the lane that completed it and the call.
[[noreturn]] inline void wmma_error(int code, const Thread& t, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
inline void wmma_error(int code, const Thread& t, const char* fmt, ...) {
  char what[1024], w[160], s[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  where(w, sizeof w, &t);
  set_error(code, "%s: %s (warp %u, %s, at %s)", warp_op_name(t.w_op), what, t.warp, w,
            site_name(t.w_file, t.w_line, s, sizeof s));
  abort_launch();
}

// Element (r, c) of a rows x cols matrix at p with leading dimension ldm.
inline size_t wmma_offset(int layout, int r, int c, unsigned ldm) {
  return layout == kRowMajor ? size_t(r) * ldm + c : size_t(c) * ldm + r;
}

inline void wmma_check_memory(const Thread& t, int kind, int layout) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.w_mem);
  if (p % 32 != 0)
    wmma_error(kErrFault, t, "the matrix pointer %p is not 256-bit (32-byte) aligned", t.w_mem);
  if (t.w_ldm % 4 != 0 || t.w_ldm == 0)
    wmma_error(kErrTrap, t, "ldm %u is not a positive multiple of 16 bytes (4 floats)", t.w_ldm);
  const size_t last = wmma_offset(layout, wmma_rows(kind) - 1, wmma_cols(kind) - 1, t.w_ldm);
  const unsigned char* lo = static_cast<const unsigned char*>(t.w_mem);
  const unsigned char* hi = lo + (last + 1) * sizeof(float);
  const bool in_dynamic_area = hi > rt.dyn_begin && lo < rt.dyn_begin + kMaxDynamicSmem + kSmemTail;
  if (in_dynamic_area && (lo < rt.dyn_begin || hi > rt.dyn_begin + rt.dyn_size))
    wmma_error(kErrSharedOverflow, t,
               "the matrix spans dynamic shared memory bytes [%ld, %ld), outside the %zu bytes given at launch",
               static_cast<long>(lo - rt.dyn_begin), static_cast<long>(hi - rt.dyn_begin), rt.dyn_size);
}

// The matrix of multiplicand fragment `kind` (matrix_a or matrix_b, slot 1 or 2 of mma_sync), row-major,
// every element checked to be a tf32 value.
inline void wmma_multiplicand(unsigned base, const Thread& first, int kind, float* out) {
  const int cols = wmma_cols(kind);
  for (int e = 0; e < wmma_rows(kind) * cols; ++e) {
    const float v = out[e] = wmma_element(base, kind == kFragA ? 1 : 2, kind, e);
    if (!is_tf32(v))
      wmma_error(kErrTrap, first, "%s element (%d, %d) = %.9g is not a tf32 value (its low 13 bits are set): "
                 "convert every element of a tf32 fragment with wmma::__float_to_tf32 before mma_sync",
                 kind == kFragA ? "matrix_a" : "matrix_b", e / cols, e % cols, static_cast<double>(v));
  }
}

// Perform the wmma collective of warp `base / 32`, whose lanes all wait at the same call.
inline void wmma_complete(unsigned base, unsigned need, const Thread& first) {
  if (need != 0xffffffffu)
    wmma_error(kErrWarpDivergence, first,
               "a warp-wide operation: all 32 lanes must call it, but only lanes 0x%08x do (the others %s)", need,
               rt.nthreads < base + kWarpSize ? "do not exist: the block is not a whole number of warps"
                                              : "have returned");
  const int kind = first.w_size / 4, layout = first.w_size % 4;
  for (unsigned j = 1; j < kWarpSize; ++j) {
    const Thread& o = rt.threads[base + j];
    const bool same = first.w_op == kWmmaMma || first.w_op == kWmmaFill
                          ? true
                          : o.w_mem == first.w_mem && o.w_ldm == first.w_ldm && o.w_layout == first.w_layout;
    if (!same)
      wmma_error(kErrWarpDivergence, o, "lane %u passes (%p, ldm %u, layout %d), lane 0 (%p, ldm %u, layout %d): "
                 "the matrix must be the same for the whole warp", j, o.w_mem, o.w_ldm, o.w_layout, first.w_mem,
                 first.w_ldm, first.w_layout);
    if (first.w_op == kWmmaFill && o.w_val != first.w_val)
      wmma_error(kErrWarpDivergence, o, "lane %u fills with another value than lane 0: with the element mapping "
                 "unspecified, the fragment would hold an unspecified matrix", j);
  }
  const int rows = wmma_rows(kind), cols = wmma_cols(kind), n = rows * cols;
  switch (first.w_op) {
    case kWmmaFill: {
      float v;
      memcpy(&v, &first.w_val, 4);
      for (unsigned l = 0; l < kWarpSize; ++l)
        for (int i = 0; i < wmma_elements(kind); ++i) static_cast<float*>(rt.threads[base + l].w_frag[0])[i] = v;
      break;
    }
    case kWmmaLoad: case kWmmaStore: {
      const int mem_layout = kind == kFragAcc ? first.w_layout : layout;
      wmma_check_memory(first, kind, mem_layout);
      float* p = static_cast<float*>(const_cast<void*>(first.w_mem));
      for (int e = 0; e < n; ++e) {
        float* at = p + wmma_offset(mem_layout, e / cols, e % cols, first.w_ldm);
        if (first.w_op == kWmmaLoad) wmma_element(base, 0, kind, e) = *at;
        else *at = wmma_element(base, 0, kind, e);
      }
      break;
    }
    case kWmmaMma: {
      float a[kWmmaM * kWmmaK], b[kWmmaK * kWmmaN];  // row-major
      wmma_multiplicand(base, first, kFragA, a);
      wmma_multiplicand(base, first, kFragB, b);
      float d[kWmmaM * kWmmaN];
      for (int e = 0; e < kWmmaM * kWmmaN; ++e) {
        double s = 0.0;
        const int r = e / kWmmaN, c = e % kWmmaN;
        for (int k = 0; k < kWmmaK; ++k) s += static_cast<double>(a[r * kWmmaK + k]) * b[k * kWmmaN + c];
        d[e] = static_cast<float>(s + static_cast<double>(wmma_element(base, 3, kFragAcc, e)));
      }
      for (int e = 0; e < kWmmaM * kWmmaN; ++e) wmma_element(base, 0, kFragAcc, e) = d[e];  // d may be c
      break;
    }
    default: break;
  }
}

// A lane's side of a wmma collective: record what it passes, wait for the whole warp.
inline void wmma_collective(int op, int code, void* d, const void* a, const void* b, const void* c,
                            const void* mem, unsigned ldm, int layout, uint32_t value, const char* file, int line) {
  Thread* t = rt.cur;
  t->w_frag[0] = d;
  t->w_frag[1] = const_cast<void*>(a);
  t->w_frag[2] = const_cast<void*>(b);
  t->w_frag[3] = const_cast<void*>(c);
  t->w_mem = mem;
  t->w_ldm = ldm;
  t->w_layout = layout;
  warp_collective(op, 0xffffffffu, value, 0, 0, code, file, line);
}
// ------------------------------------------------------------ end of tensor cores

inline int block_barrier(int kind, int pred, const char* file, int line) {
  Thread* t = rt.cur;
  t->state = kAtBarrier;
  t->bar_kind = kind;
  t->bar_pred = pred;
  t->bar_file = file;
  t->bar_line = line;
  yield();
  return t->bar_result;
}

// Everyone still running waits at a barrier: release it, or report why not.
inline bool release_block_barrier() {
  Thread* first = nullptr;
  unsigned waiting = 0, count = 0;
  for (unsigned i = 0; i < rt.nthreads; ++i) {
    Thread& t = rt.threads[i];
    if (t.state == kDone) continue;
    if (t.state != kAtBarrier) return false;
    ++waiting;
    if (!first) first = &t;
    if (!same_site(t.bar_file, t.bar_line, first->bar_file, first->bar_line) || t.bar_kind != first->bar_kind) {
      char w1[160], w2[160], s1[256], s2[256];
      where(w1, sizeof w1, first);
      where(w2, sizeof w2, &t);
      set_error(kErrBarrierDivergence,
                "threads of one block wait at different __syncthreads(): %s at %s, %s at %s",
                w1, site_name(first->bar_file, first->bar_line, s1, sizeof s1), w2,
                site_name(t.bar_file, t.bar_line, s2, sizeof s2));
      return false;
    }
    count += t.bar_pred != 0;
  }
  if (!first) return false;
  if (waiting != rt.nthreads && rt.opt.strict_exit) {
    char w1[160], s1[256];
    where(w1, sizeof w1, nullptr);
    set_error(kErrBarrierDivergence,
              "__syncthreads() at %s reached by %u of %u threads of %s; the others already returned "
              "(undefined behaviour in CUDA: a barrier must be reached by the whole block)",
              site_name(first->bar_file, first->bar_line, s1, sizeof s1), waiting, rt.nthreads, w1);
    return false;
  }
  int result = 0;
  switch (first->bar_kind) {
    case kSyncCount: result = static_cast<int>(count); break;
    case kSyncAnd: result = count == waiting; break;
    case kSyncOr: result = count != 0; break;
    default: break;
  }
  for (unsigned i = 0; i < rt.nthreads; ++i) {
    Thread& t = rt.threads[i];
    if (t.state == kAtBarrier) {
      t.state = kRunnable;
      t.bar_result = result;
    }
  }
  ++rt.stats.barriers;
  if (rt.opt.schedule == kRandom) make_order();
  return true;
}

inline void report_deadlock() {
  char buf[4096];
  size_t used = 0;
  unsigned shown = 0;
  for (unsigned i = 0; i < rt.nthreads && shown < 8; ++i) {
    Thread& t = rt.threads[i];
    if (t.state == kDone) continue;
    char w[160], s[256];
    where(w, sizeof w, &t);
    int n;
    if (t.state == kAtBarrier) {
      n = snprintf(buf + used, sizeof buf - used, "\n  %s waits at __syncthreads() (%s)", w,
                   site_name(t.bar_file, t.bar_line, s, sizeof s));
    } else {
      n = snprintf(buf + used, sizeof buf - used, "\n  %s waits at %s(mask 0x%08x) (%s); live lanes 0x%08x", w,
                   warp_op_name(t.w_op), t.w_mask, site_name(t.w_file, t.w_line, s, sizeof s), live_lanes(t.warp));
    }
    if (n < 0 || used + n >= sizeof buf) break;
    used += n;
    ++shown;
  }
  buf[used] = 0;
  set_error(kErrDeadlock, "deadlock: no thread of the block can continue (a warp collective whose named lanes "
            "never all arrive, or lanes at different barriers):%s", buf);
}

inline void ensure_threads(unsigned n) {
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_t stack = (rt.opt.stack_bytes + page - 1) / page * page;
  if (n <= rt.capacity && stack == rt.stack_bytes) return;
  if (rt.stacks) munmap(rt.stacks, rt.stacks_len);
  free(rt.threads);
  free(rt.order);
  rt.capacity = std::max(n, 32u);
  rt.stack_bytes = stack;
  rt.stacks_len = rt.capacity * (stack + page);
  void* mem = mmap(nullptr, rt.stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  rt.stacks = mem == MAP_FAILED ? nullptr : static_cast<unsigned char*>(mem);
  for (unsigned i = 0; rt.stacks && i < rt.capacity; ++i) mprotect(rt.stacks + i * (stack + page), page, PROT_NONE);
  rt.threads = static_cast<Thread*>(calloc(rt.capacity, sizeof(Thread)));
  rt.order = static_cast<unsigned*>(calloc(rt.capacity, sizeof(unsigned)));
}

inline bool run_block() {
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  unsigned n = rt.nthreads;
  async_copies_reset(n);  // see "asynchronous copies"
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = rt.threads[i];
    memset(&t, 0, sizeof t);
    t.linear = i;
    t.idx = uint3{i % rt.block_dim.x, (i / rt.block_dim.x) % rt.block_dim.y, i / (rt.block_dim.x * rt.block_dim.y)};
    t.lane = i % kWarpSize;
    t.warp = i / kWarpSize;
    t.state = kRunnable;
    unsigned char* lo = rt.stacks + i * (rt.stack_bytes + page) + page;
    t.sp = make_context(lo, rt.stack_bytes, &fiber_main, &t);
  }
  rt.done = 0;
  make_order();
  // A group of the order is swept until none of its threads can run: the whole block in
  // step (one sweep), or one warp at a time (a warp collective only waits for lanes of its
  // own warp, so a drained warp stays drained until the barrier is released).
  const bool warp_alone = rt.opt.schedule == kWarps || rt.opt.schedule == kWarpsReverse;
  for (;;) {
    bool ran = false;
    for (unsigned g0 = 0; g0 < n;) {
      const unsigned first = rt.order[g0];  // lane 0 of its warp for the warp schedules
      const unsigned g1 = warp_alone ? g0 + std::min<unsigned>(kWarpSize, n - first) : n;
      for (bool again = true; again;) {
        again = false;
        for (unsigned k = g0; k < g1; ++k) {
          Thread& t = rt.threads[rt.order[k]];
          if (t.state != kRunnable) continue;
          rt.cur = &t;
          ++rt.stats.switches;
          switch_context(&rt.sched_sp, t.sp);
          rt.cur = nullptr;
          ran = again = true;
          if (rt.error != kOk) return false;
          if (t.state == kDone) {
            ++rt.done;
            try_complete_warp(t.warp);  // the lane no longer takes part in collectives
            if (rt.error != kOk) return false;
          }
        }
        again = again && warp_alone;
      }
      g0 = g1;
    }
    if (rt.done == n) return true;
    if (ran) continue;
    if (!release_block_barrier()) {
      if (rt.error == kOk) report_deadlock();
      return false;
    }
  }
}

// ------------------------------------------------------------ shared memory
extern "C" {
// Defined by the build next to the kernels (the symbol every `extern __shared__`
// array is aliased to), so that the dynamic buffer is thread_local storage too.
extern thread_local unsigned char cuemu_dynamic_smem[];
}

struct TlsQuery { uintptr_t base; void* data; size_t size; };
inline int tls_callback(struct dl_phdr_info* info, size_t, void* arg) {
  TlsQuery* q = static_cast<TlsQuery*>(arg);
  if (info->dlpi_addr != q->base) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      q->data = info->dlpi_tls_data;
      q->size = info->dlpi_phdr[i].p_memsz;
    }
  }
  return 1;
}

// Find this module's TLS block (all __shared__ storage) for the calling OS thread.
inline bool locate_shared_memory() {
  volatile unsigned char touch = cuemu_dynamic_smem[0];  // allocates the block
  (void)touch;
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&locate_shared_memory), &info)) return false;
  TlsQuery q{reinterpret_cast<uintptr_t>(info.dli_fbase), nullptr, 0};
  // dli_fbase is the load address of the ELF header; dlpi_addr is the load bias.
  // For shared objects linked at address 0 they coincide.
  dl_iterate_phdr(&tls_callback, &q);
  if (!q.data) return false;
  rt.tls_begin = static_cast<unsigned char*>(q.data);
  rt.tls_end = rt.tls_begin + q.size;
  rt.dyn_begin = &cuemu_dynamic_smem[0];
  return rt.dyn_begin >= rt.tls_begin && rt.dyn_begin + kMaxDynamicSmem + kSmemTail <= rt.tls_end;
}

inline void poison_shared_memory() {
  size_t dyn = std::min(rt.dyn_size + kSmemTail, kMaxDynamicSmem + kSmemTail);
  memset(rt.tls_begin, 0xFF, static_cast<size_t>(rt.dyn_begin - rt.tls_begin));
  memset(rt.dyn_begin, 0xFF, dyn);
  unsigned char* after = rt.dyn_begin + kMaxDynamicSmem + kSmemTail;
  memset(after, 0xFF, static_cast<size_t>(rt.tls_end - after));
}

inline bool check_shared_tail() {
  for (size_t i = 0; i < kSmemTail; ++i) {
    if (rt.dyn_begin[rt.dyn_size + i] != 0xFF) {
      char w[160];
      where(w, sizeof w, nullptr);
      set_error(kErrSharedOverflow,
                "%s wrote dynamic shared memory at byte %zu, past the %zu bytes given at launch",
                w, rt.dyn_size + i, rt.dyn_size);
      return false;
    }
  }
  return true;
}

// ------------------------------------------------------------ signals
inline bool in_stack_guard(uintptr_t a, unsigned* thread) {
  if (!rt.stacks) return false;
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  uintptr_t lo = reinterpret_cast<uintptr_t>(rt.stacks);
  if (a < lo || a >= lo + rt.stacks_len) return false;
  size_t off = a - lo, slot = rt.stack_bytes + page;
  if (off % slot >= page) return false;
  *thread = static_cast<unsigned>(off / slot);
  return true;
}

inline void signal_handler(int sig, siginfo_t* info, void* context) {
  if (!rt.in_launch || !pthread_equal(pthread_self(), rt.launcher)) {
    // Not ours: put the previous handler back and let the signal happen again.
    struct sigaction* old = sig == SIGSEGV ? &rt.old_segv : sig == SIGBUS ? &rt.old_bus
                          : sig == SIGFPE ? &rt.old_fpe : sig == SIGILL ? &rt.old_ill : &rt.old_alrm;
    sigaction(sig, old, nullptr);
    if (sig == SIGALRM) raise(sig);
    return;
  }
  char w[160], site[256] = "?";
  where(w, sizeof w, rt.cur);
#if defined(__x86_64__)
  {
    const greg_t* regs = static_cast<ucontext_t*>(context)->uc_mcontext.gregs;
    if (regs[REG_RIP] == 0 && regs[REG_RSP] != 0) {  // a call through a null pointer: name the caller
      char caller[200];
      demangle_site(*reinterpret_cast<void* const*>(regs[REG_RSP]), caller, sizeof caller);
      snprintf(site, sizeof site, "address 0, called from %s", caller);
    } else {
      demangle_site(reinterpret_cast<const void*>(regs[REG_RIP]), site, sizeof site);
    }
  }
#else
  (void)context;
#endif
  uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  unsigned th = 0;
  if (sig == SIGSEGV || sig == SIGBUS) rt.stats.fault_addr = addr;
  if (sig == SIGALRM) {
    set_error(kErrTimeout, "launch timed out after %.0f s (an endless loop, or a spin-wait on another thread "
              "or block, which the cooperative emulation cannot run); last running: %s", rt.opt.timeout_s, w);
  } else if (sig == SIGFPE) {
    set_error(kErrFault, "arithmetic fault (integer division by zero?) in %s at %s", w, site);
  } else if (sig == SIGILL) {
    set_error(kErrTrap, "illegal instruction (a trap: misaligned access caught by the alignment check, "
              "__builtin_trap or unreachable code) in %s at %s", w, site);
  } else if ((sig == SIGSEGV || sig == SIGBUS) && in_stack_guard(addr, &th)) {
    set_error(kErrFault, "stack overflow of thread %u in %s (raise the emulated stack size)", th, w);
  } else if (sig == SIGSEGV && info->si_code == SI_KERNEL) {
    set_error(kErrFault, "general protection fault in %s at %s: a misaligned 16-byte vector access (float4 / "
              "double2 on an address that is not a multiple of 16), or a non-canonical address", w, site);
  } else {
    set_error(kErrFault, "invalid memory access at address 0x%lx (%s) in %s at %s", static_cast<unsigned long>(addr),
              sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", w, site);
  }
  abort_launch();
}

inline void install_handlers() {
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = sizeof g_altstack;
  ss.ss_flags = 0;
  sigaltstack(&ss, &rt.old_altstack);
  struct sigaction sa{};
  sa.sa_sigaction = &signal_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &rt.old_segv);
  sigaction(SIGBUS, &sa, &rt.old_bus);
  sigaction(SIGFPE, &sa, &rt.old_fpe);
  sigaction(SIGILL, &sa, &rt.old_ill);
  sigaction(SIGALRM, &sa, &rt.old_alrm);
  if (rt.opt.timeout_s > 0) {
    itimerval it{};
    it.it_value.tv_sec = static_cast<time_t>(rt.opt.timeout_s);
    it.it_value.tv_usec = static_cast<suseconds_t>((rt.opt.timeout_s - static_cast<double>(it.it_value.tv_sec)) * 1e6);
    setitimer(ITIMER_REAL, &it, nullptr);
  }
}

inline void remove_handlers() {
  itimerval it{};
  setitimer(ITIMER_REAL, &it, nullptr);
  sigaction(SIGSEGV, &rt.old_segv, nullptr);
  sigaction(SIGBUS, &rt.old_bus, nullptr);
  sigaction(SIGFPE, &rt.old_fpe, nullptr);
  sigaction(SIGILL, &rt.old_ill, nullptr);
  sigaction(SIGALRM, &rt.old_alrm, nullptr);
  if (rt.old_altstack.ss_flags & SS_DISABLE) {
    stack_t ss{};
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
  } else {
    sigaltstack(&rt.old_altstack, nullptr);
  }
}

// ------------------------------------------------------------ kernel table
enum ParamKind : int { kPtr = 0, kConstPtr = 1, kFloat = 2, kSigned = 3, kUnsigned = 4, kBool = 5, kOther = 6 };
struct ParamInfo { int kind; int size; };

template <class A>
constexpr ParamInfo param_info() {
  using T = std::remove_cv_t<std::remove_reference_t<A>>;
  if constexpr (std::is_pointer_v<T>) {
    return {std::is_const_v<std::remove_pointer_t<T>> ? kConstPtr : kPtr, static_cast<int>(sizeof(T))};
  } else if constexpr (std::is_same_v<T, bool>) {
    return {kBool, 1};
  } else if constexpr (std::is_floating_point_v<T>) {
    return {kFloat, static_cast<int>(sizeof(T))};
  } else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) {
    if constexpr (std::is_enum_v<T>) return {kSigned, static_cast<int>(sizeof(T))};
    else return {std::is_signed_v<T> ? kSigned : kUnsigned, static_cast<int>(sizeof(T))};
  } else {
    return {kOther, static_cast<int>(sizeof(T))};
  }
}

template <class... A>
struct Signature {
  static constexpr ParamInfo info[sizeof...(A) + 1] = {param_info<A>()..., ParamInfo{-1, 0}};
  template <size_t... I>
  static void call(void (*fn)(A...), void** p, std::index_sequence<I...>) {
    // Each thread gets its own copy of the parameters, as from the CUDA param space.
    std::tuple<std::remove_cv_t<std::remove_reference_t<A>>...> values;
    ((memcpy(static_cast<void*>(&std::get<I>(values)), p[I], sizeof(std::get<I>(values)))), ...);
    fn(std::get<I>(values)...);
  }
  static void invoke(void (*fn)(), void** p) {
    call(reinterpret_cast<void (*)(A...)>(fn), p, std::index_sequence_for<A...>{});
  }
};

struct KernelEntry {
  const char* name;
  void (*fn)();
  void (*invoke)(void (*)(), void**);
  int nparams;
  const ParamInfo* params;
  long long launch_bounds;  // maxThreadsPerBlock of __launch_bounds__, 0 when unknown
};

template <class... A>
KernelEntry make_entry(void (*fn)(A...), const char* name, long long launch_bounds = 0) {
  return KernelEntry{name, reinterpret_cast<void (*)()>(fn), &Signature<A...>::invoke,
                     static_cast<int>(sizeof...(A)), Signature<A...>::info, launch_bounds};
}

}  // namespace cuemu

// ---------------------------------------------------------------- built-in variables
#define threadIdx (static_cast<const uint3&>(::cuemu::rt.cur->idx))
#define blockIdx (static_cast<const uint3&>(::cuemu::rt.block_idx))
#define blockDim (static_cast<const dim3&>(::cuemu::rt.block_dim))
#define gridDim (static_cast<const dim3&>(::cuemu::rt.grid_dim))
inline constexpr int warpSize = 32;

// ---------------------------------------------------------------- synchronisation
// The trailing defaulted parameters (CUEMU_SITE) carry the call's source location (never
// passed by kernels): it identifies a barrier and names barriers and collectives in messages.
#define CUEMU_SITE const char* cuemu_file = __builtin_FILE(), int cuemu_line = __builtin_LINE()
__attribute__((noinline)) inline void __syncthreads(CUEMU_SITE) {
  asm volatile("" ::: "memory");
  ::cuemu::block_barrier(::cuemu::kSync, 0, cuemu_file, cuemu_line);
  asm volatile("" ::: "memory");
}
__attribute__((noinline)) inline int __syncthreads_count(int pred, CUEMU_SITE) {
  return ::cuemu::block_barrier(::cuemu::kSyncCount, pred != 0, cuemu_file, cuemu_line);
}
__attribute__((noinline)) inline int __syncthreads_and(int pred, CUEMU_SITE) {
  return ::cuemu::block_barrier(::cuemu::kSyncAnd, pred != 0, cuemu_file, cuemu_line);
}
__attribute__((noinline)) inline int __syncthreads_or(int pred, CUEMU_SITE) {
  return ::cuemu::block_barrier(::cuemu::kSyncOr, pred != 0, cuemu_file, cuemu_line);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

__attribute__((noinline)) inline void __syncwarp(unsigned mask = 0xffffffffu, CUEMU_SITE) {
  ::cuemu::warp_collective(::cuemu::kSyncWarp, mask, 0, 0, 0, 4, cuemu_file, cuemu_line);
}
inline unsigned __activemask() { return ::cuemu::live_lanes(::cuemu::rt.cur->warp); }

namespace cuemu {
template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace cuemu

template <class T>
__attribute__((noinline)) T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::kShflIdx, mask, ::cuemu::to_bits(var), src_lane,
                                                        ((32 - width) << 8) | 0x1f, sizeof(T),
                                                        cuemu_file, cuemu_line));
}
template <class T>
__attribute__((noinline)) T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::kShflUp, mask, ::cuemu::to_bits(var),
                                                        static_cast<int>(delta), (32 - width) << 8, sizeof(T),
                                                        cuemu_file, cuemu_line));
}
template <class T>
__attribute__((noinline)) T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::kShflDown, mask, ::cuemu::to_bits(var),
                                                        static_cast<int>(delta), ((32 - width) << 8) | 0x1f,
                                                        sizeof(T), cuemu_file, cuemu_line));
}
template <class T>
__attribute__((noinline)) T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, CUEMU_SITE) {
  return ::cuemu::from_bits<T>(::cuemu::warp_collective(::cuemu::kShflXor, mask, ::cuemu::to_bits(var), lane_mask,
                                                        ((32 - width) << 8) | 0x1f, sizeof(T),
                                                        cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline unsigned __ballot_sync(unsigned mask, int pred, CUEMU_SITE) {
  return static_cast<unsigned>(::cuemu::warp_collective(::cuemu::kBallot, mask, pred != 0, 0, 0, 4,
                                                        cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline int __any_sync(unsigned mask, int pred, CUEMU_SITE) {
  return static_cast<int>(::cuemu::warp_collective(::cuemu::kAny, mask, pred != 0, 0, 0, 4,
                                                   cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline int __all_sync(unsigned mask, int pred, CUEMU_SITE) {
  return static_cast<int>(::cuemu::warp_collective(::cuemu::kAll, mask, pred != 0, 0, 0, 4,
                                                   cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline unsigned __reduce_add_sync(unsigned mask, unsigned v, CUEMU_SITE) {
  return static_cast<unsigned>(::cuemu::warp_collective(::cuemu::kReduceAdd, mask, v, 0, 0, 4, cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline unsigned __reduce_min_sync(unsigned mask, unsigned v, CUEMU_SITE) {
  return static_cast<unsigned>(::cuemu::warp_collective(::cuemu::kReduceMin, mask, v, 0, 0, 4, cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline unsigned __reduce_max_sync(unsigned mask, unsigned v, CUEMU_SITE) {
  return static_cast<unsigned>(::cuemu::warp_collective(::cuemu::kReduceMax, mask, v, 0, 0, 4, cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline int __reduce_add_sync(unsigned mask, int v, CUEMU_SITE) {
  return static_cast<int>(::cuemu::warp_collective(::cuemu::kReduceAdd, mask, static_cast<uint32_t>(v), 0, 0, 4,
                                                   cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline int __reduce_min_sync(unsigned mask, int v, CUEMU_SITE) {
  return static_cast<int>(::cuemu::warp_collective(::cuemu::kReduceMinS, mask, static_cast<uint32_t>(v), 0, 0, 4,
                                                   cuemu_file, cuemu_line));
}
__attribute__((noinline)) inline int __reduce_max_sync(unsigned mask, int v, CUEMU_SITE) {
  return static_cast<int>(::cuemu::warp_collective(::cuemu::kReduceMaxS, mask, static_cast<uint32_t>(v), 0, 0, 4,
                                                   cuemu_file, cuemu_line));
}
template <class T>
__attribute__((noinline)) unsigned __match_any_sync(unsigned mask, T v, CUEMU_SITE) {
  return static_cast<unsigned>(::cuemu::warp_collective(::cuemu::kMatchAny, mask, ::cuemu::to_bits(v), 0, 0,
                                                        sizeof(T), cuemu_file, cuemu_line));
}

// ---------------------------------------------------------------- tensor cores: nvcuda::wmma
// The fragment API for m16n16k8 with tf32 multiplicands and a float accumulator (see the
// runtime's section "tensor cores"). A kernel includes <mma.h> only when not emulated.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major = 0, mem_col_major = 1 };

template <class Use> struct cuemu_use;
template <> struct cuemu_use<matrix_a> { static constexpr int kind = ::cuemu::kFragA; };
template <> struct cuemu_use<matrix_b> { static constexpr int kind = ::cuemu::kFragB; };
template <> struct cuemu_use<accumulator> { static constexpr int kind = ::cuemu::kFragAcc; };
template <class Layout> struct cuemu_layout { static constexpr int code = -1; };
template <> struct cuemu_layout<row_major> { static constexpr int code = ::cuemu::kRowMajor; };
template <> struct cuemu_layout<col_major> { static constexpr int code = ::cuemu::kColMajor; };
template <> struct cuemu_layout<void> { static constexpr int code = ::cuemu::kNoLayout; };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static constexpr int kind = cuemu_use<Use>::kind;
  static_assert(M == ::cuemu::kWmmaM && N == ::cuemu::kWmmaN && K == ::cuemu::kWmmaK,
                "the CUDA emulation has the wmma shape m16n16k8 only");
  static_assert(kind == ::cuemu::kFragAcc
                    ? std::is_same_v<T, float> && std::is_void_v<Layout>
                    : std::is_same_v<T, precision::tf32> && cuemu_layout<Layout>::code >= 0,
                "the CUDA emulation has tf32 matrix_a / matrix_b fragments (row_major or col_major) and float "
                "accumulators only");

 public:
  typedef float element_type;
  typedef float storage_element_type;
  enum { num_elements = ::cuemu::wmma_elements(kind) };
  float x[num_elements];
  static constexpr int cuemu_code = ::cuemu::wmma_code(kind, cuemu_layout<Layout>::code);
};

typedef fragment<accumulator, 16, 16, 8, float> cuemu_accumulator;

template <class Use, int M, int N, int K, class T, class Layout>
__attribute__((noinline)) void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v, CUEMU_SITE) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  ::cuemu::wmma_collective(::cuemu::kWmmaFill, f.cuemu_code, f.x, nullptr, nullptr, nullptr, nullptr, 0, 0, bits,
                           cuemu_file, cuemu_line);
}

template <class Use, class Layout>
__attribute__((noinline)) void load_matrix_sync(fragment<Use, 16, 16, 8, precision::tf32, Layout>& f,
                                                const float* p, unsigned ldm, CUEMU_SITE) {
  ::cuemu::wmma_collective(::cuemu::kWmmaLoad, f.cuemu_code, f.x, nullptr, nullptr, nullptr, p, ldm,
                           cuemu_layout<Layout>::code, 0, cuemu_file, cuemu_line);
}

__attribute__((noinline)) inline void load_matrix_sync(cuemu_accumulator& f, const float* p, unsigned ldm,
                                                       layout_t layout, CUEMU_SITE) {
  ::cuemu::wmma_collective(::cuemu::kWmmaLoad, f.cuemu_code, f.x, nullptr, nullptr, nullptr, p, ldm,
                           static_cast<int>(layout), 0, cuemu_file, cuemu_line);
}

__attribute__((noinline)) inline void store_matrix_sync(float* p, const cuemu_accumulator& f, unsigned ldm,
                                                        layout_t layout, CUEMU_SITE) {
  ::cuemu::wmma_collective(::cuemu::kWmmaStore, f.cuemu_code, const_cast<float*>(f.x), nullptr, nullptr, nullptr, p,
                           ldm, static_cast<int>(layout), 0, cuemu_file, cuemu_line);
}

template <class LayoutA, class LayoutB>
__attribute__((noinline)) void mma_sync(cuemu_accumulator& d, const fragment<matrix_a, 16, 16, 8, precision::tf32, LayoutA>& a,
                                        const fragment<matrix_b, 16, 16, 8, precision::tf32, LayoutB>& b,
                                        const cuemu_accumulator& c, CUEMU_SITE) {
  ::cuemu::wmma_collective(::cuemu::kWmmaMma, d.cuemu_code, d.x, a.x, b.x, c.x, nullptr, 0, 0, 0, cuemu_file,
                           cuemu_line);
}

// cvt.rna.tf32.f32: the float rounded to 10 mantissa bits, to nearest with ties away from zero
// (adding half an ulp of tf32 to the magnitude carries into the exponent as it should; the
// largest floats round to infinity), its low 13 bits zero. Inf stays Inf; NaN stays a quiet NaN.
inline float __float_to_tf32(float in) {
  uint32_t u;
  memcpy(&u, &in, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    if (u & 0x007fffffu) u = (u | 0x00400000u) & ~0x1fffu;
  } else {
    u = (u + 0x1000u) & ~0x1fffu;
  }
  float out;
  memcpy(&out, &u, 4);
  return out;
}
}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------------- traps, assert
[[noreturn]] inline void __trap() { ::cuemu::fail_in_thread(::cuemu::kErrTrap, "__trap()"); }
[[noreturn]] inline void __brkpt() { ::cuemu::fail_in_thread(::cuemu::kErrTrap, "__brkpt()"); }
namespace cuemu {
[[noreturn]] inline void assert_failed(const char* expr, const char* file, int line) {
  char buf[512];
  snprintf(buf, sizeof buf, "device assert(%s) failed at %s:%d", expr, file, line);
  fail_in_thread(kErrTrap, buf);
}
}  // namespace cuemu
#undef assert
#define assert(e) ((e) ? static_cast<void>(0) : ::cuemu::assert_failed(#e, __FILE__, __LINE__))

// ---------------------------------------------------------------- atomics
namespace cuemu {
// A non-deduced parameter: atomicAdd(float*, 1.0) converts the value, as CUDA's overloads do.
template <class T>
using same = std::type_identity_t<T>;

template <class T, class F>
inline T atomic_update(T* addr, F f) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4 or 8 bytes");
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U* p = reinterpret_cast<U*>(addr);
  U old_bits = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  for (;;) {
    T old;
    memcpy(&old, &old_bits, sizeof(T));
    T nv = f(old);
    U new_bits;
    memcpy(&new_bits, &nv, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
}  // namespace cuemu

template <class T>
inline T atomicAdd(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T o) { return static_cast<T>(o + v); });
}
template <class T>
inline T atomicSub(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T o) { return static_cast<T>(o - v); });
}
template <class T>
inline T atomicExch(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T) { return v; });
}
template <class T>
inline T atomicMin(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T o) { return v < o ? v : o; });
}
template <class T>
inline T atomicMax(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T o) { return v > o ? v : o; });
}
template <class T>
inline T atomicAnd(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T o) { return static_cast<T>(o & v); });
}
template <class T>
inline T atomicOr(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T o) { return static_cast<T>(o | v); });
}
template <class T>
inline T atomicXor(T* a, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [v](T o) { return static_cast<T>(o ^ v); });
}
template <class T> inline T atomicCAS(T* a, cuemu::same<T> compare, cuemu::same<T> v) {
  return ::cuemu::atomic_update(a, [compare, v](T o) { return o == compare ? v : o; });
}
inline unsigned atomicInc(unsigned* a, unsigned v) {
  return ::cuemu::atomic_update(a, [v](unsigned o) { return o >= v ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned v) {
  return ::cuemu::atomic_update(a, [v](unsigned o) { return (o == 0 || o > v) ? v : o - 1; });
}

// ---------------------------------------------------------------- math
using std::abs;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

template <class A, class B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline double rcbrt(double x) { return 1.0 / cbrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752440); }
inline float fdividef(float a, float b) { return a / b; }

inline int __float_as_int(float x) { int r; memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; memcpy(&r, &x, 8); return r; }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline int __double2int_rz(double x) { return static_cast<int>(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31));
}
// Time does not pass between barriers here: a kernel that waits on a clock or sleeps in a
// loop for another thread spins until the launch times out.
inline void __nanosleep(unsigned) {}
inline long long clock64() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000ll + ts.tv_nsec;
}

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------- global memory accounting
// A build with -DCUEMU_COUNT_ACCESSES also gets g++'s kernel-address instrumentation in call
// mode (no shadow memory, no runtime library; flags in tests/cuda_emulation.py): every load
// and store of the translation unit calls one of the __asan_{load,store}{1,2,4,8,16,N}_noabort
// hooks below with its address. An access that falls in a region the harness registered (its
// global-memory arrays) is counted for that region by direction and width, so a float4 or
// double2 access is one 16-byte access and a scalar float one 4-byte access. Everything else
// (stacks, shared memory, the runtime's own data) is ignored. The build compiles with -O0 so
// that the accesses are those of the source: an optimiser would split a vector load whose
// lanes are read one by one into scalar loads, or merge scalar ones.
namespace cuemu {
constexpr int kAccessWidths = 6;  // 1, 2, 4, 8, 16 bytes, any other size
struct AccessRegion {             // layout mirrored in tests/cuda_emulation.py
  uint64_t lo, hi;                // [lo, hi): the bytes of one array
  uint64_t loads[kAccessWidths];
  uint64_t stores[kAccessWidths];
};
inline AccessRegion* g_regions = nullptr;  // sorted by address, disjoint
inline uint64_t g_num_regions = 0, g_regions_lo = 0, g_regions_hi = 0;

__attribute__((no_sanitize_address)) inline void count_access(uintptr_t addr, uint64_t size, bool store) {
  if (addr < g_regions_lo || addr >= g_regions_hi) return;
  uint64_t lo = 0, hi = g_num_regions;  // the first region that ends after addr
  while (lo < hi) {
    const uint64_t mid = (lo + hi) / 2;
    if (g_regions[mid].hi <= addr) lo = mid + 1;
    else hi = mid;
  }
  if (lo == g_num_regions || addr < g_regions[lo].lo) return;
  const int w = size == 1 ? 0 : size == 2 ? 1 : size == 4 ? 2 : size == 8 ? 3 : size == 16 ? 4 : 5;
  ++(store ? g_regions[lo].stores : g_regions[lo].loads)[w];
}
}  // namespace cuemu

extern "C" {
#ifdef CUEMU_COUNT_ACCESSES
#define CUEMU_ACCESS_HOOKS(N)                                                                             \
  __attribute__((no_sanitize_address, visibility("hidden"))) void __asan_load##N##_noabort(uintptr_t a) { \
    ::cuemu::count_access(a, N, false);                                                                   \
  }                                                                                                       \
  __attribute__((no_sanitize_address, visibility("hidden"))) void __asan_store##N##_noabort(uintptr_t a) { \
    ::cuemu::count_access(a, N, true);                                                                    \
  }
CUEMU_ACCESS_HOOKS(1)
CUEMU_ACCESS_HOOKS(2)
CUEMU_ACCESS_HOOKS(4)
CUEMU_ACCESS_HOOKS(8)
CUEMU_ACCESS_HOOKS(16)
#undef CUEMU_ACCESS_HOOKS
__attribute__((no_sanitize_address, visibility("hidden"))) void __asan_loadN_noabort(uintptr_t a, size_t n) {
  ::cuemu::count_access(a, n, false);
}
__attribute__((no_sanitize_address, visibility("hidden"))) void __asan_storeN_noabort(uintptr_t a, size_t n) {
  ::cuemu::count_access(a, n, true);
}
__attribute__((no_sanitize_address, visibility("hidden"))) void __asan_handle_no_return() {}
// Hooks of the initialisation-order check: nothing to check.
__attribute__((no_sanitize_address, visibility("hidden"))) void __asan_before_dynamic_init(const char*) {}
__attribute__((no_sanitize_address, visibility("hidden"))) void __asan_after_dynamic_init() {}
#endif

__attribute__((visibility("default"), used)) int cuemu_counts_accesses() {
#ifdef CUEMU_COUNT_ACCESSES
  return 1;
#else
  return 0;
#endif
}

// The regions the next launches count into (the caller owns them and reads the counters back);
// n == 0 stops counting.
__attribute__((visibility("default"), used, no_sanitize_address)) void cuemu_count_accesses_in(
    cuemu::AccessRegion* regions, uint64_t n) {
  cuemu::g_regions = n ? regions : nullptr;
  cuemu::g_num_regions = n;
  cuemu::g_regions_lo = n ? regions[0].lo : 0;
  cuemu::g_regions_hi = n ? regions[n - 1].hi : 0;
}
}  // extern "C"

// ---------------------------------------------------------------- launch entry points
// The build appends, after the kernel source, a table
//   extern "C" const cuemu::KernelEntry cuemu_kernels[] = {cuemu::make_entry(&k<float>, "k<float>", lb), ...};
// where lb is the kernel's __launch_bounds__ thread count, evaluated by the compiler from
// the expression the build copies out of the source (0 when it cannot).
//   extern "C" const int cuemu_num_kernels = N;
extern "C" {
extern const cuemu::KernelEntry cuemu_kernels[];
extern const int cuemu_num_kernels;

__attribute__((visibility("default"), used)) int cuemu_kernel_count() { return cuemu_num_kernels; }
__attribute__((visibility("default"), used)) const char* cuemu_kernel_name(int i) { return cuemu_kernels[i].name; }
__attribute__((visibility("default"), used)) int cuemu_kernel_nparams(int i) { return cuemu_kernels[i].nparams; }
__attribute__((visibility("default"), used)) int cuemu_kernel_param(int i, int j, int* kind, int* size) {
  *kind = cuemu_kernels[i].params[j].kind;
  *size = cuemu_kernels[i].params[j].size;
  return 0;
}
__attribute__((visibility("default"), used)) long long cuemu_kernel_launch_bounds(int i) {
  return cuemu_kernels[i].launch_bounds;
}
__attribute__((visibility("default"), used)) uint64_t cuemu_max_dynamic_smem() { return cuemu::kMaxDynamicSmem; }

// Run kernel `index` over the whole grid, block after block. Returns 0 or an
// error code; `message` then says what went wrong and where.
__attribute__((visibility("default"), used)) int cuemu_launch(int index, const unsigned* grid, const unsigned* block,
                                                               uint64_t shared_mem, void** params,
                                                               const cuemu::Options* options, cuemu::Stats* stats,
                                                               char* message, uint64_t message_len) {
  using namespace cuemu;
  rt.error = kOk;
  rt.message[0] = 0;
  rt.stats = Stats{};
  rt.opt = *options;
  rt.rng = options->seed;
  wmma_new_mapping(options->seed);  // a new element -> lane mapping of the wmma fragments
  int code = kOk;
  auto finish = [&](int c) {
    if (message && message_len) snprintf(message, message_len, "%s", rt.message);
    if (stats) *stats = rt.stats;
    return c;
  };
  if (index < 0 || index >= cuemu_num_kernels) {
    set_error(kErrInternal, "no kernel %d in this module", index);
    return finish(kErrInternal);
  }
  dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
  uint64_t nthreads = uint64_t(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) {
    set_error(kErrLaunchConfig, "invalid launch: grid (%u,%u,%u), block (%u,%u,%u) has a zero dimension",
              g.x, g.y, g.z, b.x, b.y, b.z);
  } else if (b.x > 1024 || b.y > 1024 || b.z > 64 || nthreads > 1024) {
    set_error(kErrLaunchConfig, "invalid launch: block (%u,%u,%u) exceeds 1024 threads or (1024,1024,64)",
              b.x, b.y, b.z);
  } else if (g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    set_error(kErrLaunchConfig, "invalid launch: grid (%u,%u,%u) exceeds (2^31-1, 65535, 65535)", g.x, g.y, g.z);
  } else if (shared_mem > options->max_dynamic_smem || shared_mem > kMaxDynamicSmem) {
    set_error(kErrLaunchConfig,
              "invalid launch: %llu bytes of dynamic shared memory exceed the %llu allowed (above 48 KiB a kernel "
              "needs its max_dynamic_shared_size_bytes attribute raised first)",
              static_cast<unsigned long long>(shared_mem), static_cast<unsigned long long>(options->max_dynamic_smem));
  } else if (options->launch_bounds > 0 && nthreads > static_cast<uint64_t>(options->launch_bounds)) {
    set_error(kErrLaunchConfig, "invalid launch: %llu threads per block but __launch_bounds__(%d)",
              static_cast<unsigned long long>(nthreads), options->launch_bounds);
  }
  if (rt.error != kOk || options->dry_run) return finish(rt.error);
  if (!locate_shared_memory()) {
    set_error(kErrInternal, "cannot locate the module's thread-local (shared memory) block");
    return finish(kErrInternal);
  }
  ensure_threads(static_cast<unsigned>(nthreads));
  if (!rt.stacks || !rt.threads || !rt.order) {
    set_error(kErrInternal, "cannot allocate fiber stacks");
    return finish(kErrInternal);
  }
  rt.grid_dim = g;
  rt.block_dim = b;
  rt.nthreads = static_cast<unsigned>(nthreads);
  rt.fn = cuemu_kernels[index].fn;
  rt.invoke = cuemu_kernels[index].invoke;
  rt.params = params;
  rt.dyn_size = shared_mem;
  rt.cur = nullptr;
  rt.launcher = pthread_self();
  install_handlers();
  rt.in_launch = true;
  if (sigsetjmp(rt.jmp, 1) == 0) {
    for (unsigned z = 0; z < g.z && code == kOk; ++z)
      for (unsigned y = 0; y < g.y && code == kOk; ++y)
        for (unsigned x = 0; x < g.x && code == kOk; ++x) {
          rt.block_idx = uint3{x, y, z};
          poison_shared_memory();
          if (!run_block() || !check_shared_tail()) {
            code = rt.error != kOk ? rt.error : kErrInternal;
            break;
          }
          ++rt.stats.blocks;
          rt.stats.threads += nthreads;
        }
  } else {
    code = rt.error != kOk ? rt.error : kErrInternal;
  }
  rt.in_launch = false;
  rt.cur = nullptr;
  remove_handlers();
  return finish(code);
}
}  // extern "C"

#endif  // NNFAST_CUDA_HOST_EMULATION_H
