// Conversions between the canonical [H][K][V] KDA state and the sliced pool layout
// (kda_state_layout.h). One thread per float4: four consecutive values of a row stay
// consecutive in both layouts (W is a multiple of 4 whenever it differs from V).
#include "kernels/cuda/kda_state_layout.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"

namespace kl::cuda {
namespace {

template <bool kToPool>
__global__ void __launch_bounds__(256) PermuteKernel(const float4* __restrict__ src,
                                                     float4* __restrict__ dst, int64_t n4,
                                                     int64_t K, int64_t V) {
  const int64_t kv4 = K * V / 4;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t head = i / kv4, r = i % kv4;
    const int64_t d = r / (V / 4), v = (r % (V / 4)) * 4;
    const int64_t pool4 = head * kv4 + KdaStateOffset(d, v, K, V) / 4;
    if constexpr (kToPool) {
      dst[pool4] = src[i];
    } else {
      dst[i] = src[pool4];
    }
  }
}

absl::Status Check(const float* a, const float* b, int64_t heads, int64_t K, int64_t V) {
  if (heads < 0 || K < 1 || V < 1) {
    return absl::InvalidArgumentError(absl::StrCat("KDA state shape: ", heads, " x ", K, " x ", V));
  }
  if (heads > 0 && (a == nullptr || b == nullptr)) {
    return absl::InvalidArgumentError("KDA state conversion: null pointer");
  }
  return absl::OkStatus();
}

template <bool kToPool>
absl::Status Permute(const float* src, int64_t heads, int64_t K, int64_t V, float* dst,
                     cudaStream_t stream) {
  if (absl::Status s = Check(src, dst, heads, K, V); !s.ok()) return s;
  if (heads == 0) return absl::OkStatus();
  const int64_t bytes = heads * K * V * int64_t{sizeof(float)};
  if (KdaStateSliceWidth(V) == V) {  // the two layouts coincide
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream),
                      "KdaState copy");
  }
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    return absl::InvalidArgumentError("KDA state conversion: pointers not 16-byte aligned");
  }
  const int64_t n4 = bytes / 16;
  const int64_t blocks = std::min<int64_t>((n4 + 255) / 256, 8192);
  PermuteKernel<kToPool><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      reinterpret_cast<const float4*>(src), reinterpret_cast<float4*>(dst), n4, K, V);
  return CudaStatus(cudaGetLastError(), "KdaState permute launch");
}

template <bool kToPool>
void PermuteHost(const float* src, int64_t heads, int64_t K, int64_t V, float* dst) {
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t base = h * K * V;
    for (int64_t d = 0; d < K; ++d) {
      for (int64_t v = 0; v < V; ++v) {
        const int64_t canonical = base + d * V + v, pool = base + KdaStateOffset(d, v, K, V);
        if constexpr (kToPool) {
          dst[pool] = src[canonical];
        } else {
          dst[canonical] = src[pool];
        }
      }
    }
  }
}

}  // namespace

absl::Status KdaStateToPool(const float* canonical, int64_t heads, int64_t K, int64_t V,
                            float* pool, cudaStream_t stream) {
  return Permute<true>(canonical, heads, K, V, pool, stream);
}

absl::Status KdaStateFromPool(const float* pool, int64_t heads, int64_t K, int64_t V,
                              float* canonical, cudaStream_t stream) {
  return Permute<false>(pool, heads, K, V, canonical, stream);
}

void KdaStateToPoolHost(const float* canonical, int64_t heads, int64_t K, int64_t V, float* pool) {
  PermuteHost<true>(canonical, heads, K, V, pool);
}

void KdaStateFromPoolHost(const float* pool, int64_t heads, int64_t K, int64_t V,
                          float* canonical) {
  PermuteHost<false>(pool, heads, K, V, canonical);
}

}  // namespace kl::cuda
