// Implicit-GEMM convolution forward on tensor cores (TF32): top = W * im2col(image) + bias
// without writing the columns. The GEMM is M = out_channels, N = num * out_h * out_w
// (output pixels), K = kernel taps x channels, TAP-MAJOR: k = (u * kernel_w + v) * c_pad + c
// with the channels padded to c_pad, a multiple of 16. Each block computes a BM x BN tile
// of it from K-slices of 16 (one tap, 16 channels each), double-buffered in shared memory,
// and each warp multiplies its 64 x 32 part with mma.sync m16n8k8 (TF32 operands, FP32
// sums). Per slice a thread tests its pixel's tap once and reads its channels at a
// stride of height * width (consecutive pixels: coalesced). A slice whose tap falls in
// the padding for every pixel of the tile is skipped (ASPP's large dilations), so, as
// with caffelite's tap GEMMs, an Inf or NaN weight of such a tap does not reach those
// outputs as NaN the way cuBLAS's 0 * Inf would.
//
// conv_igemm_weights lays the weights out for it first: [out_channels][taps][c_pad], zero
// for c >= channels, rounded to TF32 as cvt.rna does (to nearest, ties away from zero, as
// cuBLAS's TF32 mode rounds); with `transposed`, those of the data gradient (the
// convolution of the top gradient with the kernel rotated by 180 degrees and the two
// channel axes swapped). The image operand is rounded as it enters shared memory. The
// double instantiation runs the same tiles with plain double products summed in k order
// (no tensor cores, no rounding): the exact reference that checks the indexing.
//
// Block-cooperative: __syncthreads and __shared__ memory. On the host (host_shim.h) the
// threads of a block run as fibers and mma.sync is emulated from its fragment layouts.
//
// Launch: grid = ceil(out_channels / BM) * ceil(n / BN) blocks, output-channel tile
// fastest, so the blocks that share image columns run together. conv_igemm_forward has
// BM = BN = 128 (256 threads: 8 warps of 64 x 32, 2 x 4); conv_igemm_forward_narrow
// BM = 64, BN = 256 (256 threads, 1 x 8), for layers with at most 64 output channels;
// conv_igemm_forward_quad BM = BN = 128 (128 threads: 4 warps of 64 x 64, 2 x 2).

#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

#define IGEMM_THREADS 256

// Fragment and accumulator arrays must stay in registers: every loop over them unrolls.
#ifdef __CUDACC__
#define IGEMM_UNROLL _Pragma("unroll")
#else
#define IGEMM_UNROLL
#endif

__device__ __forceinline__ float mma_operand(float x) {
#ifdef __CUDA_ARCH__
  unsigned bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return __uint_as_float(bits);
#else
  return caffelite_host::round_tf32(x);
#endif
}

__device__ __forceinline__ double mma_operand(double x) { return x; }

__device__ __forceinline__ void mma_tf32(float d[4], const float a[4], const float b[2]) {
#ifdef __CUDA_ARCH__
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
#else
  caffelite_host::mma_m16n8k8_tf32(d, a, b, d);
#endif
}

// Four consecutive values, 16-byte aligned: one 128-bit access on the device.
__device__ __forceinline__ void load4(float (&d)[4], const float* p) {
#ifdef __CUDA_ARCH__
  const float4 q = *reinterpret_cast<const float4*>(p);
  d[0] = q.x;
  d[1] = q.y;
  d[2] = q.z;
  d[3] = q.w;
#else
  for (int i = 0; i < 4; ++i) d[i] = p[i];
#endif
}

__device__ __forceinline__ void store4(float* p, const float (&d)[4]) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<float4*>(p) = make_float4(d[0], d[1], d[2], d[3]);
#else
  for (int i = 0; i < 4; ++i) p[i] = d[i];
#endif
}

__device__ __forceinline__ void load4(double (&d)[4], const double* p) {
  for (int i = 0; i < 4; ++i) d[i] = p[i];
}

__device__ __forceinline__ void store4(double* p, const double (&d)[4]) {
  for (int i = 0; i < 4; ++i) p[i] = d[i];
}

template <typename T, int NI>
__device__ __forceinline__ void zero_accumulators(T (&acc)[4][NI][4]) {
  IGEMM_UNROLL
  for (int mi = 0; mi < 4; ++mi)
    IGEMM_UNROLL
    for (int ni = 0; ni < NI; ++ni)
      IGEMM_UNROLL
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = T(0);
}

// The displacement of tap r = u * kernel_w + v in the image: (u * dilation_h,
// v * dilation_w).
__device__ __forceinline__ void tap_displacement(const int r, const int kernel_w,
                                                 const int dilation_h, const int dilation_w,
                                                 int& dy, int& dx) {
  const int u = r / kernel_w;
  dy = u * dilation_h;
  dx = (r - u * kernel_w) * dilation_w;
}

// store(row, column, value) for each accumulator of a warp's 64 x (8 NI) tile, with its
// row and column in the block's tile (the PTX layout: rows g, g+8, columns 2t, 2t+1).
template <typename T, int NI, typename Store>
__device__ __forceinline__ void for_each_accumulator(const T (&acc)[4][NI][4],
                                                     const int warp_m, const int warp_n,
                                                     const int lane, Store store) {
  const int g = lane >> 2, t = lane & 3;
  IGEMM_UNROLL
  for (int mi = 0; mi < 4; ++mi)
    IGEMM_UNROLL
    for (int ni = 0; ni < NI; ++ni)
      IGEMM_UNROLL
      for (int i = 0; i < 4; ++i)
        store(warp_m + mi * 16 + g + (i >= 2 ? 8 : 0), warp_n + ni * 8 + 2 * t + (i & 1),
              acc[mi][ni][i]);
}

// The B operand's (k, n) entry of a tile stored [k][n], or [n][k] with B_NK.
template <bool B_NK, int B_PITCH, typename T>
__device__ __forceinline__ T b_entry(const T (*b_tile)[B_PITCH], const int k, const int n) {
  return B_NK ? b_tile[n][k] : b_tile[k][n];
}

// One BK-slice of a warp's 64 x (8 NI) tile: 4 x NI mma tiles of 16 x 8, k-steps of 8.
// acc[mi][ni][i] is the PTX accumulator fragment: rows g, g, g+8, g+8, columns 2t, 2t+1.
template <int BK, int A_PITCH, int B_PITCH, bool B_NK = false, int NI>
__device__ __forceinline__ void warp_tile_product(float (&acc)[4][NI][4],
                                                  const float (*a_tile)[A_PITCH],
                                                  const float (*b_tile)[B_PITCH],
                                                  const int warp_m, const int warp_n,
                                                  const int lane) {
  const int g = lane >> 2, t = lane & 3;
  IGEMM_UNROLL
  for (int ks = 0; ks < BK; ks += 8) {
    float b[NI][2];
    IGEMM_UNROLL
    for (int ni = 0; ni < NI; ++ni) {
      const int c = warp_n + ni * 8 + g;
      b[ni][0] = b_entry<B_NK, B_PITCH>(b_tile, ks + t, c);
      b[ni][1] = b_entry<B_NK, B_PITCH>(b_tile, ks + t + 4, c);
    }
    IGEMM_UNROLL
    for (int mi = 0; mi < 4; ++mi) {
      const int r = warp_m + mi * 16 + g;
      const float a[4] = {a_tile[r][ks + t], a_tile[r + 8][ks + t], a_tile[r][ks + t + 4],
                          a_tile[r + 8][ks + t + 4]};
      IGEMM_UNROLL
      for (int ni = 0; ni < NI; ++ni) mma_tf32(acc[mi][ni], a, b[ni]);
    }
  }
}

// The double reference: the same accumulator positions, each a sum over k in order.
template <int BK, int A_PITCH, int B_PITCH, bool B_NK = false, int NI>
__device__ __forceinline__ void warp_tile_product(double (&acc)[4][NI][4],
                                                  const double (*a_tile)[A_PITCH],
                                                  const double (*b_tile)[B_PITCH],
                                                  const int warp_m, const int warp_n,
                                                  const int lane) {
  const int g = lane >> 2, t = lane & 3;
  for (int mi = 0; mi < 4; ++mi)
    for (int ni = 0; ni < NI; ++ni)
      for (int i = 0; i < 4; ++i) {
        const int r = warp_m + mi * 16 + g + (i >= 2 ? 8 : 0);
        const int c = warp_n + ni * 8 + 2 * t + (i & 1);
        double sum = acc[mi][ni][i];
        for (int k = 0; k < BK; ++k)
          sum += a_tile[r][k] * b_entry<B_NK, B_PITCH>(b_tile, k, c);
        acc[mi][ni][i] = sum;
      }
}

// A block of WARPS_M x WARPS_N warps, each computing a 64 x WARP_N part of the tile.
template <typename T, int WARPS_M, int WARPS_N, int WARP_N>
__device__ __forceinline__ void conv_igemm_body(
    const int n, const T* __restrict__ image, const T* __restrict__ weights,
    const T* __restrict__ bias, const int channels, const int height, const int width,
    const int kernel_h, const int kernel_w, const int dilation_h, const int dilation_w,
    const int c_pad, const int out_channels, const int out_w, const int plane,
    const int stride_h, const int stride_w, const int pad_h, const int pad_w,
    const int has_bias, T* __restrict__ top) {
  // K-slices of 16 floats (8 doubles: the same 48 KiB of static shared memory at most);
  // the pitches keep each warp's fragment reads on 32 different banks.
  const int BK = sizeof(T) == 4 ? 16 : 8;
  const int THREADS = 32 * WARPS_M * WARPS_N;
  const int NI = WARP_N / 8;
  const int BM = WARPS_M * 64;
  const int BN = WARPS_N * WARP_N;
  static_assert(THREADS % BN == 0, "each thread gathers one pixel of the tile");
  const int A_PITCH = BK + 4;
  const int B_PITCH = BN + 8;
  const int A_ROWS_PER_PASS = THREADS / (BK / 4);
  const int A_PASSES = (BM + A_ROWS_PER_PASS - 1) / A_ROWS_PER_PASS;
  const int B_LOADS = BK * BN / THREADS;
  // 16-byte aligned: the weights are stored with 128-bit writes (store4).
  __shared__ __align__(16) T a_tiles[2][BM][A_PITCH];
  __shared__ __align__(16) T b_tiles[2][BK][B_PITCH];

  const int K = kernel_h * kernel_w * c_pad;
  const int slices = K / BK;
  const int area = height * width;
  const int tiles_m = (out_channels + BM - 1) / BM;
  const int m0 = (blockIdx.x % tiles_m) * BM;
  const int n0 = (blockIdx.x / tiles_m) * BN;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = (warp % WARPS_M) * 64, warp_n = (warp / WARPS_M) * WARP_N;

  // This thread's loads: 4 weights at k = a_k.. of rows a_row + i * A_ROWS_PER_PASS; one
  // output pixel b_col for the whole K loop at channels b_k + i * b_step of each slice.
  const int a_k = (tid % (BK / 4)) * 4, a_row = tid / (BK / 4);
  const int b_col = tid % BN, b_k = tid / BN, b_step = THREADS / BN;
  const int pixel = n0 + b_col;
  const bool pixel_ok = pixel < n;
  int y0 = 0, x0 = 0, pixel_base = 0;
  if (pixel_ok) {
    const int img = pixel / plane;
    const int p = pixel - img * plane;
    const int oy = p / out_w;
    y0 = oy * stride_h - pad_h;
    x0 = (p - oy * out_w) * stride_w - pad_w;
    pixel_base = img * channels * area + y0 * width + x0;
  }

  // The tile's output rows and columns (the whole grid if it spans two images), for the
  // block-uniform test whether a tap reaches the image for any of its pixels.
  const int last = (n0 + BN < n ? n0 + BN : n) - 1;
  int row_lo = 0, row_hi = plane / out_w - 1, col_lo = 0, col_hi = out_w - 1;
  if (n0 / plane == last / plane) {
    const int p0 = n0 % plane, p1 = last % plane;
    row_lo = p0 / out_w;
    row_hi = p1 / out_w;
    if (row_lo == row_hi) {
      col_lo = p0 - row_lo * out_w;
      col_hi = p1 - row_hi * out_w;
    }
  }
  auto tap_of = [&](const int slice, int& dy, int& dx) {
    tap_displacement(slice * BK / c_pad, kernel_w, dilation_h, dilation_w, dy, dx);
  };
  auto skipped = [&](const int slice) {
    int dy, dx;
    tap_of(slice, dy, dx);
    return row_hi * stride_h - pad_h + dy < 0 || row_lo * stride_h - pad_h + dy >= height ||
           col_hi * stride_w - pad_w + dx < 0 || col_lo * stride_w - pad_w + dx >= width;
  };
  auto next_active = [&](int slice) {
    while (slice < slices && skipped(slice)) ++slice;
    return slice;
  };

  T a_next[A_PASSES][4], b_next[B_LOADS];
  auto load = [&](const int slice) {
    const int k0 = slice * BK;
    IGEMM_UNROLL
    for (int i = 0; i < A_PASSES; ++i) {
      const int row = a_row + i * A_ROWS_PER_PASS, o = m0 + row;
      if (row < BM && o < out_channels) {
        load4(a_next[i], weights + o * K + k0 + a_k);
      } else {
        IGEMM_UNROLL
        for (int j = 0; j < 4; ++j) a_next[i][j] = T(0);
      }
    }
    int dy, dx;
    tap_of(slice, dy, dx);
    const int c0 = k0 % c_pad + b_k;
    const bool inside = pixel_ok && y0 + dy >= 0 && y0 + dy < height && x0 + dx >= 0 &&
                        x0 + dx < width;
    const int at = pixel_base + dy * width + dx + c0 * area;
    IGEMM_UNROLL
    for (int i = 0; i < B_LOADS; ++i)
      b_next[i] = (inside && c0 + i * b_step < channels) ? image[at + i * b_step * area]
                                                        : T(0);
  };
  auto store = [&](const int buffer) {
    IGEMM_UNROLL
    for (int i = 0; i < A_PASSES; ++i)
      if (a_row + i * A_ROWS_PER_PASS < BM)
        store4(&a_tiles[buffer][a_row + i * A_ROWS_PER_PASS][a_k], a_next[i]);
    IGEMM_UNROLL
    for (int i = 0; i < B_LOADS; ++i)
      b_tiles[buffer][b_k + i * b_step][b_col] = mma_operand(b_next[i]);
  };

  T acc[4][NI][4];
  zero_accumulators(acc);

  // The slices the tile needs, in order; every thread walks the same list, so the
  // barriers are uniform.
  int slice = next_active(0);
  int buffer = 0;
  if (slice < slices) {
    load(slice);
    store(0);
  }
  __syncthreads();
  while (slice < slices) {
    const int next = next_active(slice + 1);
    if (next < slices) load(next);           // in flight while the tensor cores work
    warp_tile_product<BK, A_PITCH, B_PITCH>(acc, a_tiles[buffer], b_tiles[buffer], warp_m,
                                            warp_n, lane);
    if (next < slices) store(buffer ^ 1);    // read last in the previous round
    __syncthreads();
    buffer ^= 1;
    slice = next;
  }

  for_each_accumulator(acc, warp_m, warp_n, lane, [&](const int row, const int column,
                                                      T value) {
    const int o = m0 + row, col = n0 + column;
    if (o >= out_channels || col >= n) return;
    const int img = col / plane;
    if (has_bias) value += bias[o];         // Caffe adds the bias after the product
    top[(img * out_channels + o) * plane + (col - img * plane)] = value;
  });
}

// The weights as conv_igemm_forward reads them: prepared[o][r][c] (n = out_channels *
// taps * c_pad) = weight[o][c][r], or with `transposed` weight[c][o][taps - 1 - r] (the
// data gradient's: out_channels is then the layer's input channels and `channels` its
// outputs); 0 for c >= channels; rounded to TF32 (float).
template <typename T>
__global__ void conv_igemm_weights(const int n, const T* __restrict__ weight,
                                   const int out_channels, const int channels,
                                   const int taps, const int c_pad, const int transposed,
                                   T* __restrict__ prepared) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const int o = i / (taps * c_pad);
    const int rest = i - o * taps * c_pad;
    const int r = rest / c_pad;
    const int c = rest - r * c_pad;
    T w = T(0);
    if (c < channels)
      w = transposed ? weight[(c * out_channels + o) * taps + (taps - 1 - r)]
                     : weight[(o * channels + c) * taps + r];
    prepared[i] = mma_operand(w);
  }
}

// The column table of the weight gradient's tile: one 16-byte entry per column.
struct ColumnTap {
  int offset, dy, dx, unused;
};

// The weight gradient: partial[split][o][k] = sum over the pixels p of split `split` of
// top_diff[o][p] * im2col(image)[k][p], k tap-major as in conv_igemm_weights (M = out
// channels, N = taps * c_pad, reduced over the pixels). The pixels are split into runs of
// `chunk` (a multiple of 16) so that small layers still fill the GPU; conv_igemm_wgrad_sum
// then adds the splits in order into weight_diff (deterministic: no atomics). With
// `direct` (one run), `partial` is the weight diff itself, [o][c][tap], added to in the
// epilogue. 128 x 128 tiles from 2 x WARPS_N warps of 64 x WARP_N; both operands are
// stored [row][pixel] in shared memory and rounded to TF32.
template <typename T, int WARPS_N, int WARP_N>
__device__ __forceinline__ void conv_igemm_wgrad_body(
    const T* __restrict__ image, const T* __restrict__ top_diff, const int num,
    const int channels, const int height, const int width, const int kernel_h,
    const int kernel_w, const int dilation_h, const int dilation_w, const int c_pad,
    const int out_channels, const int out_w, const int plane, const int stride_h,
    const int stride_w, const int pad_h, const int pad_w, const int chunk, const int direct,
    T* __restrict__ partial) {
  const int THREADS = 64 * WARPS_N;
  const int NI = WARP_N / 8;
  const int BK = sizeof(T) == 4 ? 16 : 8;
  const int BM = 128, BN = 128;
  static_assert(WARPS_N * WARP_N == BN && THREADS >= BN, "one column entry per thread");
  const int PITCH = BK + (sizeof(T) == 4 ? 4 : 1);   // floats: fragment reads on 32 banks
  const int LOADS = BM * BK / THREADS;
  __shared__ __align__(16) T a_tiles[2][BM][PITCH];
  __shared__ __align__(16) T b_tiles[2][BN][PITCH];
  __shared__ ColumnTap columns[BN];

  const int K = kernel_h * kernel_w * c_pad;
  const int area = height * width;
  const int reduced = num * plane;
  const int tiles_m = (out_channels + BM - 1) / BM;
  const int tiles = tiles_m * ((K + BN - 1) / BN);
  const int tile = blockIdx.x % tiles, split = blockIdx.x / tiles;
  const int m0 = (tile % tiles_m) * BM, k0 = (tile / tiles_m) * BN;
  const int p_begin = split * chunk;
  const int p_end = p_begin + chunk < reduced ? p_begin + chunk : reduced;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = (warp % 2) * 64, warp_n = (warp / 2) * WARP_N;

  // Per column of the tile: its channel's and tap's offset in an image, and the tap's
  // displacement (a column past K or a padding channel gets one no pixel accepts).
  if (tid < BN) {
    const int k = k0 + tid;
    const int r = k / c_pad, c = k - r * c_pad;
    int dy, dx;
    tap_displacement(r, kernel_w, dilation_h, dilation_w, dy, dx);
    const bool real = k < K && c < channels;
    ColumnTap& column = columns[tid];
    column.dy = real ? dy : -(1 << 29);
    column.dx = real ? dx : 0;
    column.offset = real ? c * area + dy * width + dx : 0;
    column.unused = 0;
  }
  __syncthreads();

  // This thread's loads: pixel `at` of each slice, rows (and columns) row + step * i.
  // For floats the two half-warps take rows 4 apart (80 words: 16 banks), so that each
  // shared store of a warp hits 32 different banks (rows 0..15 for 256 threads, 0..7
  // for 128).
  const int at = tid % BK, step = THREADS / BK;
  const int row = BK == 16 ? ((tid >> 5) & 3) + 4 * ((tid >> 4) & 1) + 8 * (tid >> 7)
                           : tid / BK;
  T a_next[LOADS], b_next[LOADS];
  auto load = [&](const int p0) {
    const int p = p0 + at;
    const bool pixel_ok = p < p_end;
    int img = 0, pix = 0, y0 = 0, x0 = 0;
    if (pixel_ok) {
      img = p / plane;
      pix = p - img * plane;
      const int oy = pix / out_w;
      y0 = oy * stride_h - pad_h;
      x0 = (pix - oy * out_w) * stride_w - pad_w;
    }
    const int image_base = img * channels * area + y0 * width + x0;
    IGEMM_UNROLL
    for (int i = 0; i < LOADS; ++i) {
      const int o = m0 + row + i * step;
      a_next[i] = (pixel_ok && o < out_channels)
                      ? top_diff[(img * out_channels + o) * plane + pix]
                      : T(0);
      const ColumnTap column = columns[row + i * step];
      const int y = y0 + column.dy, x = x0 + column.dx;
      b_next[i] = (pixel_ok && y >= 0 && y < height && x >= 0 && x < width)
                      ? image[image_base + column.offset]
                      : T(0);
    }
  };
  auto store = [&](const int buffer) {
    IGEMM_UNROLL
    for (int i = 0; i < LOADS; ++i) {
      a_tiles[buffer][row + i * step][at] = mma_operand(a_next[i]);
      b_tiles[buffer][row + i * step][at] = mma_operand(b_next[i]);
    }
  };

  T acc[4][NI][4];
  zero_accumulators(acc);

  const int slices = p_end > p_begin ? (p_end - p_begin + BK - 1) / BK : 0;
  if (slices > 0) {
    load(p_begin);
    store(0);
  }
  __syncthreads();
  for (int s = 0; s < slices; ++s) {
    const int buffer = s & 1;
    const bool more = s + 1 < slices;
    if (more) load(p_begin + (s + 1) * BK);
    warp_tile_product<BK, PITCH, PITCH, true>(acc, a_tiles[buffer], b_tiles[buffer], warp_m,
                                              warp_n, lane);
    if (more) store(buffer ^ 1);
    __syncthreads();
  }

  for_each_accumulator(acc, warp_m, warp_n, lane, [&](const int row, const int column,
                                                      const T value) {
    const int o = m0 + row, k = k0 + column;
    if (o >= out_channels || k >= K) return;
    if (!direct) {
      partial[(split * out_channels + o) * K + k] = value;
      return;
    }
    const int r = k / c_pad, c = k - r * c_pad;   // one run: straight into the diff
    if (c < channels) partial[(o * channels + c) * kernel_h * kernel_w + r] += value;
  });
}

template <typename T>
__global__ void __launch_bounds__(IGEMM_THREADS, 2)
conv_igemm_wgrad(const int n, const T* __restrict__ image, const T* __restrict__ top_diff,
                 const int num, const int channels, const int height, const int width,
                 const int kernel_h, const int kernel_w, const int dilation_h,
                 const int dilation_w, const int c_pad, const int out_channels,
                 const int out_w, const int plane, const int stride_h, const int stride_w,
                 const int pad_h, const int pad_w, const int chunk, const int direct,
                 T* __restrict__ partial) {
  conv_igemm_wgrad_body<T, 4, 32>(image, top_diff, num, channels, height, width, kernel_h,
                                  kernel_w, dilation_h, dilation_w, c_pad, out_channels,
                                  out_w, plane, stride_h, stride_w, pad_h, pad_w, chunk,
                                  direct, partial);
}

// The same with four warps of 64 x 64 (2 x 2) in 128-thread blocks.
template <typename T>
__global__ void __launch_bounds__(128, 2)
conv_igemm_wgrad_quad(const int n, const T* __restrict__ image,
                      const T* __restrict__ top_diff, const int num, const int channels,
                      const int height, const int width, const int kernel_h,
                      const int kernel_w, const int dilation_h, const int dilation_w,
                      const int c_pad, const int out_channels, const int out_w,
                      const int plane, const int stride_h, const int stride_w,
                      const int pad_h, const int pad_w, const int chunk, const int direct,
                      T* __restrict__ partial) {
  conv_igemm_wgrad_body<T, 2, 64>(image, top_diff, num, channels, height, width, kernel_h,
                                  kernel_w, dilation_h, dilation_w, c_pad, out_channels,
                                  out_w, plane, stride_h, stride_w, pad_h, pad_w, chunk,
                                  direct, partial);
}

// weight_diff[o][c][r] += the sum over the splits, in order, of partial[split][o][r][c]
// (n = out_channels * taps * channels; i walks partial's order, so its reads coalesce).
template <typename T>
__global__ void conv_igemm_wgrad_sum(const int n, const T* __restrict__ partial,
                                     const int splits, const int channels, const int taps,
                                     const int c_pad, T* __restrict__ weight_diff) {
  const int K = taps * c_pad;
  const int out_channels = n / (channels * taps);
  CAFFELITE_KERNEL_LOOP(i, n) {
    const int o = i / (taps * channels);
    const int rest = i - o * taps * channels;
    const int r = rest / channels;
    const int c = rest - r * channels;
    T sum = T(0);
    for (int s = 0; s < splits; ++s)
      sum += partial[(s * out_channels + o) * K + r * c_pad + c];
    weight_diff[(o * channels + c) * taps + r] += sum;
  }
}

// n = num * out_h * out_w; weights from conv_igemm_weights; bias is read only when
// has_bias (pass any array otherwise).
template <typename T>
__global__ void __launch_bounds__(IGEMM_THREADS, 2)
conv_igemm_forward(const int n, const T* __restrict__ image, const T* __restrict__ weights,
                   const T* __restrict__ bias, const int channels, const int height,
                   const int width, const int kernel_h, const int kernel_w,
                   const int dilation_h, const int dilation_w, const int c_pad,
                   const int out_channels, const int out_w, const int plane,
                   const int stride_h, const int stride_w, const int pad_h, const int pad_w,
                   const int has_bias, T* __restrict__ top) {
  conv_igemm_body<T, 2, 4, 32>(n, image, weights, bias, channels, height, width, kernel_h, kernel_w,
                        dilation_h, dilation_w, c_pad, out_channels, out_w, plane, stride_h,
                        stride_w, pad_h, pad_w, has_bias, top);
}

template <typename T>
__global__ void __launch_bounds__(IGEMM_THREADS, 2)
conv_igemm_forward_narrow(const int n, const T* __restrict__ image,
                          const T* __restrict__ weights, const T* __restrict__ bias,
                          const int channels, const int height, const int width,
                          const int kernel_h, const int kernel_w, const int dilation_h,
                          const int dilation_w, const int c_pad, const int out_channels,
                          const int out_w, const int plane, const int stride_h,
                          const int stride_w, const int pad_h, const int pad_w,
                          const int has_bias, T* __restrict__ top) {
  conv_igemm_body<T, 1, 8, 32>(n, image, weights, bias, channels, height, width, kernel_h, kernel_w,
                        dilation_h, dilation_w, c_pad, out_channels, out_w, plane, stride_h,
                        stride_w, pad_h, pad_w, has_bias, top);
}

// 128 x 128 tiles from four warps of 64 x 64 (2 x 2): twice the products per fragment
// read from shared memory of the 64 x 32 warps above, in 128-thread blocks.
template <typename T>
__global__ void __launch_bounds__(128, 2)
conv_igemm_forward_quad(const int n, const T* __restrict__ image,
                        const T* __restrict__ weights, const T* __restrict__ bias,
                        const int channels, const int height, const int width,
                        const int kernel_h, const int kernel_w, const int dilation_h,
                        const int dilation_w, const int c_pad, const int out_channels,
                        const int out_w, const int plane, const int stride_h,
                        const int stride_w, const int pad_h, const int pad_w,
                        const int has_bias, T* __restrict__ top) {
  conv_igemm_body<T, 2, 2, 64>(n, image, weights, bias, channels, height, width, kernel_h,
                               kernel_w, dilation_h, dilation_w, c_pad, out_channels, out_w,
                               plane, stride_h, stride_w, pad_h, pad_w, has_bias, top);
}
