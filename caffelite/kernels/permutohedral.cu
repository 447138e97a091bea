// Dense-CRF mean field on the permutohedral lattice: splat, blur, slice, and the per-pixel
// normalisation and softmax (caffelite/crf/device.py drives them; they mirror
// caffelite/crf/permutohedral.py's LatticeFilter and densecrf.py's mean_field).
//
// The lattices are built on the host; these kernels read its tables. Row-major layouts,
// with N points (pixels), M labels, K fused lattices (kernels), P = sum_k (d_k + 1) slots
// per point, L = the vertices of all lattices stacked, J = max_k (d_k + 1) directions:
//   values, q, energies ........ N x M
//   vertex values .............. L x M
//   offsets .................... N x P int, the vertex of each slot of each point
//   weights, slice_weights ..... N x P, barycentric weights; the slice's (see below)
//   splat_start ................ L + 1 int; splat_points / splat_weights: the splat
//                                transposed (per vertex its points, ascending, and weights)
//   neighbours ................. J x 2 x L int, per direction the vertex on the + side then
//                                the one on the - side, -1 where absent (and for j > d_k)
// Integer indices are int like Caffe: the caller keeps N*M, N*P, L*M and 2*J*L below 2^31.
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// The float function for float, the double one for double.
__device__ __forceinline__ float exp_t(const float x) { return expf(x); }
__device__ __forceinline__ double exp_t(const double x) { return exp(x); }

// Splat by scatter: vertex[offsets[i,p], m] += weights[i,p] * values[i, m] (atomicAdd).
// ACCUMULATES: the caller zeroes vertex first. n = N * M.
template <typename T>
__global__ void lattice_splat(const int n, const T* __restrict__ values,
                              const int* __restrict__ offsets, const T* __restrict__ weights,
                              const int slots, const int labels, T* vertex) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int point = index / labels;
    const int label = index % labels;
    const T value = values[index];
    const int* offset = offsets + point * slots;
    const T* weight = weights + point * slots;
    for (int p = 0; p < slots; ++p) {
      atomicAdd(vertex + offset[p] * labels + label, weight[p] * value);
    }
  }
}

// Splat by gather (the same sums without atomics, in ascending point order, so every run
// gives the same bits): vertex[v, m] = sum over the splat entries e of v of
// splat_weights[e] * values[splat_points[e], m]. Writes every element. n = L * M.
template <typename T>
__global__ void lattice_splat_gather(const int n, const T* __restrict__ values,
                                     const int* __restrict__ splat_start,
                                     const int* __restrict__ splat_points,
                                     const T* __restrict__ splat_weights, const int labels,
                                     T* __restrict__ vertex) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int v = index / labels;
    const int label = index % labels;
    T sum = T(0);
    for (int e = splat_start[v]; e < splat_start[v + 1]; ++e) {
      sum += splat_weights[e] * values[splat_points[e] * labels + label];
    }
    vertex[index] = sum;
  }
}

// One blur pass along `direction`: out = in + 0.5 * in[+ neighbour] + 0.5 * in[- neighbour]
// (the (1, 2, 1)/2 stencil, an absent neighbour counting as 0), added in that order.
// out must not alias in. n = L * M.
template <typename T>
__global__ void lattice_blur(const int n, const T* __restrict__ in,
                             const int* __restrict__ neighbours, const int vertices,
                             const int direction, const int labels, T* __restrict__ out) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int v = index / labels;
    const int label = index % labels;
    const int plus = neighbours[(2 * direction) * vertices + v];
    const int minus = neighbours[(2 * direction + 1) * vertices + v];
    T sum = in[index];
    if (plus >= 0) sum += T(0.5) * in[plus * labels + label];
    if (minus >= 0) sum += T(0.5) * in[minus * labels + label];
    out[index] = sum;
  }
}

// Slice onto a base: out[i, m] = base[i, m] + sum_p slice_weights[i, p] *
// vertex[offsets[i, p], m], added in slot order. out may alias base. n = N * M.
template <typename T>
__global__ void lattice_slice(const int n, const T* __restrict__ vertex,
                              const int* __restrict__ offsets,
                              const T* __restrict__ slice_weights, const int slots,
                              const int labels, const T* base, T* out) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int point = index / labels;
    const int label = index % labels;
    const int* offset = offsets + point * slots;
    const T* weight = slice_weights + point * slots;
    T sum = base[index];
    for (int p = 0; p < slots; ++p) {
      sum += weight[p] * vertex[offset[p] * labels + label];
    }
    out[index] = sum;
  }
}

// The slice weights of the fused message filter, NORMALIZE_AFTER: for point i and lattice
// k (slots [slot_start[k], slot_start[k+1])), with ones_blurred the splat-and-blurred
// field of ones (L x 1):
//   norm = 1 / (alpha_k * sum_p weights[i,p] * ones_blurred[offsets[i,p]] + 1e-20)
//   slice_weights[i, p] = weights[i, p] * alpha_k * (norm * kernel_weight_k)
// n = N * K.
template <typename T>
__global__ void lattice_slice_weights(const int n, const T* __restrict__ ones_blurred,
                                      const int* __restrict__ offsets,
                                      const T* __restrict__ weights,
                                      const int* __restrict__ slot_start,
                                      const T* __restrict__ alpha,
                                      const T* __restrict__ kernel_weight,
                                      const int lattices, const int slots,
                                      T* __restrict__ slice_weights) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int point = index / lattices;
    const int k = index % lattices;
    const int first = point * slots + slot_start[k];
    const int last = point * slots + slot_start[k + 1];
    T mass = T(0);
    for (int e = first; e < last; ++e) {
      mass += weights[e] * ones_blurred[offsets[e]];
    }
    const T norm = T(1) / (mass * alpha[k] + T(1e-20));
    const T scale = norm * kernel_weight[k];
    for (int e = first; e < last; ++e) {
      slice_weights[e] = weights[e] * alpha[k] * scale;
    }
  }
}

// Softmax of every row of x (N x M), in place: exp(x - shift) / sum, multiplied by the
// reciprocal of the sum as mean_field does. shift = the row maximum when `shift_max` is
// set, else 0 (the caller guarantees no overflow and a row entry >= 0). With use_cutoff
// (needs shift_max), entries more than `cutoff` below the row maximum get exactly 0 (the
// DeepLab fork's fast_exp). n = N.
template <typename T>
__global__ void crf_softmax(const int n, T* x, const int labels, const int shift_max,
                            const int use_cutoff, const T cutoff) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    T* row = x + index * labels;
    T top = T(0);
    if (shift_max) {
      top = row[0];
      for (int m = 1; m < labels; ++m) {
        if (row[m] > top) top = row[m];
      }
    }
    T sum = T(0);
    for (int m = 0; m < labels; ++m) {
      const T shifted = shift_max ? row[m] - top : row[m];
      const T e = (use_cutoff && shifted < -cutoff) ? T(0) : exp_t(shifted);
      row[m] = e;
      sum += e;
    }
    const T inverse = T(1) / sum;
    for (int m = 0; m < labels; ++m) {
      row[m] = row[m] * inverse;
    }
  }
}
