// Per-channel elementwise maps of BatchNorm, Scale and Bias (one pass over the data
// instead of CuPy's broadcast temporaries; mirrors caffelite/layers/normalization.py).
//
// The data is viewed as (outer, channels, inner), the layers' `dims`: element i belongs
// to channel (i / inner) % channels. Each kernel does the numpy layer's float operations
// in the same order, so (NVRTC with --fmad=false) the results are the same bits.
// x and y may be the same array (in-place layers): no __restrict__ on them.
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// BatchNorm's stored statistics, n = channels: factor = 1 / scale[0] (0 where the scale
// factor is 0), mean[c] = factor * mean_sum[c], std[c] = sqrt(factor * var_sum[c] + eps).
// One launch instead of CuPy's chain of small ops (ResNet-101 runs 312 BatchNorm layers
// per pass, where each op's launch costs more than the arithmetic).
template <typename T>
__global__ void channel_stored_stats(const int n, const T* __restrict__ mean_sum,
                                     const T* __restrict__ var_sum,
                                     const T* __restrict__ scale, const T eps,
                                     T* __restrict__ mean, T* __restrict__ std) {
  CAFFELITE_KERNEL_LOOP(c, n) {
    const T stored = scale[0];
    const T factor = stored == T(0) ? T(0) : T(1) / stored;
    mean[c] = factor * mean_sum[c];
    std[c] = sqrt(factor * var_sum[c] + eps);
  }
}

// BatchNorm forward: y = (x - mean[c]) / std[c].
template <typename T>
__global__ void channel_normalize(const int n, const T* x, const T* __restrict__ mean,
                                  const T* __restrict__ std, const int channels,
                                  const int inner, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const int c = (i / inner) % channels;
    y[i] = (x[i] - mean[c]) / std[c];
  }
}

// BatchNorm backward with the stored statistics: dx = dy / std[c].
template <typename T>
__global__ void channel_divide(const int n, const T* x, const T* __restrict__ divisor,
                               const int channels, const int inner, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    y[i] = x[i] / divisor[(i / inner) % channels];
  }
}

// Scale forward (no bias) and Scale backward to the data: y = x * scale[c].
template <typename T>
__global__ void channel_scale(const int n, const T* x, const T* __restrict__ scale,
                              const int channels, const int inner, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    y[i] = x[i] * scale[(i / inner) % channels];
  }
}

// Scale forward with bias_term: y = x * scale[c] + bias[c].
template <typename T>
__global__ void channel_scale_bias(const int n, const T* x, const T* __restrict__ scale,
                                   const T* __restrict__ bias, const int channels,
                                   const int inner, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const int c = (i / inner) % channels;
    y[i] = x[i] * scale[c] + bias[c];
  }
}

// Bias forward: y = x + bias[c].
template <typename T>
__global__ void channel_bias(const int n, const T* x, const T* __restrict__ bias,
                             const int channels, const int inner, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    y[i] = x[i] + bias[(i / inner) % channels];
  }
}

// BatchNorm with stored statistics, then Scale (per channel), then optionally ReLU, all
// on one blob in place (ResNet's conv -> bn -> scale -> relu): one pass instead of three,
// each layer's float operations in its order, so the same bits as running the layers one
// after the other. has_bias: Scale's bias_term; relu: 1 when the chain ends in a ReLU.
// ReLU is the device ReLU layer's (the fork's GPU formula): v > 0 ? v : v * slope.
// x and y may be the same array.
template <typename T>
__global__ void channel_bn_scale_relu(const int n, const T* x, const T* __restrict__ mean,
                                      const T* __restrict__ std,
                                      const T* __restrict__ scale,
                                      const T* __restrict__ bias, const int has_bias,
                                      const int relu, const T negative_slope,
                                      const int channels, const int inner, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const int c = (i / inner) % channels;
    T v = (x[i] - mean[c]) / std[c];
    v = has_bias ? v * scale[c] + bias[c] : v * scale[c];
    if (relu) {
      v = v > T(0) ? v : v * negative_slope;
    }
    y[i] = v;
  }
}

// Its backward with frozen Scale parameters: ReLU's backward as the fork's,
// dy * ((y > 0) + (y <= 0) * slope) (reading the chain's output y, as an in-place ReLU
// does), then Scale's dx = dy * scale[c], then BatchNorm's dx = dy / std[c]. dy and dx
// may be the same array; y is read only when relu is 1.
template <typename T>
__global__ void channel_bn_scale_relu_backward(const int n, const T* y, const T* dy,
                                               const T* __restrict__ std,
                                               const T* __restrict__ scale,
                                               const int relu, const T negative_slope,
                                               const int channels, const int inner,
                                               T* dx) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const int c = (i / inner) % channels;
    T g = dy[i];
    if (relu) {
      const T v = y[i];
      g = g * (T(v > T(0)) + T(v <= T(0)) * negative_slope);
    }
    dx[i] = g * scale[c] / std[c];
  }
}
