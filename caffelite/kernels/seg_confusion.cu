// SegAccuracy's confusion-matrix accumulation (the fork's seg_accuracy_layer.cpp and
// util/confusion_matrix.cpp; mirrors caffelite/layers/deeplab_eval.py and spec section 5).
//
// Scores are (num, channels, spatial), labels (num, spatial). Per pixel: prediction =
// argmax over the channels with ties to the HIGHEST class (the fork's partial sort of
// (score, class) pairs), GT = static_cast<int>(label); a GT in the ignore list is
// skipped; 0 <= GT < channels adds one to confusion[GT*channels + pred] (atomicAdd);
// any other GT is an error: the smallest such pixel index is kept in *first_bad (the
// caller initialises it to n and reports the label found there).
// Accumulates: the caller zeroes the matrix when SegAccuracy's `reset` is true.
//
// Every kernel's first parameter is the element count of its grid-stride loop:
// n = num * spatial.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

template <typename T>
__global__ void seg_confusion(const int n, const T* __restrict__ scores,
                              const T* __restrict__ labels, const int channels,
                              const int spatial, const int* __restrict__ ignore,
                              const int num_ignore, unsigned long long* confusion,
                              int* first_bad) {
  CAFFELITE_KERNEL_LOOP(index, n) {
    const int gt = static_cast<int>(labels[index]);
    bool skip = false;
    for (int k = 0; k < num_ignore; ++k) {
      skip = skip || gt == ignore[k];
    }
    if (skip) continue;
    if (gt < 0 || gt >= channels) {
      atomicMin(first_bad, index);
      continue;
    }
    const T* s = scores + (index / spatial) * channels * spatial + index % spatial;
    T best = s[0];
    int pred = 0;
    for (int c = 1; c < channels; ++c) {
      if (s[c * spatial] >= best) {
        best = s[c * spatial];
        pred = c;
      }
    }
    atomicAdd(confusion + gt * channels + pred, 1ULL);
  }
}
