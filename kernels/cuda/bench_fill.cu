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

// One thread per float4; blocks cover one slot's quarter-rows in order, so
// every block streams a contiguous 16 KiB (as a decode block does).
__global__ void TouchKernel(float4* pool, const int32_t* slots, int64_t per_slot, float scale) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t n = i / per_slot, j = i % per_slot;
  float4* p = pool + static_cast<int64_t>(slots[n]) * per_slot + j;
  float4 x = *p;
  x.x *= scale; x.y *= scale; x.z *= scale; x.w *= scale;
  *p = x;
}

// No-math touches of K = V = 128 states, grid (4, H, N), 128 threads per block, each
// reading 8 float4 and writing them back:
//  - row-major slices: block = one 32-column slice of a head's row-major [K][V] state,
//    thread (warp w, lane = 8 kg + vq) rows 32 w + kg + 4 i, columns 4 vq .. + 3 (the
//    decode kernel's mapping over the layout used before kda_state_layout.h: 128 B of
//    every 512-B row);
//  - contiguous: block = a contiguous quarter (16 KB) of the head's state, float4
//    tid + 128 i (the bytes a decode block owns in the pool layout).
template <bool kContiguous>
__global__ void __launch_bounds__(128) TouchHeadQuartersKernel(float* pool, const int32_t* slots, int H,
                                                               float scale) {
  constexpr int K = 128, V = 128;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, kg = lane >> 3, vq = lane & 7;
  float* head = pool + (static_cast<int64_t>(slots[blockIdx.z]) * H + blockIdx.y) * K * V;
  auto at = [&](int i) -> float4* {
    if constexpr (kContiguous) return reinterpret_cast<float4*>(head) + blockIdx.x * 1024 + tid + 128 * i;
    return reinterpret_cast<float4*>(head + (warp * 32 + kg + 4 * i) * V + blockIdx.x * 32 + vq * 4);
  };
  float4 x[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = *at(i);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    x[i].x *= scale; x[i].y *= scale; x[i].z *= scale; x[i].w *= scale;
    *at(i) = x[i];
  }
}

}  // namespace

cudaError_t TouchDecodePattern(float* pool, const int32_t* slots, int64_t n, int64_t heads, bool contiguous,
                               cudaStream_t stream) {
  if (n <= 0 || heads <= 0) return cudaErrorInvalidValue;
  const dim3 grid(4, static_cast<unsigned>(heads), static_cast<unsigned>(n));
  if (contiguous) {
    TouchHeadQuartersKernel<true><<<grid, 128, 0, stream>>>(pool, slots, static_cast<int>(heads), 1.0f);
  } else {
    TouchHeadQuartersKernel<false><<<grid, 128, 0, stream>>>(pool, slots, static_cast<int>(heads), 1.0f);
  }
  return cudaGetLastError();
}

cudaError_t TouchSlots(float* pool, const int32_t* slots, int64_t n, int64_t slot_floats,
                       float scale, cudaStream_t stream) {
  const int64_t per_slot = slot_floats / 4;
  const int threads = 256;
  if (n <= 0 || per_slot <= 0 || (n * per_slot) % threads != 0) return cudaErrorInvalidValue;
  const int64_t blocks = n * per_slot / threads;
  TouchKernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(reinterpret_cast<float4*>(pool),
                                                                     slots, per_slot, scale);
  return cudaGetLastError();
}

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
