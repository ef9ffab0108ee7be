// Device-side random fill for benchmarks (GBs of inputs in milliseconds).
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/bench_fill.h"

namespace kl::cuda {
namespace {

__device__ __forceinline__ float HashUniform(uint64_t i, uint64_t seed) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + seed * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
}

template <class T>
__global__ void FillKernel(T* p, int64_t n, float lo, float hi, uint64_t seed, int log_mode) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x = lo + (hi - lo) * HashUniform(i, seed);
    if (log_mode) x = logf(x);
    if constexpr (sizeof(T) == 2) p[i] = __float2bfloat16_rn(x); else p[i] = x;
  }
}

}  // namespace

cudaError_t FillUniform(void* p, int64_t n, bool bf16, float lo, float hi, uint64_t seed,
                        cudaStream_t stream, bool log_of_uniform) {
  const int blocks = 1024, threads = 256;
  if (bf16) {
    FillKernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(static_cast<__nv_bfloat16*>(p), n, lo,
                                                              hi, seed, log_of_uniform);
  } else {
    FillKernel<float><<<blocks, threads, 0, stream>>>(static_cast<float*>(p), n, lo, hi, seed,
                                                      log_of_uniform);
  }
  return cudaGetLastError();
}

}  // namespace kl::cuda
