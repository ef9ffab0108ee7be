// Shared by the CUDA benchmarks (kda_bench, mla_bench, moe_bench): error macros,
// event timing (median over batches), and the ceilings every benchmark reports
// its figures against — D2D copy bandwidth (read + write counted) and a cuBLAS
// bf16 GEMM — measured in the same run.
#ifndef KL_KERNELS_CUDA_BENCH_UTIL_H_
#define KL_KERNELS_CUDA_BENCH_UTIL_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cuda/bench_fill.h"
#include "kernels/cuda/kda_test_util.h"

#define BENCH_CHECK(expr)                                                                      \
  do {                                                                                         \
    const cudaError_t e_ = (expr);                                                             \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      return false;                                                                            \
    }                                                                                          \
  } while (0)
#define BENCH_STATUS(expr)                                                           \
  do {                                                                               \
    const absl::Status s_ = (expr);                                                  \
    if (!s_.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      return false;                                                                  \
    }                                                                                \
  } while (0)

namespace kl::cuda::bench {

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median over `batches` of (event time of `per_batch` calls) / per_batch, in ms.
inline bool TimeMs(const std::function<bool(int)>& call, int per_batch, int batches, int warmup,
                   cudaStream_t s, double* ms) {
  for (int i = 0; i < warmup; ++i) {
    if (!call(i)) return false;
  }
  cudaEvent_t a, b;
  BENCH_CHECK(cudaEventCreate(&a));
  BENCH_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  int idx = warmup;
  for (int r = 0; r < batches; ++r) {
    BENCH_CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < per_batch; ++i) {
      if (!call(idx++)) return false;
    }
    BENCH_CHECK(cudaEventRecord(b, s));
    BENCH_CHECK(cudaEventSynchronize(b));
    float e = 0;
    BENCH_CHECK(cudaEventElapsedTime(&e, a, b));
    t.push_back(e / per_batch);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  *ms = Median(t);
  return true;
}

struct Ceilings {
  double copy_tbs = 0, gemm_tflops = 0;
};

// D2D copy of 1 GiB; bytes read + written per second.
inline bool MeasureCopy(cudaStream_t s, bool quick, double* copy_tbs) {
  const size_t bytes = size_t{1} << 30;
  testing::DeviceBuffer src(bytes), dst(bytes);
  if (!src.ok() || !dst.ok()) return false;
  BENCH_CHECK(FillUniform(src.get(), bytes / 4, false, -1, 1, 1, s));
  double ms = 0;
  if (!TimeMs([&](int) {
        return cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, s) ==
               cudaSuccess;
      }, 1, quick ? 5 : 15, 3, s, &ms)) {
    return false;
  }
  *copy_tbs = 2.0 * bytes / (ms * 1e-3) / 1e12;
  std::printf("copy D2D %zu MiB: %.3f ms -> %.3f TB/s (read + write)\n", bytes >> 20, ms,
              *copy_tbs);
  return true;
}

// Copy bandwidth and a cuBLAS bf16 8192^3 GEMM (fp32 accumulation) on `h`.
inline bool MeasureCeilings(cudaStream_t s, cublasHandle_t h, bool quick, Ceilings* c) {
  if (!MeasureCopy(s, quick, &c->copy_tbs)) return false;
  const int n = 8192;
  testing::DeviceBuffer A(size_t{n} * n * 2), B(size_t{n} * n * 2), C(size_t{n} * n * 2);
  if (!A.ok() || !B.ok() || !C.ok()) return false;
  BENCH_CHECK(FillUniform(A.get(), int64_t{n} * n, true, -1, 1, 2, s));
  BENCH_CHECK(FillUniform(B.get(), int64_t{n} * n, true, -1, 1, 3, s));
  if (cublasSetStream(h, s) != CUBLAS_STATUS_SUCCESS) return false;
  const float alpha = 1.0f, beta = 0.0f;
  auto gemm = [&](int) {
    return cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, A.get(), CUDA_R_16BF, n,
                        B.get(), CUDA_R_16BF, n, &beta, C.get(), CUDA_R_16BF, n,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
  };
  double ms = 0;
  if (!TimeMs(gemm, 1, quick ? 5 : 15, 3, s, &ms)) return false;
  c->gemm_tflops = 2.0 * n * n * double(n) / (ms * 1e-3) / 1e12;
  std::printf("cuBLAS bf16 GEMM %d^3 (fp32 accumulate): %.3f ms -> %.1f TFLOP/s\n", n, ms,
              c->gemm_tflops);
  return true;
}

// The same with a handle of its own.
inline bool MeasureCeilings(cudaStream_t s, bool quick, Ceilings* c) {
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return false;
  const bool ok = MeasureCeilings(s, h, quick, c);
  cublasDestroy(h);
  return ok;
}

}  // namespace kl::cuda::bench

#endif  // KL_KERNELS_CUDA_BENCH_UTIL_H_
