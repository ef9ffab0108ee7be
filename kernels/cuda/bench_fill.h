// Device-side helpers of the KDA benchmark (not used by the kernels): random
// fill and an in-place read-and-write-back ceiling.
#ifndef KL_KERNELS_CUDA_BENCH_FILL_H_
#define KL_KERNELS_CUDA_BENCH_FILL_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace kl::cuda {

// p[i] = lo + (hi - lo) * u_i (u_i uniform in [0, 1) from a hash of (i, seed)), or
// log of that when log_of_uniform; bf16 or fp32 elements.
cudaError_t FillUniform(void* p, int64_t n, bool bf16, float lo, float hi, uint64_t seed,
                        cudaStream_t stream, bool log_of_uniform = false);

// The in-place ceiling of a state update: for each of the n slots in `slots`,
// every float of pool[slot * slot_floats ...] is read, scaled by `scale` (pass
// 1) and written back — the bytes a decode step over those slots must move,
// with no math. slot_floats a multiple of 4.
cudaError_t TouchSlots(float* pool, const int32_t* slots, int64_t n, int64_t slot_floats,
                       float scale, cudaStream_t stream);

// The same bytes (K = V = 128 states, slot_floats = heads * 128 * 128) with each block
// touching a contiguous 16 KB quarter of a head (`contiguous`: what a decode block owns
// in the pool layout, kda_state_layout.h), or one 32-column slice of a row-major
// [K][V] state (the decode kernel's mapping over the layout used before).
cudaError_t TouchDecodePattern(float* pool, const int32_t* slots, int64_t n, int64_t heads, bool contiguous,
                               cudaStream_t stream);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_BENCH_FILL_H_
