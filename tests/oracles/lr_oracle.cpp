// SGDSolver<Dtype>::GetLearningRate's expressions and AdamSolver's bias correction as
// the fork writes them (solver fields are floats; unqualified pow/exp inside namespace
// caffe, which sees only C's double pow/exp when <math.h> is not libstdc++'s C++
// wrapper, as with the GCC <= 5 of the fork's era), for tests/test_solver.py.
// Usage: lr_oracle POLICY BASE_LR GAMMA POWER STEPSIZE MAX_ITER ITER BETA1 BETA2
// Prints the float and the double rate, then the float and the double correction (%a).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace caffe {

template <typename Dtype>
Dtype rate(const char* policy, float base_lr, float gamma, float power, int stepsize,
           int max_iter, int iter) {
  Dtype rate = 0;
  if (!strcmp(policy, "fixed")) {
    rate = base_lr;
  } else if (!strcmp(policy, "step")) {
    int current_step = iter / stepsize;
    rate = base_lr * pow(gamma, current_step);
  } else if (!strcmp(policy, "exp")) {
    rate = base_lr * pow(gamma, iter);
  } else if (!strcmp(policy, "inv")) {
    rate = base_lr * pow(Dtype(1) + gamma * iter, - power);
  } else if (!strcmp(policy, "poly")) {
    rate = base_lr * pow(Dtype(1.) - (Dtype(iter) / Dtype(max_iter)), power);
  } else if (!strcmp(policy, "sigmoid")) {
    rate = base_lr * (Dtype(1.) / (Dtype(1.) + exp(-gamma * (Dtype(iter) - Dtype(stepsize)))));
  }
  return rate;
}

template <typename Dtype>
Dtype correction(float momentum, float momentum2, int iter) {
  const Dtype beta1 = momentum;
  const Dtype beta2 = momentum2;
  const int t = iter + 1;
  return std::sqrt(Dtype(1) - pow(beta2, t)) / (Dtype(1.) - pow(beta1, t));
}

}  // namespace caffe

using caffe::correction;
using caffe::rate;

int main(int argc, char** argv) {
  if (argc < 10) return 2;
  const float base_lr = strtof(argv[2], NULL), gamma = strtof(argv[3], NULL);
  const float power = strtof(argv[4], NULL);
  const int stepsize = atoi(argv[5]), max_iter = atoi(argv[6]), iter = atoi(argv[7]);
  const float beta1 = strtof(argv[8], NULL), beta2 = strtof(argv[9], NULL);
  printf("%a\n", (double)rate<float>(argv[1], base_lr, gamma, power, stepsize, max_iter, iter));
  printf("%a\n", rate<double>(argv[1], base_lr, gamma, power, stepsize, max_iter, iter));
  printf("%a\n", (double)correction<float>(beta1, beta2, iter));
  printf("%a\n", correction<double>(beta1, beta2, iter));
  return 0;
}
