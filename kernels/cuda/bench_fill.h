// Device-side random fill used by the KDA benchmark (not by the kernels).
#ifndef KL_KERNELS_CUDA_BENCH_FILL_H_
#define KL_KERNELS_CUDA_BENCH_FILL_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace kl::cuda {

// p[i] = lo + (hi - lo) * u_i (u_i uniform in [0, 1) from a hash of (i, seed)), or
// log of that when log_of_uniform; bf16 or fp32 elements.
cudaError_t FillUniform(void* p, int64_t n, bool bf16, float lo, float hi, uint64_t seed,
                        cudaStream_t stream, bool log_of_uniform = false);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_BENCH_FILL_H_
