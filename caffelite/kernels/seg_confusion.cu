// SegAccuracy's confusion-matrix accumulation (the fork's seg_accuracy_layer.cpp and
// util/confusion_matrix.cpp; mirrors caffelite/layers/deeplab_eval.py and spec section 5).
//
// Scores are (num, channels, spatial), labels (num, spatial). Per pixel: prediction =
// argmax over the channels with ties to the HIGHEST class (the fork's partial sort of
// (score, class) pairs), GT = the label truncated to int (NaN, +-inf and values beyond
// int are bad, see int_label); a GT in the ignore list is skipped; 0 <= GT < channels
// adds one to confusion[GT*channels + pred] (atomicAdd); any other GT is an error: the
// smallest such pixel index is kept in *first_bad (the caller initialises it to n and
// reports the label found there).
// Accumulates: the caller zeroes the matrix when SegAccuracy's `reset` is true.
//
// Every kernel's first parameter is the element count of its grid-stride loop:
// n = num * spatial.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

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

template <typename T>
__global__ void seg_confusion(const int n, const T* __restrict__ scores,
                              const T* __restrict__ labels, const int channels,
                              const int spatial, const int* __restrict__ ignore,
                              const int num_ignore, unsigned long long* confusion,
                              int* first_bad) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    int gt;
    const bool integer = int_label(labels[index], &gt);
    bool skip = false;
    for (int k = 0; k < num_ignore; ++k) {
      skip = skip || gt == ignore[k];
    }
    if (integer && skip) continue;
    if (gt < 0 || gt >= channels) {
      atomicMin(first_bad, index);
      continue;
    }
    const T* s = scores + (index / spatial) * channels * spatial + index % spatial;
    T best = s[0];
    int pred = 0;
    for (int c = 1; c < channels; ++c) {
      // std::partial_sort with greater<pair> for top 1: a later class replaces the
      // best unless it is smaller, so ties and NaNs go to the later class.
      if (!(s[c * spatial] < best)) {
        best = s[c * spatial];
        pred = c;
      }
    }
    atomicAdd(confusion + gt * channels + pred, 1ULL);
  }
}
