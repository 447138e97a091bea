// ReLU backward in one pass (CuPy's where() would need a comparison temporary and a
// copy; mirrors caffelite/layers/neuron.py).
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// ReLU backward: dx = dy where x > 0, else dy * negative_slope (exactly 0 for slope 0,
// as the numpy layer's where(x > 0, dy, 0)). x is the bottom data, or the top data of an
// in-place ReLU (same sign for slope >= 0); dy and dx may be the same array.
template <typename T>
__global__ void relu_backward(const int n, const T* __restrict__ x, const T* dy,
                              const T negative_slope, T* dx) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T g = dy[i];
    dx[i] = x[i] > T(0) ? g : (negative_slope == T(0) ? T(0) : g * negative_slope);
  }
}
