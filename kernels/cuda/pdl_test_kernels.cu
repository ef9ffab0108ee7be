#include "kernels/cuda/pdl_test_kernels.h"

#include "kernels/cuda/pdl.cuh"

namespace kl::cuda::testing {
namespace {

__device__ __forceinline__ uint64_t GlobalTimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void ProducerKernel(int32_t i, int64_t spin_ns, int32_t* value, uint64_t* t_end) {
  PdlBegin();
  const uint64_t t0 = GlobalTimer();
  while (GlobalTimer() - t0 < static_cast<uint64_t>(spin_ns)) {
  }
  *value = i + 1;
  t_end[i] = GlobalTimer();
}

__global__ void ConsumerKernel(int32_t i, const int32_t* value, int32_t* seen, uint64_t* t_start) {
  if (threadIdx.x == 0) t_start[i * 32 + blockIdx.x] = GlobalTimer();
  PdlBegin();
  if (threadIdx.x == 0) seen[i * 32 + blockIdx.x] = *value;
}

}  // namespace

cudaError_t LaunchPdlPairs(int rounds, int64_t spin_ns, int32_t* value, int32_t* seen,
                           uint64_t* t_end, uint64_t* t_start, cudaStream_t stream) {
  for (int i = 0; i < rounds; ++i) {
    cudaError_t e = LaunchPdl(ProducerKernel, 1, 32, 0, stream, i, spin_ns, value, t_end);
    if (e != cudaSuccess) return e;
    e = LaunchPdl(ConsumerKernel, 32, 32, 0, stream, i, value, seen, t_start);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace kl::cuda::testing
