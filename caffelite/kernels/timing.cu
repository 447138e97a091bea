// Keeps the GPU busy for a given number of clock cycles, so that the host can queue the
// work to be timed behind it: CUDA events around that work then measure its device time
// alone, without the host's launch overhead (caffelite/layers/conv_autotune.py times a
// convolution's paths for CUDA graphs, which have none).
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// Each of the n threads spins for `cycles` of its multiprocessor's clock, then writes 1.
template <typename T>
__global__ void hold_device(const int n, const int cycles, T* done) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
    done[i] = T(1);
  }
}
