// Implicit-GEMM convolution forward on tensor cores (TF32): top = W * im2col(image) + bias
// without writing the columns. The GEMM is M = out_channels, N = num * out_h * out_w
// (output pixels), K = channels * kernel_h * kernel_w; each block computes a BM x BN tile
// of it, reading its K-slices of the weights and of the image (the im2col entries,
// gathered on the fly) into shared memory, 16 at a time, double-buffered, and each warp
// multiplies its 64 x 32 part with mma.sync m16n8k8 (TF32 operands, FP32 sums).
//
// Operands are rounded to TF32 as cvt.rna does (to nearest, ties away from zero), which
// is what cuBLAS's TF32 mode does with the columns. The double instantiation runs the
// same tiles with plain double products summed in k order (no tensor cores): the exact
// reference that checks the indexing.
//
// Block-cooperative: __syncthreads and __shared__ memory. On the host (host_shim.h) the
// threads of a block run as fibers and mma.sync is emulated from its fragment layouts.
//
// `taps` holds, per k = (c * kernel_h + u) * kernel_w + v, three ints: the offset
// c * height * width + u * dilation_h * width + v * dilation_w, then u * dilation_h and
// v * dilation_w (the caller builds it once per layer geometry).
//
// Launch: 256 threads; grid = ceil(out_channels / BM) * ceil(n / BN) blocks, output-channel
// tile fastest, so the blocks that share image columns run together. conv_igemm_forward
// has BM = BN = 128 (8 warps, 2 x 4); conv_igemm_forward_narrow BM = 64, BN = 256
// (1 x 8), for layers with at most 64 output channels.

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

// One BK-slice of a warp's 64 x 32 tile: 4 x 4 mma tiles of 16 x 8, k-steps of 8.
// acc[mi][ni][i] is the PTX accumulator fragment: rows g, g, g+8, g+8, columns 2t, 2t+1.
template <int BK, int A_PITCH, int B_PITCH>
__device__ __forceinline__ void warp_tile_product(float acc[4][4][4],
                                                  const float (*a_tile)[A_PITCH],
                                                  const float (*b_tile)[B_PITCH],
                                                  const int warp_m, const int warp_n,
                                                  const int lane) {
  const int g = lane >> 2, t = lane & 3;
  IGEMM_UNROLL
  for (int ks = 0; ks < BK; ks += 8) {
    float a[4][4], b[4][2];
    IGEMM_UNROLL
    for (int mi = 0; mi < 4; ++mi) {
      const int r = warp_m + mi * 16 + g;
      a[mi][0] = a_tile[r][ks + t];
      a[mi][1] = a_tile[r + 8][ks + t];
      a[mi][2] = a_tile[r][ks + t + 4];
      a[mi][3] = a_tile[r + 8][ks + t + 4];
    }
    IGEMM_UNROLL
    for (int ni = 0; ni < 4; ++ni) {
      const int c = warp_n + ni * 8 + g;
      b[ni][0] = b_tile[ks + t][c];
      b[ni][1] = b_tile[ks + t + 4][c];
    }
    IGEMM_UNROLL
    for (int mi = 0; mi < 4; ++mi)
      IGEMM_UNROLL
      for (int ni = 0; ni < 4; ++ni) mma_tf32(acc[mi][ni], a[mi], b[ni]);
  }
}

// The double reference: the same accumulator positions, each a sum over k in order.
template <int BK, int A_PITCH, int B_PITCH>
__device__ __forceinline__ void warp_tile_product(double acc[4][4][4],
                                                  const double (*a_tile)[A_PITCH],
                                                  const double (*b_tile)[B_PITCH],
                                                  const int warp_m, const int warp_n,
                                                  const int lane) {
  const int g = lane >> 2, t = lane & 3;
  for (int mi = 0; mi < 4; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int i = 0; i < 4; ++i) {
        const int r = warp_m + mi * 16 + g + (i >= 2 ? 8 : 0);
        const int c = warp_n + ni * 8 + 2 * t + (i & 1);
        double sum = acc[mi][ni][i];
        for (int k = 0; k < BK; ++k) sum += a_tile[r][k] * b_tile[k][c];
        acc[mi][ni][i] = sum;
      }
}

template <typename T, int WARPS_M>
__device__ __forceinline__ void conv_igemm_body(
    const int n, const T* __restrict__ image, const T* __restrict__ weight,
    const T* __restrict__ bias, const int* __restrict__ taps, const int channels,
    const int height, const int width, const int taps_count, const int out_channels,
    const int out_w, const int plane, const int stride_h, const int stride_w,
    const int pad_h, const int pad_w, const int has_bias, T* __restrict__ top) {
  // K-slices of 16 floats (8 doubles: the same 48 KiB of static shared memory at most);
  // the pitches keep each warp's fragment reads on 32 different banks.
  const int BK = sizeof(T) == 4 ? 16 : 8;
  const int BM = WARPS_M * 64;
  const int BN = (IGEMM_THREADS / 32 / WARPS_M) * 32;
  const int A_PITCH = BK + 4;
  const int B_PITCH = BN + 8;
  const int A_LOADS = BM * BK / IGEMM_THREADS;
  const int B_LOADS = BK * BN / IGEMM_THREADS;
  __shared__ T a_tiles[2][BM][A_PITCH];
  __shared__ T b_tiles[2][BK][B_PITCH];

  const int K = channels * taps_count;
  const int tiles_m = (out_channels + BM - 1) / BM;
  const int m0 = (blockIdx.x % tiles_m) * BM;
  const int n0 = (blockIdx.x / tiles_m) * BN;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = (warp % WARPS_M) * 64, warp_n = (warp / WARPS_M) * 32;

  // This thread's loads: weight rows a_row + i * a_step at k = a_k; image column b_col
  // (one output pixel for the whole K loop) at k = b_k + i * b_step.
  const int a_k = tid % BK, a_row = tid / BK, a_step = IGEMM_THREADS / BK;
  const int b_col = tid % BN, b_k = tid / BN, b_step = IGEMM_THREADS / BN;
  const int pixel = n0 + b_col;
  const bool pixel_ok = pixel < n;
  int y0 = 0, x0 = 0, pixel_base = 0;
  if (pixel_ok) {
    const int img = pixel / plane;
    const int p = pixel - img * plane;
    const int oy = p / out_w;
    y0 = oy * stride_h - pad_h;
    x0 = (p - oy * out_w) * stride_w - pad_w;
    pixel_base = img * channels * height * width + y0 * width + x0;
  }

  T a_next[A_LOADS], b_next[B_LOADS];
  auto load = [&](const int k0) {
    IGEMM_UNROLL
    for (int i = 0; i < A_LOADS; ++i) {
      const int o = m0 + a_row + i * a_step, k = k0 + a_k;
      a_next[i] = (o < out_channels && k < K) ? weight[o * K + k] : T(0);
    }
    IGEMM_UNROLL
    for (int i = 0; i < B_LOADS; ++i) {
      const int k = k0 + b_k + i * b_step;
      T v = T(0);
      if (pixel_ok && k < K) {
        const int y = y0 + taps[3 * k + 1], x = x0 + taps[3 * k + 2];
        if (y >= 0 && y < height && x >= 0 && x < width) v = image[pixel_base + taps[3 * k]];
      }
      b_next[i] = v;
    }
  };
  auto store = [&](const int buffer) {
    IGEMM_UNROLL
    for (int i = 0; i < A_LOADS; ++i)
      a_tiles[buffer][a_row + i * a_step][a_k] = mma_operand(a_next[i]);
    IGEMM_UNROLL
    for (int i = 0; i < B_LOADS; ++i)
      b_tiles[buffer][b_k + i * b_step][b_col] = mma_operand(b_next[i]);
  };

  T acc[4][4][4];
  IGEMM_UNROLL
  for (int mi = 0; mi < 4; ++mi)
    IGEMM_UNROLL
    for (int ni = 0; ni < 4; ++ni)
      IGEMM_UNROLL
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = T(0);

  const int k_tiles = (K + BK - 1) / BK;
  load(0);
  store(0);
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buffer = kt & 1;
    const bool more = kt + 1 < k_tiles;
    if (more) load((kt + 1) * BK);           // in flight while the tensor cores work
    warp_tile_product<BK, A_PITCH, B_PITCH>(acc, a_tiles[buffer], b_tiles[buffer], warp_m,
                                            warp_n, lane);
    if (more) store(buffer ^ 1);             // read last in the previous iteration
    __syncthreads();
  }

  const int g = lane >> 2, t = lane & 3;
  IGEMM_UNROLL
  for (int mi = 0; mi < 4; ++mi)
    IGEMM_UNROLL
    for (int ni = 0; ni < 4; ++ni)
      IGEMM_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int o = m0 + warp_m + mi * 16 + g + (i >= 2 ? 8 : 0);
        const int col = n0 + warp_n + ni * 8 + 2 * t + (i & 1);
        if (o >= out_channels || col >= n) continue;
        const int img = col / plane;
        T value = acc[mi][ni][i];
        if (has_bias) value += bias[o];     // Caffe adds the bias after the product
        top[(img * out_channels + o) * plane + (col - img * plane)] = value;
      }
}

// n = num * out_h * out_w. bias is read only when has_bias (pass any array otherwise).
template <typename T>
__global__ void conv_igemm_forward(const int n, const T* __restrict__ image,
                                   const T* __restrict__ weight, const T* __restrict__ bias,
                                   const int* __restrict__ taps, const int channels,
                                   const int height, const int width, const int taps_count,
                                   const int out_channels, const int out_w, const int plane,
                                   const int stride_h, const int stride_w, const int pad_h,
                                   const int pad_w, const int has_bias, T* __restrict__ top) {
  conv_igemm_body<T, 2>(n, image, weight, bias, taps, channels, height, width, taps_count,
                        out_channels, out_w, plane, stride_h, stride_w, pad_h, pad_w,
                        has_bias, top);
}

template <typename T>
__global__ void conv_igemm_forward_narrow(const int n, const T* __restrict__ image,
                                          const T* __restrict__ weight,
                                          const T* __restrict__ bias,
                                          const int* __restrict__ taps, const int channels,
                                          const int height, const int width,
                                          const int taps_count, const int out_channels,
                                          const int out_w, const int plane,
                                          const int stride_h, const int stride_w,
                                          const int pad_h, const int pad_w,
                                          const int has_bias, T* __restrict__ top) {
  conv_igemm_body<T, 1>(n, image, weight, bias, taps, channels, height, width, taps_count,
                        out_channels, out_w, plane, stride_h, stride_w, pad_h, pad_w,
                        has_bias, top);
}
