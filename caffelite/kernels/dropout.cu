// Dropout's training forward in one pass: draws the keep mask from a counter-based
// generator and writes mask and output together (mirrors caffelite/layers/neuron.py).
//
// The generator is Philox4x64-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011), the bit generator numpy's np.random.Philox implements,
// against which the tests check it. Its key and 128-bit counter live in device memory
// (state[0..1] the key, state[2..3] the counter, low word first), and philox_advance
// moves the counter past the blocks a forward used. A CUDA graph that recorded both
// kernels therefore draws new masks at every launch.
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// High and low 64 bits of a * b, from 32-bit halves (the same code on both compilers).
__device__ inline unsigned long long philox_mulhilo(const unsigned long long a,
                                                    const unsigned long long b,
                                                    unsigned long long* hi) {
  const unsigned long long a_lo = a & 0xFFFFFFFFULL, a_hi = a >> 32;
  const unsigned long long b_lo = b & 0xFFFFFFFFULL, b_hi = b >> 32;
  const unsigned long long lo_lo = a_lo * b_lo;
  const unsigned long long hi_lo = a_hi * b_lo;
  const unsigned long long lo_hi = a_lo * b_hi;
  const unsigned long long cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFULL) + lo_hi;
  *hi = a_hi * b_hi + (hi_lo >> 32) + (cross >> 32);
  return a * b;
}

// Philox4x64 with 10 rounds: the four 64-bit words for counter ctr under key (k0, k1).
__device__ inline void philox4x64_10(unsigned long long c0, unsigned long long c1,
                                     unsigned long long c2, unsigned long long c3,
                                     unsigned long long k0, unsigned long long k1,
                                     unsigned long long* out) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B97F4A7C15ULL;
      k1 += 0xBB67AE8584CAA73BULL;
    }
    unsigned long long hi0, hi1;
    const unsigned long long lo0 = philox_mulhilo(0xD2E7470EE14C6C93ULL, c0, &hi0);
    const unsigned long long lo1 = philox_mulhilo(0xCA5A826395121157ULL, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Block b (elements 4b .. 4b+3) uses the words of counter state + b + 1 (numpy's
// Philox also increments before it generates). An element is kept when the high 32
// bits of its word exceed threshold (Caffe's rule: rand_uint > UINT_MAX * ratio):
// mask = 1 or 0, y = (x * mask) * scale. n: the blocks, ceil(count / 4). In place
// (y == x) is fine: each element is read before it is written, by one thread.
template <typename T>
__global__ void dropout_forward(const int n, const int count, const T* x,
                                const unsigned long long* state,
                                const unsigned long long threshold, const T scale,
                                T* mask, T* y) {
  const unsigned long long k0 = state[0], k1 = state[1];
  const unsigned long long c0 = state[2], c1 = state[3];
  CAFFELITE_KERNEL_LOOP(b, n) {
    const unsigned long long lo = c0 + static_cast<unsigned long long>(b) + 1ULL;
    const unsigned long long hi = c1 + (lo < c0 ? 1ULL : 0ULL);
    unsigned long long words[4];
    philox4x64_10(lo, hi, 0ULL, 0ULL, k0, k1, words);
    for (int lane = 0; lane < 4; ++lane) {
      const int i = 4 * b + lane;
      if (i >= count) break;
      const T m = (words[lane] >> 32) > threshold ? T(1) : T(0);
      mask[i] = m;
      y[i] = (x[i] * m) * scale;
    }
  }
}

// The counter moves past the blocks one forward used (one thread; n = 1). T is unused.
template <typename T>
__global__ void philox_advance(const int n, unsigned long long* state,
                               const unsigned long long blocks) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const unsigned long long lo = state[2] + blocks;
    state[3] += lo < state[2] ? 1ULL : 0ULL;
    state[2] = lo;
  }
}
