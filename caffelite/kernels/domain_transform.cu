// DomainTransform's recursive passes (spec deeplab_extra_layers.md section 1.3/1.4;
// mirrors _forward_pass/_backward_pass in caffelite/layers/domain_transform.py).
//
// One thread per scan line: a row of one (sample, channel) for the horizontal passes, a
// column for the vertical ones; each thread walks its line sequentially, because every
// step needs the value its neighbour got in the same pass. Lines outside a sample's valid
// rows x cols region, and positions beyond it, are not touched. Every array element
// belongs to exactly one line, so no atomics: the weight-gradient accumulator is per
// channel (the layer sums it over channels afterwards).
//
// Arrays are N x C x H x W (y, g, delta, acc) and N x 1 x H x W (the weights a);
// sizes holds (rows, cols) per sample as int. vertical: 0 = scan along W, 1 = along H;
// direction: +1 = towards higher indices (pass 0 and 2), -1 = towards lower (1 and 3).
//
// Every kernel's first parameter is the element count of its grid-stride loop (here the
// number of lines: N*C*H, or N*C*W when vertical).
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// Where line `line` starts in y and in a, its stride and its valid length; false when the
// line lies outside its sample's valid region.
__device__ __forceinline__ bool dt_line(const int line, const int channels, const int height,
                                        const int width, const int* sizes, const int vertical,
                                        int* y_start, int* a_start, int* stride, int* length) {
  if (vertical) {
    const int w = line % width;
    const int plane = line / width;                   // n * C + c
    const int sample = plane / channels;
    if (w >= sizes[2 * sample + 1]) return false;
    *y_start = plane * height * width + w;
    *a_start = sample * height * width + w;
    *stride = width;
    *length = sizes[2 * sample];
  } else {
    const int h = line % height;
    const int plane = line / height;
    const int sample = plane / channels;
    if (h >= sizes[2 * sample]) return false;
    *y_start = line * width;
    *a_start = (sample * height + h) * width;
    *stride = 1;
    *length = sizes[2 * sample + 1];
  }
  return true;
}

// One in-place pass on y. direction +1: y[i] += a[i] * (y[i-1] - y[i]) for i = 1..L-1;
// direction -1: y[i] += a[i+1] * (y[i+1] - y[i]) for i = L-2..0. With store != 0 the
// differences go to delta at position i (for backward).
template <typename T>
__global__ void dt_forward_pass(const int n, const int channels, const int height,
                                const int width, const int* sizes, const int vertical,
                                const int direction, const T* __restrict__ a, T* y,
                                const int store, T* delta) {
  CAFFELITE_KERNEL_LOOP(line, n) {
    int y0, a0, s, length;
    if (!dt_line(line, channels, height, width, sizes, vertical, &y0, &a0, &s, &length)) {
      continue;
    }
    const int first = direction > 0 ? 1 : length - 2;
    const int last = direction > 0 ? length : -1;     // exclusive
    for (int i = first; i != last && length > 1; i += direction) {
      const int j = i - direction;                     // neighbour already updated
      const int w = direction > 0 ? i : i + 1;         // position of the link's weight
      const T d = y[y0 + j * s] - y[y0 + i * s];
      if (store) delta[y0 + i * s] = d;
      y[y0 + i * s] = y[y0 + i * s] + a[a0 + w * s] * d;
    }
  }
}

// Adjoint of dt_forward_pass, in place on g; adds each link's weight gradient
// g[i] * delta[i] to acc at the position of its weight.
template <typename T>
__global__ void dt_backward_pass(const int n, const int channels, const int height,
                                 const int width, const int* sizes, const int vertical,
                                 const int direction, const T* __restrict__ a,
                                 const T* __restrict__ delta, T* g, T* acc) {
  CAFFELITE_KERNEL_LOOP(line, n) {
    int y0, a0, s, length;
    if (!dt_line(line, channels, height, width, sizes, vertical, &y0, &a0, &s, &length)) {
      continue;
    }
    const int first = direction > 0 ? length - 1 : 0;
    const int last = direction > 0 ? 0 : length - 1;  // exclusive
    for (int i = first; i != last && length > 1; i -= direction) {
      const int j = i - direction;
      const int w = direction > 0 ? i : i + 1;
      const T gi = g[y0 + i * s];
      const T aw = a[a0 + w * s];
      acc[y0 + w * s] = acc[y0 + w * s] + gi * delta[y0 + i * s];
      g[y0 + j * s] = g[y0 + j * s] + aw * gi;
      g[y0 + i * s] = (T(1) - aw) * gi;
    }
  }
}
