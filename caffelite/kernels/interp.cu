// DeepLab's Interp: align-corners bilinear resampling of N*C planes (the fork's
// util/interp.cu; mirrors caffelite/layers/interp.py and spec section 2).
//
// The input region is rows [y_offset, y_offset + h1) and columns [x_offset, x_offset + w1)
// of each height_in x width_in plane (Interp's crop: both offsets are -pad_beg, h1/w1 the
// effective size); the output planes are h2 x w2. Coordinates are float32 for every T,
// as in the C++: r = (h1-1)/(h2-1) (0 when h2 == 1), y = r*i, y0 = trunc(y),
// dy = y - y0, no second row at the last input row. Same size = plain copy.
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// Source row/column, step to the second one (0 at the border) and the two weights.
template <typename T>
__device__ __forceinline__ void interp_coordinate(const int i, const float ratio,
                                                  const int size_in, int* i0, int* step,
                                                  T* lambda0, T* lambda1) {
  const float pos = ratio * i;
  *i0 = static_cast<int>(pos);
  *step = (*i0 < size_in - 1) ? 1 : 0;
  *lambda1 = pos - *i0;
  *lambda0 = T(1) - *lambda1;
}

// n = planes * h2 * w2.
template <typename T>
__global__ void interp_forward(const int n, const T* __restrict__ in, const int y_offset,
                               const int x_offset, const int h1, const int w1,
                               const int height_in, const int width_in,
                               T* __restrict__ out, const int h2, const int w2) {
  const float rh = (h2 > 1) ? static_cast<float>(h1 - 1) / (h2 - 1) : 0.f;
  const float rw = (w2 > 1) ? static_cast<float>(w1 - 1) / (w2 - 1) : 0.f;
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int x2 = index % w2;
    const int y2 = (index / w2) % h2;
    const int plane = index / (w2 * h2);
    const T* src = in + (plane * height_in + y_offset) * width_in + x_offset;
    if (h1 == h2 && w1 == w2) {
      out[index] = src[y2 * width_in + x2];
      continue;
    }
    int y0, dy, x0, dx;
    T ly0, ly1, lx0, lx1;
    interp_coordinate<T>(y2, rh, h1, &y0, &dy, &ly0, &ly1);
    interp_coordinate<T>(x2, rw, w1, &x0, &dx, &lx0, &lx1);
    const T* p = src + y0 * width_in + x0;
    const int down = dy * width_in;
    out[index] = ly0 * (lx0 * p[0] + lx1 * p[dx]) + ly1 * (lx0 * p[down] + lx1 * p[down + dx]);
  }
}

// The adjoint: every output gradient is added to its (up to) four source pixels with the
// same weights, by atomicAdd. ACCUMULATES into in_diff: the caller zeroes it first
// (Caffe does too), which also leaves cropped-away pixels at 0. n = planes * h2 * w2.
template <typename T>
__global__ void interp_backward(const int n, T* in_diff, const int y_offset,
                                const int x_offset, const int h1, const int w1,
                                const int height_in, const int width_in,
                                const T* __restrict__ out_diff, const int h2, const int w2) {
  const float rh = (h2 > 1) ? static_cast<float>(h1 - 1) / (h2 - 1) : 0.f;
  const float rw = (w2 > 1) ? static_cast<float>(w1 - 1) / (w2 - 1) : 0.f;
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int x2 = index % w2;
    const int y2 = (index / w2) % h2;
    const int plane = index / (w2 * h2);
    T* dst = in_diff + (plane * height_in + y_offset) * width_in + x_offset;
    const T g = out_diff[index];
    if (h1 == h2 && w1 == w2) {
      atomicAdd(dst + y2 * width_in + x2, g);
      continue;
    }
    int y0, dy, x0, dx;
    T ly0, ly1, lx0, lx1;
    interp_coordinate<T>(y2, rh, h1, &y0, &dy, &ly0, &ly1);
    interp_coordinate<T>(x2, rw, w1, &x0, &dx, &lx0, &lx1);
    T* p = dst + y0 * width_in + x0;
    const int down = dy * width_in;
    atomicAdd(p, ly0 * lx0 * g);
    atomicAdd(p + dx, ly0 * lx1 * g);
    atomicAdd(p + down, ly1 * lx0 * g);
    atomicAdd(p + down + dx, ly1 * lx1 * g);
  }
}
