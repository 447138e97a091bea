// A stand-in for libcublas with the C prototypes of the five cuBLAS calls that
// caffelite.kernels.cublas makes (cublas_api.h: handles and streams are pointers,
// enums are int, sizes size_t). It computes cublasGemmEx by the definition, column-major,
// on host memory, so tests/test_cublas_gemm.py can run the real ctypes calls, with
// their declared argument types, without a GPU.
#include <cstddef>
#include <cstdio>

namespace {
int handle_state;
void* last_stream = reinterpret_cast<void*>(-1);
void* last_workspace = nullptr;
size_t last_workspace_bytes = 0;
int last_compute = -1;
int gemm_calls = 0;

const int kInvalidValue = 7;

template <typename T>
int gemm(int transa, int transb, int m, int n, int k, const void* alpha_p, const void* a_p,
         int lda, const void* b_p, int ldb, const void* beta_p, void* c_p, int ldc) {
  const T alpha = *static_cast<const T*>(alpha_p), beta = *static_cast<const T*>(beta_p);
  const T* a = static_cast<const T*>(a_p);
  const T* b = static_cast<const T*>(b_p);
  T* c = static_cast<T*>(c_p);
  const int a_rows = transa == 0 ? m : k, b_rows = transb == 0 ? k : n;
  if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
      ldc < (m > 1 ? m : 1))
    return kInvalidValue;
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      double sum = 0;
      for (int p = 0; p < k; ++p) {
        const double x = transa == 0 ? a[i + p * lda] : a[p + i * lda];
        const double y = transb == 0 ? b[p + j * ldb] : b[j + p * ldb];
        sum += x * y;
      }
      double value = static_cast<double>(alpha) * sum;
      if (beta != 0) value += static_cast<double>(beta) * c[i + j * ldc];
      c[i + j * ldc] = static_cast<T>(value);
    }
  }
  return 0;
}
}  // namespace

extern "C" {
int cublasCreate_v2(void** handle) {
  *handle = &handle_state;
  return 0;
}

int cublasSetStream_v2(void* handle, void* stream) {
  if (handle != &handle_state) return kInvalidValue;
  last_stream = stream;
  last_workspace = nullptr;      // cuBLAS resets the workspace with the stream
  last_workspace_bytes = 0;
  return 0;
}

int cublasSetWorkspace_v2(void* handle, void* workspace, size_t bytes) {
  if (handle != &handle_state) return kInvalidValue;
  last_workspace = workspace;
  last_workspace_bytes = bytes;
  return 0;
}

const char* cublasGetStatusString(int status) {
  return status == kInvalidValue ? "CUBLAS_STATUS_INVALID_VALUE" : "CUBLAS_STATUS_OTHER";
}

int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k,
                 const void* alpha, const void* a, int a_type, int lda, const void* b,
                 int b_type, int ldb, const void* beta, void* c, int c_type, int ldc,
                 int compute_type, int algo) {
  if (handle != &handle_state || algo != -1 || a_type != c_type || b_type != c_type ||
      (transa != 0 && transa != 1) || (transb != 0 && transb != 1) || m < 0 || n < 0 ||
      k < 0)
    return kInvalidValue;
  ++gemm_calls;
  last_compute = compute_type;
  if (c_type == 0 && (compute_type == 68 || compute_type == 77))   // CUDA_R_32F
    return gemm<float>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (c_type == 1 && compute_type == 70)                           // CUDA_R_64F
    return gemm<double>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  return kInvalidValue;
}

// For the tests: what the last calls set.
void* fake_last_stream() { return last_stream; }
void* fake_last_workspace() { return last_workspace; }
size_t fake_last_workspace_bytes() { return last_workspace_bytes; }
int fake_last_compute() { return last_compute; }
int fake_gemm_calls() { return gemm_calls; }
}
