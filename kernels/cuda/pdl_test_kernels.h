// Test kernels for programmatic dependent launch (pdl_test.cc): a slow producer and a
// consumer launched with LaunchPdl, which must see the producer's write.
#ifndef KL_KERNELS_CUDA_PDL_TEST_KERNELS_H_
#define KL_KERNELS_CUDA_PDL_TEST_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace kl::cuda::testing {

// Launches, on `stream`, `rounds` pairs (both with LaunchPdl):
//   producer i: one CTA spins `spin_ns`, then writes value[0] = i + 1 and records its
//               end time (globaltimer) in t_end[i];
//   consumer i: 32 CTAs record their start time (before PdlWait: test only, the buffer
//               is theirs alone) in t_start[i * 32 + cta], wait, then copy value[0]
//               into seen[i * 32 + cta].
// seen must read i + 1 everywhere; with PDL enabled the consumers start before their
// producer ends.
cudaError_t LaunchPdlPairs(int rounds, int64_t spin_ns, int32_t* value, int32_t* seen,
                           uint64_t* t_end, uint64_t* t_start, cudaStream_t stream);

}  // namespace kl::cuda::testing

#endif  // KL_KERNELS_CUDA_PDL_TEST_KERNELS_H_
