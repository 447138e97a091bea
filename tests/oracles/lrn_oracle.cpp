// LRN ACROSS_CHANNELS as the fork's CPU code computes it (lrn_layer.cpp), for
// tests/test_lrn.py: the scale of channel 0 is k plus the first window's terms added one
// by one, every later channel's is the previous one plus the entering term minus the
// leaving one (axpy with alpha/size), and the backward keeps a running sum of the
// ratios the same way. caffe_axpy is written as the reference BLAS loop (no fused
// multiply-add); caffe_powx is C's pow on the float promoted to double.
// Usage: lrn_oracle N C H W SIZE ALPHA BETA K; reads the bottom data then the top diff
// (N*C*H*W float32 each) from stdin; writes the top data then the bottom diff.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace caffe {

typedef float Dtype;

void axpy(int n, Dtype alpha, const Dtype* x, Dtype* y) {
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

struct Shape { int num, channels, height, width; };

void forward(const Shape& s, int size, Dtype alpha, Dtype beta, Dtype k,
             const Dtype* bottom, Dtype* scale, Dtype* top) {
  const int plane = s.height * s.width, count = s.num * s.channels * plane;
  const int pre_pad = (size - 1) / 2;
  const Dtype alpha_over_size = alpha / size;
  for (int i = 0; i < count; ++i) scale[i] = k;
  std::vector<Dtype> padded((s.channels + size - 1) * plane, Dtype(0));
  for (int n = 0; n < s.num; ++n) {
    const Dtype* x = bottom + n * s.channels * plane;
    Dtype* sc = scale + n * s.channels * plane;
    for (int i = 0; i < s.channels * plane; ++i) padded[pre_pad * plane + i] = x[i] * x[i];
    for (int c = 0; c < size; ++c) axpy(plane, alpha_over_size, &padded[c * plane], sc);
    for (int c = 1; c < s.channels; ++c) {
      for (int i = 0; i < plane; ++i) sc[c * plane + i] = sc[(c - 1) * plane + i];
      axpy(plane, alpha_over_size, &padded[(c + size - 1) * plane], sc + c * plane);
      axpy(plane, -alpha_over_size, &padded[(c - 1) * plane], sc + c * plane);
    }
  }
  for (int i = 0; i < count; ++i) top[i] = pow(scale[i], -beta);
  for (int i = 0; i < count; ++i) top[i] = top[i] * bottom[i];
}

void backward(const Shape& s, int size, Dtype alpha, Dtype beta, const Dtype* bottom,
              const Dtype* scale, const Dtype* top, const Dtype* top_diff,
              Dtype* bottom_diff) {
  const int plane = s.height * s.width, count = s.num * s.channels * plane;
  const int inverse_pre_pad = size - (size + 1) / 2;
  const Dtype cache_ratio = 2. * alpha * beta / size;      // double, stored as float
  for (int i = 0; i < count; ++i) bottom_diff[i] = pow(scale[i], -beta);
  for (int i = 0; i < count; ++i) bottom_diff[i] = top_diff[i] * bottom_diff[i];
  std::vector<Dtype> padded((s.channels + size - 1) * plane, Dtype(0));
  std::vector<Dtype> accum(plane), times_bottom(plane);
  for (int n = 0; n < s.num; ++n) {
    const int block = n * s.channels * plane;
    Dtype* ratio = &padded[inverse_pre_pad * plane];
    for (int i = 0; i < s.channels * plane; ++i)
      ratio[i] = top_diff[block + i] * top[block + i];
    for (int i = 0; i < s.channels * plane; ++i) ratio[i] = ratio[i] / scale[block + i];
    for (int i = 0; i < plane; ++i) accum[i] = 0;
    for (int c = 0; c < size - 1; ++c) axpy(plane, 1., &padded[c * plane], &accum[0]);
    for (int c = 0; c < s.channels; ++c) {
      axpy(plane, 1., &padded[(c + size - 1) * plane], &accum[0]);
      for (int i = 0; i < plane; ++i)
        times_bottom[i] = bottom[block + c * plane + i] * accum[i];
      axpy(plane, -cache_ratio, &times_bottom[0], bottom_diff + block + c * plane);
      axpy(plane, -1., &padded[c * plane], &accum[0]);
    }
  }
}

}  // namespace caffe

int main(int argc, char** argv) {
  if (argc != 9) return 2;
  caffe::Shape s = {atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), atoi(argv[4])};
  const int size = atoi(argv[5]);
  const float alpha = strtof(argv[6], NULL), beta = strtof(argv[7], NULL),
              k = strtof(argv[8], NULL);
  const size_t count = static_cast<size_t>(s.num) * s.channels * s.height * s.width;
  std::vector<float> bottom(count), top_diff(count), scale(count), top(count), diff(count);
  if (fread(&bottom[0], sizeof(float), count, stdin) != count) return 3;
  if (fread(&top_diff[0], sizeof(float), count, stdin) != count) return 3;
  caffe::forward(s, size, alpha, beta, k, &bottom[0], &scale[0], &top[0]);
  caffe::backward(s, size, alpha, beta, &bottom[0], &scale[0], &top[0], &top_diff[0],
                  &diff[0]);
  fwrite(&top[0], sizeof(float), count, stdout);
  fwrite(&diff[0], sizeof(float), count, stdout);
  return 0;
}
