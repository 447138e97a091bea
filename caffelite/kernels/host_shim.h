// host_shim.h: lets a caffelite kernel file (caffelite/kernels/*.cu) compile with g++
// for the CPU, so that every kernel can be tested where there is no GPU.
//
//     g++ -O2 -shared -fPIC -ffp-contract=off -include host_shim.h -x c++ driver.cpp
//
// The test driver (caffelite/kernels/host.py) runs a launch sequentially: for every block,
// for every thread, it sets blockIdx/threadIdx and calls the kernel, which walks its
// grid-stride loop. Kernels therefore must not use __syncthreads or shared memory,
// and scatters go through atomicAdd, which here is a plain read-modify-write (only
// one "thread" runs at a time). Only 1-D launches are used (the .y/.z fields are 1).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
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
