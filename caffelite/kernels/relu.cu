// ReLU forward and backward in one pass each (CuPy's where() would need a comparison
// temporary and a copy; mirrors caffelite/layers/neuron.py).
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// ReLU forward as the fork's GPU kernel: y = x > 0 ? x : x * negative_slope, so with
// slope 0 a negative x gives -0, -inf and NaN give NaN. x and y may be the same array.
template <typename T>
__global__ void relu_forward(const int n, const T* x, const T negative_slope, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T v = x[i];
    y[i] = v > T(0) ? v : v * negative_slope;
  }
}

// ReLU backward as the fork's: dx = dy * ((x > 0) + (x <= 0) * negative_slope), so a
// NaN x gives dy * 0 and an infinite dy times the factor 0 gives NaN. x is the bottom
// data, or the top data of an in-place ReLU (same sign for slope >= 0); dy and dx may be
// the same array.
template <typename T>
__global__ void relu_backward(const int n, const T* __restrict__ x, const T* dy,
                              const T negative_slope, T* dx) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T v = x[i];
    dx[i] = dy[i] * (T(v > T(0)) + T(v <= T(0)) * negative_slope);
  }
}
