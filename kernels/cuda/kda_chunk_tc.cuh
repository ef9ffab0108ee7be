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
  // Streamed mode (both kernels run at once over the whole range): int32 [chunks][H]
  // flags the intra kernel sets once an item is written (zeroed before the launches);
  // null if unused.
  int32_t* ready;
};

// Release / acquire of the per-item ready flags. The item is written by the generic
// proxy and read by bulk copies (the async proxy): both sides fence the proxies.
__device__ __forceinline__ void FenceProxyAsyncGlobal() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }
__device__ __forceinline__ void StoreRelease(int32_t* p, int32_t v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int32_t LoadAcquire(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

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
// Registers and static shared memory of the intra kernel and the wgmma state kernel, their
// dynamic shared memory and threads per CTA (streamed mode needs one of each to fit on an SM).
cudaError_t IntraAttributes(cudaFuncAttributes* attr, int* dynamic_smem, int* threads);
cudaError_t StateAttributes(cudaFuncAttributes* attr, int* dynamic_smem, int* threads);

}  // namespace kl::cuda::internal::tc

#endif  // KL_KERNELS_CUDA_KDA_CHUNK_TC_CUH_
