// MLA paged latent cache: write the new rows of a varlen batch (fp32 -> cache dtype)
// and gather each sequence's cached rows into a packed fp32 buffer.
// Both kernels: one warp per packed row (4 per 128-thread CTA); the warp finds its
// sequence by binary search over cu_seqlens (device), then copies the row with
// coalesced lane-strided accesses. Rows are a few KB: these are bandwidth-trivial next
// to the attention, so the code stays simple.
#include <cuda_bf16.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/mla_device.cuh"
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda {
namespace {

using mla::CacheView;

constexpr int kWarpsPerCta = 4;

__device__ __forceinline__ void StoreElem(float* p, float x) { *p = x; }
__device__ __forceinline__ void StoreElem(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ float LoadElem(const float* p) { return *p; }
__device__ __forceinline__ float LoadElem(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <class T>
__global__ void __launch_bounds__(32 * kWarpsPerCta)
    MlaCacheWriteKernel(const CacheView c, const float* __restrict__ rows,
                        const int64_t* __restrict__ cu, const int32_t* __restrict__ start_pos,
                        int64_t num_seqs, int64_t num_tokens) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= num_tokens) return;
  const int64_t n = mla::FindSeq(cu, num_seqs, t);
  if (n < 0) return;
  const int64_t pos = static_cast<int64_t>(start_pos[n]) + (t - cu[n]);
  const int64_t phys = mla::PhysRow(c, n, pos);
  if (phys < 0) return;  // no page reserved for this position: dropped (documented)
  T* dst = static_cast<T*>(const_cast<void*>(c.pool)) + phys * c.row_dim;
  const float* src = rows + t * c.row_dim;
  for (int64_t d = lane; d < c.row_dim; d += 32) StoreElem(dst + d, src[d]);
}

template <class T>
__global__ void __launch_bounds__(32 * kWarpsPerCta)
    MlaCacheGatherKernel(const CacheView c, const int64_t* __restrict__ cu, int64_t num_seqs,
                         int64_t num_rows, int64_t first_row, float* __restrict__ out) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= num_rows) return;
  const int64_t n = mla::FindSeq(cu, num_seqs, t);
  const int64_t phys = n < 0 ? -1 : mla::PhysRow(c, n, first_row + t - cu[n]);
  float* dst = out + t * c.row_dim;
  if (phys < 0) {  // no page: a zero row (every output row is written)
    for (int64_t d = lane; d < c.row_dim; d += 32) dst[d] = 0.0f;
    return;
  }
  const T* src = static_cast<const T*>(c.pool) + phys * c.row_dim;
  for (int64_t d = lane; d < c.row_dim; d += 32) dst[d] = LoadElem(src + d);
}

unsigned GridFor(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerCta - 1) / kWarpsPerCta);
}

}  // namespace

absl::Status MlaCacheWrite(const MlaCacheWriteParams& p, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("MlaCacheWrite: num_seqs=", p.num_seqs, " num_tokens=", p.num_tokens));
  }
  if (p.num_seqs == 0 || p.num_tokens == 0) return absl::OkStatus();
  if (p.num_tokens / kWarpsPerCta >= INT32_MAX) {
    return absl::InvalidArgumentError("MlaCacheWrite: num_tokens too large");
  }
  if (absl::Status s = mla::ValidateCache(p.cache); !s.ok()) return s;
  if (!p.rows || !p.cu_seqlens || !p.start_pos) {
    return absl::InvalidArgumentError("MlaCacheWrite: null tensor pointer");
  }
  const CacheView c = mla::View(p.cache);
  if (p.cache.dtype == DType::kF32) {
    LaunchPdl(MlaCacheWriteKernel<float>, GridFor(p.num_tokens), 32 * kWarpsPerCta, 0, stream, c,
              p.rows, p.cu_seqlens, p.start_pos, p.num_seqs, p.num_tokens);
  } else {
    LaunchPdl(MlaCacheWriteKernel<__nv_bfloat16>, GridFor(p.num_tokens), 32 * kWarpsPerCta, 0,
              stream, c, p.rows, p.cu_seqlens, p.start_pos, p.num_seqs, p.num_tokens);
  }
  return CudaStatus(cudaGetLastError(), "MlaCacheWrite launch");
}

absl::Status MlaCacheGather(const MlaCacheGatherParams& p, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_rows < 0 || p.first_row < 0) {
    return absl::InvalidArgumentError(absl::StrCat("MlaCacheGather: num_seqs=", p.num_seqs,
                                                   " num_rows=", p.num_rows,
                                                   " first_row=", p.first_row));
  }
  if (p.num_seqs == 0 || p.num_rows == 0) return absl::OkStatus();
  if (p.num_rows / kWarpsPerCta >= INT32_MAX) {
    return absl::InvalidArgumentError("MlaCacheGather: num_rows too large");
  }
  if (absl::Status s = mla::ValidateCache(p.cache); !s.ok()) return s;
  if (!p.kv_cu_seqlens || !p.out) {
    return absl::InvalidArgumentError("MlaCacheGather: null tensor pointer");
  }
  const CacheView c = mla::View(p.cache);
  if (p.cache.dtype == DType::kF32) {
    LaunchPdl(MlaCacheGatherKernel<float>, GridFor(p.num_rows), 32 * kWarpsPerCta, 0, stream, c,
              p.kv_cu_seqlens, p.num_seqs, p.num_rows, p.first_row, p.out);
  } else {
    LaunchPdl(MlaCacheGatherKernel<__nv_bfloat16>, GridFor(p.num_rows), 32 * kWarpsPerCta, 0,
              stream, c, p.kv_cu_seqlens, p.num_seqs, p.num_rows, p.first_row, p.out);
  }
  return CudaStatus(cudaGetLastError(), "MlaCacheGather launch");
}

}  // namespace kl::cuda
