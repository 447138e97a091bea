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

// The first output row (or column) whose taps may reach input row `target`: the first
// with i0 >= target - 1 (i0 is non-decreasing in the output index). The estimate is
// corrected both ways with the exact float32 coordinate, so it never decides the result.
__device__ __forceinline__ int interp_first_source(const int target, const float ratio,
                                                   const int size_out) {
  int i = ratio > 0.f ? static_cast<int>((target - 1) / ratio) : 0;
  i = i < 0 ? 0 : (i > size_out - 1 ? size_out - 1 : i);
  while (i > 0 && static_cast<int>(ratio * (i - 1)) >= target - 1) --i;
  while (i < size_out && static_cast<int>(ratio * i) < target - 1) ++i;
  return i;
}

// The adjoint, as a gather (no atomics: every run gives the same bits). One thread per
// element of in_diff, which it OVERWRITES: 0 outside the interpolated region (the
// crop), else the sum of its terms in the order the fork's caffe_cpu_interp2_backward
// adds them: outputs in row-major order, each output's taps (y0, x0), (y0, x1),
// (y1, x0), (y1, x1), each term (ly * lx) * g. So it equals caffelite's host backward
// bit for bit (border taps that hit one pixel twice included). Only outputs whose rows
// and columns start at or next to the pixel can reach it. n = planes * height_in *
// width_in.
template <typename T>
__global__ void interp_backward(const int n, T* __restrict__ in_diff, const int y_offset,
                                const int x_offset, const int h1, const int w1,
                                const int height_in, const int width_in,
                                const T* __restrict__ out_diff, const int h2, const int w2) {
  const float rh = (h2 > 1) ? static_cast<float>(h1 - 1) / (h2 - 1) : 0.f;
  const float rw = (w2 > 1) ? static_cast<float>(w1 - 1) / (w2 - 1) : 0.f;
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int yi = (index / width_in) % height_in - y_offset;
    const int xi = index % width_in - x_offset;
    const int plane = index / (width_in * height_in);
    if (yi < 0 || yi >= h1 || xi < 0 || xi >= w1) {
      in_diff[index] = T(0);
      continue;
    }
    const T* g = out_diff + plane * h2 * w2;
    if (h1 == h2 && w1 == w2) {
      in_diff[index] = T(0) + g[yi * w2 + xi];    // the fork's += into zeros: -0 -> +0
      continue;
    }
    const int x_first = interp_first_source(xi, rw, w2);
    T sum = T(0);
    for (int y2 = interp_first_source(yi, rh, h2); y2 < h2; ++y2) {
      int y0, dy;
      T ly0, ly1;
      interp_coordinate<T>(y2, rh, h1, &y0, &dy, &ly0, &ly1);
      if (y0 > yi) break;
      const bool upper = y0 == yi, lower = y0 + dy == yi;
      if (!upper && !lower) continue;
      for (int x2 = x_first; x2 < w2; ++x2) {
        int x0, dx;
        T lx0, lx1;
        interp_coordinate<T>(x2, rw, w1, &x0, &dx, &lx0, &lx1);
        if (x0 > xi) break;
        const bool left = x0 == xi, right = x0 + dx == xi;
        if (!left && !right) continue;
        const T grad = g[y2 * w2 + x2];
        if (upper && left) sum += ly0 * lx0 * grad;
        if (upper && right) sum += ly0 * lx1 * grad;
        if (lower && left) sum += ly1 * lx0 * grad;
        if (lower && right) sum += ly1 * lx1 * grad;
      }
    }
    in_diff[index] = sum;
  }
}
