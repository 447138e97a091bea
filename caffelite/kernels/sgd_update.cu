// Fused solver updates (Caffe's solvers/*_solver.cu; mirrors caffelite/solver.py).
//
// One kernel per solver type does, per element, what Solver.apply_update does for one
// learnable blob after gradient clipping, in the same order of float operations:
//   normalize:  g = g * iter_scale                 (iter_scale = 1/iter_size, in T; 1 is exact)
//   regularize: g = g + local_decay * w            (regularization 1 = L2)
//               g = g + local_decay * sign(w)      (regularization 2 = L1; 0 = none)
//   update:     the solver's rule, writing the update value into g (Caffe leaves it
//               in the diff) and its history;
//   Net::Update w = w - g.
// All scalars are computed by the caller in T exactly as solver.py computes them
// (local_rate = rate * lr_mult, local_decay = weight_decay * decay_mult, Adam's
// step = local_rate * sqrt(1 - b2^t) / (1 - b1^t)).
// sign(w) is Caffe's (0 < w) - (w < 0), so sign(NaN) = 0 here (numpy's is NaN).
//
// Every kernel's first parameter is the element count of its grid-stride loop.
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

__device__ __forceinline__ float sqrt_t(const float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_t(const double x) { return sqrt(x); }

template <typename T>
__device__ __forceinline__ T solver_gradient(const T g, const T w, const T iter_scale,
                                             const T local_decay, const int regularization) {
  T d = g * iter_scale;
  if (regularization == 1) {
    d += local_decay * w;
  } else if (regularization == 2) {
    d += local_decay * T((T(0) < w) - (w < T(0)));
  }
  return d;
}

// SGD with momentum: v = momentum*v + local_rate*g.
template <typename T>
__global__ void sgd_update(const int n, T* __restrict__ w, T* __restrict__ g,
                           T* __restrict__ h, const T iter_scale, const T local_decay,
                           const int regularization, const T momentum, const T local_rate) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T d = solver_gradient(g[i], w[i], iter_scale, local_decay, regularization);
    const T v = h[i] * momentum + local_rate * d;
    h[i] = v;
    g[i] = v;
    w[i] = w[i] - v;
  }
}

// Nesterov: v' = momentum*v + local_rate*g; update = (1 + momentum)*v' - momentum*v.
template <typename T>
__global__ void nesterov_update(const int n, T* __restrict__ w, T* __restrict__ g,
                                T* __restrict__ h, const T iter_scale, const T local_decay,
                                const int regularization, const T momentum,
                                const T local_rate) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T d = solver_gradient(g[i], w[i], iter_scale, local_decay, regularization);
    const T v_old = h[i];
    const T v = v_old * momentum + local_rate * d;
    h[i] = v;
    const T u = -momentum * v_old + (T(1) + momentum) * v;
    g[i] = u;
    w[i] = w[i] - u;
  }
}

// AdaGrad: H += g^2; update = local_rate * (g / (sqrt(H) + delta)).
template <typename T>
__global__ void adagrad_update(const int n, T* __restrict__ w, T* __restrict__ g,
                               T* __restrict__ h, const T iter_scale, const T local_decay,
                               const int regularization, const T delta, const T local_rate) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T d = solver_gradient(g[i], w[i], iter_scale, local_decay, regularization);
    const T hi = h[i] + d * d;
    h[i] = hi;
    const T u = local_rate * (d / (sqrt_t(hi) + delta));
    g[i] = u;
    w[i] = w[i] - u;
  }
}

// RMSProp: H = rms_decay*H + (1 - rms_decay)*g^2; update as AdaGrad.
template <typename T>
__global__ void rmsprop_update(const int n, T* __restrict__ w, T* __restrict__ g,
                               T* __restrict__ h, const T iter_scale, const T local_decay,
                               const int regularization, const T rms_decay, const T delta,
                               const T local_rate) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T d = solver_gradient(g[i], w[i], iter_scale, local_decay, regularization);
    const T hi = h[i] * rms_decay + (T(1) - rms_decay) * (d * d);
    h[i] = hi;
    const T u = local_rate * (d / (sqrt_t(hi) + delta));
    g[i] = u;
    w[i] = w[i] - u;
  }
}

// AdaDelta: H = m*H + (1-m)*g^2; g' = g*sqrt((U + delta)/(H + delta));
// U = m*U + (1-m)*g'^2; update = g' * local_rate.
template <typename T>
__global__ void adadelta_update(const int n, T* __restrict__ w, T* __restrict__ g,
                                T* __restrict__ h, T* __restrict__ u_hist,
                                const T iter_scale, const T local_decay,
                                const int regularization, const T momentum, const T delta,
                                const T local_rate) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T d = solver_gradient(g[i], w[i], iter_scale, local_decay, regularization);
    const T one_minus = T(1) - momentum;
    const T hi = h[i] * momentum + one_minus * (d * d);
    h[i] = hi;
    const T step = d * sqrt_t((delta + u_hist[i]) / (delta + hi));
    u_hist[i] = u_hist[i] * momentum + one_minus * (step * step);
    const T u = step * local_rate;
    g[i] = u;
    w[i] = w[i] - u;
  }
}

// Adam: m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; update = step * (m / (sqrt(v) + delta)).
// (solver.py's association; Caffe's adam_update.cu computes (step*m) / (...) instead.)
template <typename T>
__global__ void adam_update(const int n, T* __restrict__ w, T* __restrict__ g,
                            T* __restrict__ m, T* __restrict__ v, const T iter_scale,
                            const T local_decay, const int regularization, const T beta1,
                            const T beta2, const T delta, const T step) {
  CAFFELITE_KERNEL_LOOP(i, n) {
    const T d = solver_gradient(g[i], w[i], iter_scale, local_decay, regularization);
    const T mi = m[i] * beta1 + (T(1) - beta1) * d;
    const T vi = v[i] * beta2 + (T(1) - beta2) * (d * d);
    m[i] = mi;
    v[i] = vi;
    const T u = step * (mi / (sqrt_t(vi) + delta));
    g[i] = u;
    w[i] = w[i] - u;
  }
}
