// Softmax over the channel axis, and SoftmaxWithLoss forward/backward (BVLC's
// softmax_layer.cu and softmax_loss_layer.cu; mirrors caffelite/layers/softmax.py and
// spec section 6).
//
// Blobs are viewed as (outer, channels, inner) around the softmax axis; element
// (o, c, s) is at (o*channels + c)*inner + s, and one thread handles one (o, s) position,
// looping over the channels in order (Caffe's channel max / sum / dot kernels do the
// same per position). Labels: one per (o, s) position, at o*inner + s, truncated to int
// (NaN, +-inf and values beyond int are out of range, see int_label).
// The loss kernels write per-position values; the caller sums them (a CuPy reduction;
// Caffe uses caffe_gpu_asum), so no kernel needs a block reduction.
//
// Every kernel's first parameter is the element count of its grid-stride loop:
// n = outer * inner for all of them.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif
#ifndef FLT_MIN
#define FLT_MIN 1.175494351e-38F
#endif

// The float functions for float, the double ones for double (spelled out: a bare exp()
// on a float is not overloaded the same way in every toolchain).
__device__ __forceinline__ float exp_t(const float x) { return expf(x); }
__device__ __forceinline__ double exp_t(const double x) { return exp(x); }
__device__ __forceinline__ float log_t(const float x) { return logf(x); }
__device__ __forceinline__ double log_t(const double x) { return log(x); }

// The int label of a float label (truncated), or -1 and false for NaN, +-inf and values
// outside int's range: static_cast<int> of those is undefined behaviour in C++, and a
// GPU turns NaN into 0, a silent class-0 label. The numpy layers' astype(int64) makes
// them out-of-range labels, and so does the caller here: they match no ignore label.
template <typename T>
__device__ __forceinline__ bool int_label(const T value, int* label) {
  const bool representable = value >= T(-2147483648.0) && value < T(2147483648.0);
  *label = representable ? static_cast<int>(value) : -1;
  return representable;
}

// prob = exp(x - max_c x) / sum_c exp(x - max_c x); may run in place (prob == x).
template <typename T>
__global__ void softmax_forward(const int n, const T* x, const int channels, const int inner,
                                T* prob) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int base = (index / inner) * channels * inner + index % inner;
    T maxval = x[base];
    for (int c = 1; c < channels; ++c) {
      const T v = x[base + c * inner];
      if (v > maxval) maxval = v;
    }
    T sum = T(0);
    for (int c = 0; c < channels; ++c) {
      const T e = exp_t(x[base + c * inner] - maxval);
      prob[base + c * inner] = e;
      sum += e;
    }
    for (int c = 0; c < channels; ++c) {
      prob[base + c * inner] = prob[base + c * inner] / sum;
    }
  }
}

// Softmax's backward: dx = (dy - sum_c dy*y) * y; may run in place (bottom_diff == top_diff).
template <typename T>
__global__ void softmax_backward(const int n, const T* top_data, const T* top_diff,
                                 const int channels, const int inner, T* bottom_diff) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int base = (index / inner) * channels * inner + index % inner;
    T dot = T(0);
    for (int c = 0; c < channels; ++c) {
      dot += top_diff[base + c * inner] * top_data[base + c * inner];
    }
    for (int c = 0; c < channels; ++c) {
      const int k = base + c * inner;
      bottom_diff[k] = (top_diff[k] - dot) * top_data[k];
    }
  }
}

// Per-position loss -log(fmax(p[label], FLT_MIN)) and count (1 = counted, 0 = ignored).
// A label outside [0, channels) that is not the ignore label gives a NaN loss (Caffe
// reads out of bounds there): the caller sees a NaN total and reports the bad label.
template <typename T>
__global__ void softmax_loss_forward(const int n, const T* __restrict__ prob,
                                     const T* __restrict__ label, const int channels,
                                     const int inner, const int has_ignore_label,
                                     const int ignore_label, T* __restrict__ loss,
                                     T* __restrict__ counts) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    int l;
    const bool integer = int_label(label[index], &l);
    if (integer && has_ignore_label && l == ignore_label) {
      loss[index] = T(0);
      counts[index] = T(0);
    } else if (l < 0 || l >= channels) {
      const T zero = T(0);
      loss[index] = zero / zero;
      counts[index] = T(1);
    } else {
      const int o = index / inner;
      const T p = prob[(o * channels + l) * inner + index % inner];
      // The fork's GPU max is CUDA's fmax, which gives FLT_MIN for a NaN probability:
      // the 87.3365 (-log FLT_MIN) per position of a diverged net's GPU log.
      loss[index] = -log_t(p >= T(FLT_MIN) ? p : T(FLT_MIN));
      counts[index] = T(1);
    }
  }
}

// bottom_diff = (p - onehot(label)) * scale, 0 * scale at ignored positions (the fork
// zeroes them, then scales the whole diff with cuBLAS); scale is
// loss_diff[0] / normalizer in T (loss_diff: the loss top's diff, i.e. the loss weight,
// read here on the device so the caller needs no device-to-host copy).
template <typename T>
__global__ void softmax_loss_backward(const int n, const T* __restrict__ prob,
                                      const T* __restrict__ label, const int channels,
                                      const int inner, const int has_ignore_label,
                                      const int ignore_label,
                                      const T* __restrict__ loss_diff,
                                      const T* __restrict__ normalizer,
                                      T* __restrict__ bottom_diff) {
  const T scale = loss_diff[0] / normalizer[0];
  CAFFELITE_KERNEL_LOOP(index, n) {
    int l;
    const bool integer = int_label(label[index], &l);
    const int base = (index / inner) * channels * inner + index % inner;
    const bool ignored = integer && has_ignore_label && l == ignore_label;
    for (int c = 0; c < channels; ++c) {
      const int k = base + c * inner;
      bottom_diff[k] = (ignored ? T(0) : prob[k] - (c == l ? T(1) : T(0))) * scale;
    }
  }
}
