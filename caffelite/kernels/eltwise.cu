// Eltwise MAX with the argmax mask, forward and backward (Caffe's eltwise_layer.cu;
// mirrors caffelite/layers/eltwise.py and spec section 9).
//
// Forward runs once per later bottom i = 1, 2, ...: first
//     eltwise_max_forward(n, x0, x1, 1, ties_to_later, top, mask)
// then, for i >= 2, eltwise_max_forward(n, top, x_i, i, ties_to_later, top, mask).
// Bottoms 0 and 1: x0 wins only when strictly greater (a tie goes to bottom 1), in
// both of Caffe's implementations. For i >= 2 the implementations differ:
//   ties_to_later = 1: Caffe's GPU rule (what DeepLab trained with): bottom i takes over
//                      unless the running max is strictly greater (a tie -> bottom i);
//   ties_to_later = 0: Caffe's CPU rule (caffelite's numpy layer): bottom i takes over
//                      only when strictly greater (a tie stays with the earlier bottom).
// They also differ for NaN: the GPU rule lets a NaN bottom i >= 2 win, the CPU rule not.
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// `running` and `top` are the same array for i >= 2 (no __restrict__ on them).
template <typename T>
__global__ void eltwise_max_forward(const int n, const T* running, const T* __restrict__ x,
                                    const int bottom_index, const int ties_to_later, T* top,
                                    int* __restrict__ mask) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const T a = running[index];
    const T b = x[index];
    if (bottom_index == 1) {
      const bool first = a > b;
      top[index] = first ? a : b;
      mask[index] = first ? 0 : 1;
    } else {
      const bool take = ties_to_later ? !(a > b) : (b > a);
      if (take) {
        top[index] = b;
        mask[index] = bottom_index;
      }
    }
  }
}

// Eltwise SUM of two bottoms as Caffe computes it into a zeroed top, (0 + a) + b, in
// one pass: the same value as a + b except that -0 + -0 gives +0.
template <typename T>
__global__ void eltwise_sum2(const int n, const T* __restrict__ a, const T* __restrict__ b,
                             T* __restrict__ top) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    top[index] = (T(0) + a[index]) + b[index];
  }
}

// bottom_diff of bottom `bottom_index` = top_diff where it won, else 0; added to a
// zero as Caffe does, so a -0 top_diff gives +0.
template <typename T>
__global__ void eltwise_max_backward(const int n, const T* __restrict__ top_diff,
                                     const int* __restrict__ mask, const int bottom_index,
                                     T* __restrict__ bottom_diff) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    bottom_diff[index] = (mask[index] == bottom_index) ? T(0) + top_diff[index] : T(0);
  }
}
