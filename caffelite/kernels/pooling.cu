// 2-D MAX and AVE pooling, forward and backward (Caffe's pooling_layer.cu; mirrors
// caffelite/layers/pooling.py and spec section 8).
//
// Arrays are planes of N*C: bottom planes are height x width, top planes pooled_h x
// pooled_w (the caller computes Caffe's ceil-mode pooled sizes). Window (ph, pw) starts
// at (ph*stride_h - pad_h, pw*stride_w - pad_w).
//   MAX: the window is clipped to [0, height) x [0, width); the scan starts from
//        -FLT_MAX and keeps the FIRST strictly greater value in row-major order, so
//        padding, NaN and -inf never win; mask = h*width + w of the winner, -1 if none.
//   AVE: sum over the window clipped to the image, divided by the window's area clipped
//        to [-pad, size + pad) (padding counts, the ceil overhang does not).
// Backward kernels are gathers (one thread per bottom pixel, windows in (ph, pw) order,
// which is also the order caffelite's numpy scatter adds them): no atomics.
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif
#ifndef FLT_MAX
#define FLT_MAX 3.402823466e+38F
#endif

// n = planes * pooled_h * pooled_w.
template <typename T>
__global__ void max_pool_forward(const int n, const T* __restrict__ bottom, const int height,
                                 const int width, const int pooled_h, const int pooled_w,
                                 const int kernel_h, const int kernel_w, const int stride_h,
                                 const int stride_w, const int pad_h, const int pad_w,
                                 T* __restrict__ top, int* __restrict__ mask) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int pw = index % pooled_w;
    const int ph = (index / pooled_w) % pooled_h;
    const int plane = index / (pooled_w * pooled_h);
    int hstart = ph * stride_h - pad_h;
    int wstart = pw * stride_w - pad_w;
    const int hend = min(hstart + kernel_h, height);
    const int wend = min(wstart + kernel_w, width);
    hstart = max(hstart, 0);
    wstart = max(wstart, 0);
    T maxval = T(-FLT_MAX);
    int maxidx = -1;
    const T* src = bottom + plane * height * width;
    for (int h = hstart; h < hend; ++h) {
      for (int w = wstart; w < wend; ++w) {
        if (src[h * width + w] > maxval) {
          maxidx = h * width + w;
          maxval = src[maxidx];
        }
      }
    }
    top[index] = maxval;
    mask[index] = maxidx;
  }
}

// n = planes * height * width (bottom pixels).
template <typename T>
__global__ void max_pool_backward(const int n, const T* __restrict__ top_diff,
                                  const int* __restrict__ mask, const int height,
                                  const int width, const int pooled_h, const int pooled_w,
                                  const int kernel_h, const int kernel_w, const int stride_h,
                                  const int stride_w, const int pad_h, const int pad_w,
                                  T* __restrict__ bottom_diff) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int w = index % width;
    const int h = (index / width) % height;
    const int plane = index / (width * height);
    const int phstart = (h + pad_h < kernel_h) ? 0 : (h + pad_h - kernel_h) / stride_h + 1;
    const int phend = min((h + pad_h) / stride_h + 1, pooled_h);
    const int pwstart = (w + pad_w < kernel_w) ? 0 : (w + pad_w - kernel_w) / stride_w + 1;
    const int pwend = min((w + pad_w) / stride_w + 1, pooled_w);
    const int offset = plane * pooled_h * pooled_w;
    const int self = h * width + w;
    T gradient = T(0);
    for (int ph = phstart; ph < phend; ++ph) {
      for (int pw = pwstart; pw < pwend; ++pw) {
        if (mask[offset + ph * pooled_w + pw] == self) {
          gradient += top_diff[offset + ph * pooled_w + pw];
        }
      }
    }
    bottom_diff[index] = gradient;
  }
}

// n = planes * pooled_h * pooled_w.
template <typename T>
__global__ void ave_pool_forward(const int n, const T* __restrict__ bottom, const int height,
                                 const int width, const int pooled_h, const int pooled_w,
                                 const int kernel_h, const int kernel_w, const int stride_h,
                                 const int stride_w, const int pad_h, const int pad_w,
                                 T* __restrict__ top) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int pw = index % pooled_w;
    const int ph = (index / pooled_w) % pooled_h;
    const int plane = index / (pooled_w * pooled_h);
    int hstart = ph * stride_h - pad_h;
    int wstart = pw * stride_w - pad_w;
    int hend = min(hstart + kernel_h, height + pad_h);
    int wend = min(wstart + kernel_w, width + pad_w);
    const int pool_size = (hend - hstart) * (wend - wstart);
    hstart = max(hstart, 0);
    wstart = max(wstart, 0);
    hend = min(hend, height);
    wend = min(wend, width);
    T aveval = T(0);
    const T* src = bottom + plane * height * width;
    for (int h = hstart; h < hend; ++h) {
      for (int w = wstart; w < wend; ++w) {
        aveval += src[h * width + w];
      }
    }
    top[index] = aveval / T(pool_size);
  }
}

// n = planes * height * width (bottom pixels).
template <typename T>
__global__ void ave_pool_backward(const int n, const T* __restrict__ top_diff,
                                  const int height, const int width, const int pooled_h,
                                  const int pooled_w, const int kernel_h, const int kernel_w,
                                  const int stride_h, const int stride_w, const int pad_h,
                                  const int pad_w, T* __restrict__ bottom_diff) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    // Coordinates in the padded frame.
    const int w = index % width + pad_w;
    const int h = (index / width) % height + pad_h;
    const int plane = index / (width * height);
    const int phstart = (h < kernel_h) ? 0 : (h - kernel_h) / stride_h + 1;
    const int phend = min(h / stride_h + 1, pooled_h);
    const int pwstart = (w < kernel_w) ? 0 : (w - kernel_w) / stride_w + 1;
    const int pwend = min(w / stride_w + 1, pooled_w);
    const T* src = top_diff + plane * pooled_h * pooled_w;
    T gradient = T(0);
    for (int ph = phstart; ph < phend; ++ph) {
      for (int pw = pwstart; pw < pwend; ++pw) {
        const int hstart = ph * stride_h - pad_h;
        const int wstart = pw * stride_w - pad_w;
        const int hend = min(hstart + kernel_h, height + pad_h);
        const int wend = min(wstart + kernel_w, width + pad_w);
        const int pool_size = (hend - hstart) * (wend - wstart);
        gradient += src[ph * pooled_w + pw] / T(pool_size);
      }
    }
    bottom_diff[index] = gradient;
  }
}
