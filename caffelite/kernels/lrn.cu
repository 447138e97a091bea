// LRN ACROSS_CHANNELS in the fork's GPU arithmetic (caffelite/layers/lrn.py). One thread
// per (image, pixel) walks the channels with one running window sum: the entering
// channel's term is added, then the leaving one's subtracted, and the value is stored
// for the window's centre channel. So, as in the fork, once a term overflows to Inf the
// sum stays Inf - Inf = NaN for every later channel of that pixel. `after` is the
// window's reach past its centre, (size - 1) - (size - 1) / 2.
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

__device__ __forceinline__ float pow_t(const float x, const float y) { return powf(x, y); }
__device__ __forceinline__ double pow_t(const double x, const double y) { return pow(x, y); }

// scale[c] = k + alpha_over_size * (running sum of x^2 over the window of c);
// n = num * plane (plane = height * width).
template <typename T>
__global__ void lrn_fill_scale(const int n, const T* __restrict__ x, const int channels,
                               const int plane, const int size, const T alpha_over_size,
                               const T k, T* __restrict__ scale) {
  const int after = (size - 1) - (size - 1) / 2;
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int img = index / plane;
    const int base = img * channels * plane + (index - img * plane);
    const T* xs = x + base;
    T* out = scale + base;
    T sum = T(0);
    for (int head = 0; head < channels + after; ++head) {
      if (head < channels) sum += xs[head * plane] * xs[head * plane];
      if (head >= size) sum -= xs[(head - size) * plane] * xs[(head - size) * plane];
      if (head >= after) out[(head - after) * plane] = k + sum * alpha_over_size;
    }
  }
}

// y = x * scale^negative_beta; n = count.
template <typename T>
__global__ void lrn_output(const int n, const T* __restrict__ x, const T* __restrict__ scale,
                           const T negative_beta, T* __restrict__ y) {
  CAFFELITE_KERNEL_LOOP(i, n) { y[i] = x[i] * pow_t(scale[i], negative_beta); }
}

// dx[c] = dy[c] * scale[c]^negative_beta - cache_ratio * x[c] * (running sum of
// dy * y / scale over the window of c); n = num * plane.
template <typename T>
__global__ void lrn_diff(const int n, const T* __restrict__ x, const T* __restrict__ y,
                         const T* __restrict__ scale, const T* __restrict__ dy,
                         const int channels, const int plane, const int size,
                         const T negative_beta, const T cache_ratio, T* __restrict__ dx) {
  const int after = (size - 1) - (size - 1) / 2;
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int img = index / plane;
    const int base = img * channels * plane + (index - img * plane);
    T sum = T(0);
    for (int head = 0; head < channels + after; ++head) {
      if (head < channels) {
        const int i = base + head * plane;
        sum += dy[i] * y[i] / scale[i];
      }
      if (head >= size) {
        const int i = base + (head - size) * plane;
        sum -= dy[i] * y[i] / scale[i];
      }
      if (head >= after) {
        const int i = base + (head - after) * plane;
        dx[i] = dy[i] * pow_t(scale[i], negative_beta) - cache_ratio * x[i] * sum;
      }
    }
  }
}
