// host_shim.h: lets a caffelite kernel file (caffelite/kernels/*.cu) compile with g++
// for the CPU, so that every kernel can be tested where there is no GPU.
//
//     g++ -O2 -shared -fPIC -ffp-contract=off -include host_shim.h -x c++ driver.cpp
//
// The test driver (caffelite/kernels/host.py) runs a launch sequentially: for every block,
// for every thread, it sets blockIdx/threadIdx and calls the kernel, which walks its
// grid-stride loop. Such kernels use no __syncthreads and no shared memory, and
// scatters go through atomicAdd, which here is a plain read-modify-write (only one
// "thread" runs at a time). Only 1-D launches are used (the .y/.z fields are 1).
//
// Block-cooperative kernels (a module whose source calls __syncthreads: the tiled
// tensor-core convolution) run each block's threads as fibers instead (run_block
// below): a thread runs until it reaches a barrier, and the barrier lets the threads
// it waits for go on only when all of them have arrived. __shared__ arrays are one
// per kernel instantiation and OS thread, which is one per block since blocks run one
// after another. Warp-level tensor-core operations (mma_m16n8k8_tf32) are emulated
// with the fragment layouts of the PTX ISA and a barrier over the warp's 32 lanes.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is a GNU keyword already.

struct dim3 {
  unsigned int x, y, z;
};

// One launch runs at a time per library; thread_local keeps two Python threads that
// call kernels of the same library from seeing each other's indices.
static thread_local dim3 threadIdx = {0, 0, 0};
static thread_local dim3 blockIdx = {0, 0, 0};
static thread_local dim3 blockDim = {1, 1, 1};
static thread_local dim3 gridDim = {1, 1, 1};

// CUDA's device maths are overloaded for float and double in the global namespace;
// <cmath> puts the float overloads in std:: only (a bare exp(float) would run the
// double version and round, which is not what the device does).
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::log;
using std::max;
using std::min;
using std::sqrt;

// The multiprocessor's cycle counter: here one tick per read, so a kernel that waits for
// N cycles (timing.cu) reads it N + 1 times.
inline long long clock64() {
  static thread_local long long ticks = 0;
  return ++ticks;
}

// Atomics: the host driver runs one thread at a time, so a plain update is exact.
// Like CUDA's, each returns the old value.
inline float atomicAdd(float* address, float value) {
  float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  double old = *address;
  *address = old + value;
  return old;
}

inline int atomicAdd(int* address, int value) {
  int old = *address;
  *address = old + value;
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  unsigned long long old = *address;
  *address = old + value;
  return old;
}

inline int atomicMin(int* address, int value) {
  int old = *address;
  *address = std::min(old, value);
  return old;
}

inline int atomicMax(int* address, int value) {
  int old = *address;
  *address = std::max(old, value);
  return old;
}

// Round-toward-zero float -> int conversion (what static_cast<int> does on both sides).
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __double2int_rz(double x) { return static_cast<int>(x); }

// ---------------------------------------------------------------- block-cooperative runs
namespace caffelite_host {

enum class Wait { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  Wait wait;
  int site;     // which barrier it waits at (__syncthreads: its line)
};

struct BlockRun {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  unsigned current;
  void (*body)(void*);
  void* argument;
};

static thread_local BlockRun* block_run = nullptr;
static thread_local std::vector<char> fiber_stacks;
static const size_t kFiberStack = 128 * 1024;

inline void fiber_main() {
  BlockRun* run = block_run;
  run->body(run->argument);
  run->fibers[run->current].wait = Wait::kDone;   // returning resumes the scheduler
}

inline void wait_at(Wait wait, int site, const char* what) {
  BlockRun* run = block_run;
  if (run == nullptr) {
    std::fprintf(stderr, "caffelite host kernels: %s outside a block-cooperative launch\n",
                 what);
    std::abort();
  }
  Fiber& self = run->fibers[run->current];
  self.wait = wait;
  self.site = site;
  swapcontext(&self.context, &run->scheduler);
}

inline void sync_threads(int line) { wait_at(Wait::kBlockBarrier, line, "__syncthreads"); }
inline void sync_warp(int site) {
  wait_at(Wait::kWarpBarrier, site, "a warp-level operation");
}

[[noreturn]] inline void misuse(const char* what) {
  std::fprintf(stderr, "caffelite host kernels: block %u: %s\n", blockIdx.x, what);
  std::abort();
}

// Lets the waiting threads go on that may: a warp whose 32 lanes all wait at the same
// warp-level operation (mma.sync is undefined with exited lanes: that aborts); else
// every thread, if all live threads wait at the same __syncthreads (exited threads
// count as arrived, as on Volta and later). False if nothing may go on (a barrier some
// threads never reach). Threads waiting at different barriers abort: divergent
// barriers are undefined on a GPU.
inline bool release(std::vector<Fiber>& fibers) {
  bool released = false;
  const size_t count = fibers.size();
  for (size_t w = 0; w < count; w += 32) {
    const size_t end = std::min(count, w + 32);
    size_t waiting = 0, done = 0;
    for (size_t i = w; i < end; ++i) {
      waiting += fibers[i].wait == Wait::kWarpBarrier;
      done += fibers[i].wait == Wait::kDone;
    }
    if (waiting == 0) continue;
    if (done > 0) misuse("a warp-level operation with exited lanes");
    if (waiting < end - w) continue;
    for (size_t i = w; i < end; ++i)
      if (fibers[i].site != fibers[w].site) misuse("lanes at different warp operations");
    for (size_t i = w; i < end; ++i) fibers[i].wait = Wait::kRunnable;
    released = true;
  }
  if (released) return true;
  int site = 0;
  bool first = true;
  for (const Fiber& f : fibers) {
    if (f.wait == Wait::kDone) continue;
    if (f.wait != Wait::kBlockBarrier) return false;
    if (!first && f.site != site) misuse("threads at different __syncthreads");
    site = f.site;
    first = false;
  }
  for (Fiber& f : fibers)
    if (f.wait == Wait::kBlockBarrier) f.wait = Wait::kRunnable;
  return true;
}

// CAFFELITE_HOST_FIBER_ORDER=reverse runs a block's threads from the last to the first
// between barriers (a race that one order hides may show in the other).
inline bool reverse_order() {
  const char* order = std::getenv("CAFFELITE_HOST_FIBER_ORDER");
  return order != nullptr && std::strcmp(order, "reverse") == 0;
}

// Runs body(argument) once per thread of the current block (blockIdx, blockDim set).
inline void run_block(void (*body)(void*), void* argument) {
  const unsigned threads = blockDim.x;
  fiber_stacks.resize(static_cast<size_t>(threads) * kFiberStack);
  BlockRun run;
  run.fibers.resize(threads);
  run.body = body;
  run.argument = argument;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = run.fibers[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = fiber_stacks.data() + static_cast<size_t>(t) * kFiberStack;
    f.context.uc_stack.ss_size = kFiberStack;
    f.context.uc_link = &run.scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.wait = Wait::kRunnable;
    f.site = 0;
  }
  BlockRun* outer = block_run;
  block_run = &run;
  const bool reverse = reverse_order();
  for (;;) {
    bool alive = false;
    for (unsigned i = 0; i < threads; ++i) {
      const unsigned t = reverse ? threads - 1 - i : i;
      if (run.fibers[t].wait != Wait::kRunnable) continue;
      run.current = t;
      threadIdx.x = t;
      swapcontext(&run.scheduler, &run.fibers[t].context);
    }
    for (const Fiber& f : run.fibers) alive = alive || f.wait != Wait::kDone;
    if (!alive) break;
    if (!release(run.fibers)) {
      std::fprintf(stderr, "caffelite host kernels: block %u deadlocked (a barrier that "
                   "not every thread reaches)\n", blockIdx.x);
      std::abort();
    }
  }
  block_run = outer;
}

// ---------------------------------------------------------------- tensor-core emulation
// TF32 as cvt.rna.tf32.f32 makes it: the float rounded to 10 mantissa bits, to nearest
// with ties away from zero (adding half of the dropped range to the magnitude bits);
// infinities and NaN stay what they are.
inline float round_tf32(float x) {
  unsigned bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

struct WarpFragments {
  float a[32][4];
  float b[32][2];
};

static thread_local WarpFragments warp_fragments[32];

// d = a * b + c for one warp: A 16x8 (row), B 8x8 (col), C/D 16x8, each lane holding
// the elements the PTX ISA gives it (groupID g = lane / 4, t = lane % 4): a0 (g, t),
// a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (t, g), b1 (t+4, g); c0..c3 (g, 2t),
// (g, 2t+1), (g+8, 2t), (g+8, 2t+1). Products are summed over k in order, in float.
inline void mma_m16n8k8_tf32(float d[4], const float a[4], const float b[2],
                             const float c[4]) {
  const unsigned lane = threadIdx.x % 32;
  WarpFragments& f = warp_fragments[threadIdx.x / 32];
  for (int i = 0; i < 4; ++i) f.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) f.b[lane][i] = b[i];
  sync_warp(1);
  const unsigned g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float sum = c[i];
    for (unsigned k = 0; k < 8; ++k) {
      const float av = f.a[(row % 8) * 4 + k % 4][(k >= 4 ? 2 : 0) + (row >= 8 ? 1 : 0)];
      const float bv = f.b[col * 4 + k % 4][k >= 4 ? 1 : 0];
      sum += av * bv;
    }
    out[i] = sum;
  }
  sync_warp(2);   // every lane has read the fragments before any lane writes new ones
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace caffelite_host

#define __syncthreads() caffelite_host::sync_threads(__LINE__)
