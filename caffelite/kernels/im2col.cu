// im2col / col2im for 2-D convolution with stride, padding and dilation
// (Caffe's util/im2col.cu; mirrors caffelite/layers/im2col.py).
//
// Column layout (Caffe's): row (c*kernel_h + u)*kernel_w + v, column h_col*width_col + w_col.
// Both kernels work on `num` consecutive images (num x C x height x width) and on a band of
// output rows [row_begin, row_begin + band_rows) of the height_col x width_col output grid,
// so that a caller can keep the column buffer small (num = 1, band_rows = height_col,
// row_begin = 0 is one whole image, Caffe's case) or make it wide enough for one GEMM over
// several images. Image i's columns follow image i-1's: with plane_col = band_rows *
// width_col, entry (row r, image i, grid position p) sits at r * col_ld + i * plane_col + p.
// col_ld >= num * plane_col leaves room for padding columns (a multiple of 4 floats keeps
// cuBLAS on its aligned, tensor-core kernels); the kernels never touch them.
//
// Every kernel's first parameter is the element count of its grid-stride loop. No
// __syncthreads, no shared memory: the file also compiles for the host (host_shim.h).
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// One thread per (channel, image, band row, column) of the output grids; it copies the
// kernel_h * kernel_w taps of its window, writing 0 where a tap falls into the padding.
// n = channels * num * band_rows * width_col.
template <typename T>
__global__ void im2col(const int n, const T* __restrict__ image, const int channels,
                       const int height, const int width, const int kernel_h,
                       const int kernel_w, const int pad_h, const int pad_w,
                       const int stride_h, const int stride_w, const int dilation_h,
                       const int dilation_w, const int width_col, const int row_begin,
                       const int band_rows, const int num, const int col_ld,
                       T* __restrict__ col) {
  const int plane_col = band_rows * width_col;
  CAFFELITE_KERNEL_LOOP(index, n) {
    // One division per coordinate, each remainder by a multiply (the divisions are much
    // of the arithmetic of a thread that copies only kernel_h * kernel_w values).
    const int rows = index / width_col;
    const int w_col = index - rows * width_col;
    const int images = rows / band_rows;
    const int h_band = rows - images * band_rows;
    const int c = images / num;
    const int img = images - c * num;
    const int h_offset = (row_begin + h_band) * stride_h - pad_h;
    const int w_offset = w_col * stride_w - pad_w;
    const T* src = image + (img * channels + c) * height * width;
    T* dst = col + c * kernel_h * kernel_w * col_ld + img * plane_col + h_band * width_col +
             w_col;
    for (int u = 0; u < kernel_h; ++u) {
      const int h_im = h_offset + u * dilation_h;
      for (int v = 0; v < kernel_w; ++v) {
        const int w_im = w_offset + v * dilation_w;
        *dst = (h_im >= 0 && w_im >= 0 && h_im < height && w_im < width)
                   ? src[h_im * width + w_im]
                   : T(0);
        dst += col_ld;
      }
    }
  }
}

// The adjoint, as a gather (Caffe's GPU col2im, no atomics): one thread per image pixel
// sums every column entry of the band that reads it, in increasing (h_col, w_col) order,
// i.e. kernel taps from last to first (Caffe's CPU col2im and caffelite's numpy col2im
// add the taps first to last, so float sums may differ in the last bits). Caffe scans
// every output position of the window and tests divisibility by the dilation, 49 x 49
// positions for a 3x3 kernel of dilation 24; visiting the taps themselves, last to first,
// takes the same entries in the same order in kernel_h x kernel_w steps.
// accumulate = 0 writes the pixel, 1 adds to it (for the second and later bands).
// n = num * channels * height * width.
template <typename T>
__global__ void col2im(const int n, const T* __restrict__ col, const int channels,
                       const int height, const int width, const int kernel_h,
                       const int kernel_w, const int pad_h, const int pad_w,
                       const int stride_h, const int stride_w, const int dilation_h,
                       const int dilation_w, const int width_col, const int row_begin,
                       const int band_rows, const int num, const int col_ld,
                       const int accumulate, T* __restrict__ image) {
  const int plane_col = band_rows * width_col;
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int rows = index / width;                 // one division per coordinate
    const int w_im = index - rows * width + pad_w;
    const int planes = rows / height;
    const int h_im = rows - planes * height + pad_h;
    const int img = planes / channels;
    const int c = planes - img * channels;
    const T* col_img = col + img * plane_col;
    T val = T(0);
    if (stride_h == 1 && stride_w == 1) {
      // Every DeepLab convolution but ResNet's conv1: the same entries in the same
      // order, without the divisions by the stride (most of this kernel's time).
      // row_begin >= 0, so the band test also rejects h_col < 0.
      for (int u = kernel_h - 1; u >= 0; --u) {
        const int h_col = h_im - u * dilation_h;
        if (h_col < row_begin || h_col >= row_begin + band_rows) continue;
        const T* row = col_img + (c * kernel_h + u) * kernel_w * col_ld +
                       (h_col - row_begin) * width_col;
        for (int v = kernel_w - 1; v >= 0; --v) {
          const int w_col = w_im - v * dilation_w;
          if (w_col >= 0 && w_col < width_col) val += row[v * col_ld + w_col];
        }
      }
    } else {
      for (int u = kernel_h - 1; u >= 0; --u) {
        const int h = h_im - u * dilation_h;        // h_col * stride_h, if a window
        if (h < 0 || h % stride_h != 0) continue;
        const int h_col = h / stride_h;
        if (h_col < row_begin || h_col >= row_begin + band_rows) continue;
        const T* row = col_img + (c * kernel_h + u) * kernel_w * col_ld +
                       (h_col - row_begin) * width_col;
        for (int v = kernel_w - 1; v >= 0; --v) {
          const int w = w_im - v * dilation_w;
          if (w < 0 || w % stride_w != 0) continue;
          const int w_col = w / stride_w;
          if (w_col >= width_col) continue;
          val += row[v * col_ld + w_col];
        }
      }
    }
    image[index] = accumulate ? image[index] + val : val;
  }
}
