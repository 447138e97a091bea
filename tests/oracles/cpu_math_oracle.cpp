// The fork's CPU expressions around C's math functions, written as its layers write
// them, for tests/test_cpu_math.py. Inside namespace caffe with only <cmath>, an
// unqualified exp(float) is C's double exp, as it was for the GCC (<= 5) of the fork's
// era; the static_assert below stops the test if a compiler resolves it otherwise.
// Usage: cpu_math_oracle OP COUNT [PARAM]; reads COUNT float32 values (two arrays of
// COUNT for the two-input ops) from stdin, writes float32 results to stdout.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace caffe {

typedef float Dtype;
const float kBNLL_THRESHOLD = 50.;

template <typename T> struct is_double { static const bool value = false; };
template <> struct is_double<double> { static const bool value = true; };
// C++98 has no static_assert: a negative array size fails the build instead.
typedef char exp_of_float_is_double[is_double<__typeof__(exp(1.0f))>::value ? 1 : -1];
typedef char fabs_of_float_is_double[is_double<__typeof__(fabs(1.0f))>::value ? 1 : -1];

inline Dtype sigmoid(Dtype x) { return 1. / (1. + exp(-x)); }

void run(const char* op, int n, Dtype param, const Dtype* a, const Dtype* b, Dtype* y) {
  if (!strcmp(op, "sigmoid")) {
    for (int i = 0; i < n; ++i) y[i] = sigmoid(a[i]);
  } else if (!strcmp(op, "sigmoid_backward")) {        // a = top diff, b = top data
    for (int i = 0; i < n; ++i) {
      const Dtype sigmoid_x = b[i];
      y[i] = a[i] * sigmoid_x * (1. - sigmoid_x);
    }
  } else if (!strcmp(op, "tanh")) {
    for (int i = 0; i < n; ++i) y[i] = tanh(a[i]);
  } else if (!strcmp(op, "elu")) {
    for (int i = 0; i < n; ++i)
      y[i] = std::max(a[i], Dtype(0)) + param * (exp(std::min(a[i], Dtype(0))) - Dtype(1));
  } else if (!strcmp(op, "bnll")) {
    for (int i = 0; i < n; ++i)
      y[i] = a[i] > 0 ? a[i] + log(1. + exp(-a[i])) : log(1. + exp(a[i]));
  } else if (!strcmp(op, "bnll_backward")) {            // a = top diff, b = bottom data
    for (int i = 0; i < n; ++i) {
      Dtype expval = exp(std::min(b[i], Dtype(kBNLL_THRESHOLD)));
      y[i] = a[i] * expval / (expval + 1.);
    }
  } else if (!strcmp(op, "exp")) {                      // vsExp
    for (int i = 0; i < n; ++i) y[i] = exp(a[i]);
  } else if (!strcmp(op, "log")) {                      // vsLn
    for (int i = 0; i < n; ++i) y[i] = log(a[i]);
  } else if (!strcmp(op, "powx")) {                     // vsPowx
    for (int i = 0; i < n; ++i) y[i] = pow(a[i], param);
  } else if (!strcmp(op, "softmax2")) {   // SoftmaxLayer, 2 channels: a = x0, b = x1
    for (int i = 0; i < n; ++i) {
      const Dtype scale = std::max(a[i], b[i]);
      const Dtype e0 = exp(a[i] - scale), e1 = exp(b[i] - scale);   // vsExp into Dtype
      y[i] = e0 / (e0 + e1);
    }
  } else if (!strcmp(op, "bilinear")) {   // BilinearFiller: a = x, b = y, param = f
    const int f = static_cast<int>(param);
    const float c = (2 * f - 1 - f % 2) / (2. * f);
    for (int i = 0; i < n; ++i) y[i] = (1 - fabs(a[i] / f - c)) * (1 - fabs(b[i] / f - c));
  } else if (!strcmp(op, "softmax_loss_sum")) {         // SoftmaxWithLoss's loop
    Dtype loss = 0;
    for (int i = 0; i < n; ++i) loss -= log(std::max(a[i], Dtype(FLT_MIN)));
    y[0] = loss;
  } else if (!strcmp(op, "sigmoid_cross_entropy_sum")) {  // a = input, b = target
    Dtype loss = 0;
    for (int i = 0; i < n; ++i)
      loss -= a[i] * (b[i] - (a[i] >= 0)) - log(1 + exp(a[i] - 2 * a[i] * (a[i] >= 0)));
    y[0] = loss;
  } else {
    exit(2);
  }
}

}  // namespace caffe

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const int n = atoi(argv[2]);
  const float param = argc > 3 ? strtof(argv[3], NULL) : 0.f;
  std::vector<float> a(n), b(n), y(n);
  if (fread(&a[0], sizeof(float), n, stdin) != static_cast<size_t>(n)) return 3;
  size_t got = fread(&b[0], sizeof(float), n, stdin);
  (void)got;
  caffe::run(argv[1], n, param, &a[0], &b[0], &y[0]);
  fwrite(&y[0], sizeof(float), n, stdout);
  return 0;
}
