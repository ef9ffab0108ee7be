// Layout of a KDA recurrent state in a CUDA state pool, and conversions to and from
// the canonical layout of the CPU engine and the StateBundle.
//
// Canonical (kernels/cpu, engine/state, the bundle): fp32 [H][K][V], S[d][v] at d * V + v.
// Device pool ("sliced"): fp32 [H][V / W][K][W] with slice width W = 32 when V is a
// multiple of 32 (else W = V, which is the canonical layout): S[d][v] of a head at
//   (v / W) * K * W + d * W + v % W.
// Each 32-column slice of a head is one contiguous 16 KB block (K = 128), which is what
// a decode block owns (kda_decode.cu): its loads and stores are 512 contiguous bytes per
// warp instruction instead of 128 bytes out of every 512-byte row, and its block's bytes
// are one contiguous range (docs/benchmarks.md, session 10: 64 sequences 89.6-90.3% ->
// 93.4-93.7% of copy on an H100, 85.2-85.6% -> 87.1-87.6% on an H200). Every CUDA kernel that reads or writes a pool (decode, both chunk
// prefill paths) uses this layout; the CUDA backend converts at its host boundary
// (BindStates, SyncStateToHost, SyncLayerToHost). Device-to-device transports move the
// bytes as they are, between peers whose layout tags agree (cuda_device_state.cc).
#ifndef KL_KERNELS_CUDA_KDA_STATE_LAYOUT_H_
#define KL_KERNELS_CUDA_KDA_STATE_LAYOUT_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

#if defined(__CUDACC__)
#define KL_HD __host__ __device__ __forceinline__
#else
#define KL_HD inline
#endif

namespace kl::cuda {

// Slice width W of the pool layout for value dimension V.
KL_HD constexpr int64_t KdaStateSliceWidth(int64_t V) { return V % 32 == 0 ? 32 : V; }

// Offset of S[d][v] inside one head's K * V floats of a pool.
KL_HD constexpr int64_t KdaStateOffset(int64_t d, int64_t v, int64_t K, int64_t V) {
  return (v / KdaStateSliceWidth(V)) * K * KdaStateSliceWidth(V) + d * KdaStateSliceWidth(V) +
         v % KdaStateSliceWidth(V);
}

// `heads` consecutive [K][V] states (e.g. the H heads of one slot) between the two layouts,
// on `stream`. src and dst are device memory, do not overlap, and are 16-byte aligned.
absl::Status KdaStateToPool(const float* canonical, int64_t heads, int64_t K, int64_t V,
                            float* pool, cudaStream_t stream);
absl::Status KdaStateFromPool(const float* pool, int64_t heads, int64_t K, int64_t V,
                              float* canonical, cudaStream_t stream);

// Host versions (tests, tools): the same permutations of host memory.
void KdaStateToPoolHost(const float* canonical, int64_t heads, int64_t K, int64_t V, float* pool);
void KdaStateFromPoolHost(const float* pool, int64_t heads, int64_t K, int64_t V,
                          float* canonical);

}  // namespace kl::cuda

#undef KL_HD

#endif  // KL_KERNELS_CUDA_KDA_STATE_LAYOUT_H_
