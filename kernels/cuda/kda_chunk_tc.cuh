// Shared by the three translation units of the tensor-core chunked KDA prefill
// (internal to //kernels/cuda): kda_chunk_tc.cu (launcher, chunk offsets, the
// segmented intra/state pipeline), kda_chunk_tc_intra.cu (intra-chunk kernel) and
// kda_chunk_tc_state.cu (state kernels). Layout of the per-(chunk, head) item: see
// kda_chunk_internal.h.
#ifndef KL_KERNELS_CUDA_KDA_CHUNK_TC_CUH_
#define KL_KERNELS_CUDA_KDA_CHUNK_TC_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/kda_chunk_internal.h"

namespace kl::cuda::internal::tc {

using bf16 = __nv_bfloat16;
constexpr int kK = 128, kV = 128, kC = kChunk;

struct TcArgs {
  const bf16 *q, *k, *v, *f, *b;
  const float *a_log, *dt_bias;
  const int64_t* cu;
  const int32_t* offs;  // [N+1] chunk offsets
  const int32_t* slots;
  float* state_pool;
  bf16* o;
  unsigned char* items;
  // Segmented pipeline: fp32 [2][N][H][K][V] states carried between the state
  // launches of consecutive chunk ranges (index = segment parity); null if unused.
  float* carry;
  int N, H, num_slots;
  float scale;
  // This launch covers the global chunks [c0, c1) (intra: grid.y = c1 - c0);
  // `seg` is the segment's index (carry parity).
  int c0, c1, seg;
  int stop_after;  // experiment: intra kernel returns after this phase (7 = run all)
};

// Sequence of global chunk c: the n with offs[n] <= c < offs[n+1] (offs non-decreasing).
__device__ __forceinline__ int FindSeq(const int32_t* offs, int N, int c) {
  int lo = 0, hi = N - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (offs[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Launchers (each sets its kernel's shared-memory attribute once).
cudaError_t LaunchIntra(const TcArgs& a, cudaStream_t stream);
// alone (wgmma only): request shared memory so that no intra CTA fits beside a state CTA.
cudaError_t LaunchState(const TcArgs& a, bool wgmma, bool alone, cudaStream_t stream);

}  // namespace kl::cuda::internal::tc

#endif  // KL_KERNELS_CUDA_KDA_CHUNK_TC_CUH_
