// MLA decode: the SIMT attention kernel (fp32 cache, or shapes the tensor-core kernel
// does not take) and the split-KV combine kernel. Launched by MlaDecodeAttention
// (mla_decode.cu); shared definitions in mla_device.cuh.
//  - SIMT: exact fp32 FFMA math (libm expf), grid (head group of 8, split, sequence),
//    32-row tiles converted to fp32 in shared memory (odd row stride), one warp per
//    head for the scores (lane = cache row), the [8][latent] accumulator in shared
//    memory.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/mla_device.cuh"
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda::mla {
namespace {

using namespace kl::cuda::dev;  // NOLINT

// ==================================== SIMT kernel =====================================

template <class T>
__global__ void __launch_bounds__(kSimtThreads) MlaDecodeSimtKernel(const DecodeArgs a) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  extern __shared__ float4 smem4[];
  const int D = a.dl + a.dr, dl = a.dl, ldt = D | 1;  // odd stride: lane-per-row reads conflict-free
  float* sQ = reinterpret_cast<float*>(smem4);      // [8][D]
  float* sT = sQ + kSimtHeads * D;                  // [32][ldt]
  float* sAcc = sT + kSimtRows * ldt;               // [8][dl]
  float* sP = sAcc + kSimtHeads * dl;               // [8][32]
  float* sAlpha = sP + kSimtHeads * kSimtRows;      // [8]
  float* sL = sAlpha + kSimtHeads;
  float* sM = sL + kSimtHeads;
  float* sOk = sM + kSimtHeads;                     // [32] (1.0 / 0.0)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int H = a.H, h0 = blockIdx.x * kSimtHeads, s_idx = blockIdx.y, S = a.S;
  const int64_t n = blockIdx.z;
  const SplitRange rg = RangeOf(a.seq_lens[n], S, s_idx);
  const int ntiles = static_cast<int>((rg.end - rg.begin + kSimtRows - 1) / kSimtRows);
  const T* pool = static_cast<const T*>(a.c.pool);

  for (int i = tid; i < kSimtHeads * D; i += kSimtThreads) {
    const int g = i / D, d = i - g * D;
    sQ[i] = h0 + g < H ? a.q[(n * H + h0 + g) * D + d] : 0.0f;
  }
  for (int i = tid; i < kSimtHeads * dl; i += kSimtThreads) sAcc[i] = 0.0f;
  const bool head_ok = h0 + warp < H;
  float m_run = -INFINITY, l_run = 0.0f;  // natural log domain, warp-uniform

  for (int t = 0; t < ntiles; ++t) {
    __syncthreads();  // previous tile's readers done (and sQ / sAcc init visible)
    for (int r = warp; r < kSimtRows; r += kSimtThreads / 32) {
      const int64_t pos = rg.begin + static_cast<int64_t>(t) * kSimtRows + r;
      const int64_t phys = pos < rg.end ? PhysRow32(a.c, n, static_cast<int>(pos)) : -1;
      if (phys >= 0) {
        const T* src = pool + phys * D;
        for (int d = lane; d < D; d += 32) sT[r * ldt + d] = ToF32(src[d]);
      } else {
        for (int d = lane; d < D; d += 32) sT[r * ldt + d] = 0.0f;
      }
      if (lane == 0) sOk[r] = phys >= 0 ? 1.0f : 0.0f;
    }
    __syncthreads();
    {  // warp = head, lane = row
      const float* qrow = sQ + warp * D;
      const float* trow = sT + lane * ldt;
      float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
      int d = 0;
      for (; d + 4 <= D; d += 4) {
        p0 = fmaf(qrow[d], trow[d], p0);
        p1 = fmaf(qrow[d + 1], trow[d + 1], p1);
        p2 = fmaf(qrow[d + 2], trow[d + 2], p2);
        p3 = fmaf(qrow[d + 3], trow[d + 3], p3);
      }
      for (; d < D; ++d) p0 = fmaf(qrow[d], trow[d], p0);
      const float sc = (head_ok && sOk[lane] != 0.0f) ? ((p0 + p1) + (p2 + p3)) * a.scale : -INFINITY;
      float mx = sc;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_run, mx);
      const float alpha = m_new == -INFINITY ? 1.0f : expf(m_run - m_new);
      const float p = sc == -INFINITY ? 0.0f : expf(sc - m_new);
      l_run = l_run * alpha + WarpSum(p);
      m_run = m_new;
      sP[warp * kSimtRows + lane] = p;
      if (lane == 0) sAlpha[warp] = alpha;
    }
    __syncthreads();
    for (int g = 0; g < kSimtHeads; ++g) {
      const float al = sAlpha[g];
      const float* pg = sP + g * kSimtRows;
      for (int d = tid; d < dl; d += kSimtThreads) {
        float acc = sAcc[g * dl + d] * al;
#pragma unroll 8
        for (int c = 0; c < kSimtRows; ++c) acc = fmaf(pg[c], sT[c * ldt + d], acc);
        sAcc[g * dl + d] = acc;
      }
    }
  }
  if (lane == 0) {
    sL[warp] = l_run;
    sM[warp] = m_run;
  }
  __syncthreads();
  for (int g = 0; g < kSimtHeads; ++g) {
    const int h = h0 + g;
    if (h >= H) break;
    if (S == 1) {
      const float inv = sL[g] > 0.0f ? 1.0f / sL[g] : 0.0f;
      for (int d = tid; d < dl; d += kSimtThreads) a.out[(n * H + h) * dl + d] = sAcc[g * dl + d] * inv;
    } else {
      float* dst = a.ws_o + ((n * S + s_idx) * H + h) * dl;
      for (int d = tid; d < dl; d += kSimtThreads) dst[d] = sAcc[g * dl + d];
      if (tid == 0) {
        a.ws_ml[((n * S + s_idx) * H + h) * 2] = sM[g];
        a.ws_ml[((n * S + s_idx) * H + h) * 2 + 1] = sL[g];
      }
    }
  }
}

// =================================== combine kernel ===================================
// out = sum_s w_s o_s with w_s = e^(m_s - M) / sum_s e^(m_s - M) l_s. Grid (head, sequence,
// 32 W-column slice), 256 threads = 8 split groups (warps) x 32 lanes of W columns
// (W = 4: one float4 per lane when dl % 4 == 0 and `out` is 8-byte aligned, else W = 1). At decode batch 1 this
// kernel is pure latency (one (sequence, head) has S partial rows spread over the
// workspace), so every thread issues kCombBatch partial loads before it needs a
// weight: the first batch is in flight while the block reduces the S (max, sum)
// pairs (one per thread, S <= kMlaMaxSplits = 256), and the groups meet in shared
// memory in a fixed order (deterministic).
constexpr int kCombThreads = 256, kCombGroups = kCombThreads / 32, kCombBatch = 8;
static_assert(kMlaMaxSplits <= kCombThreads, "one (max, sum) pair per thread");

template <int W>
struct CombVec;
template <>
struct CombVec<4> {
  using T = float4;
  static __device__ __forceinline__ T Zero() { return make_float4(0.f, 0.f, 0.f, 0.f); }
  static __device__ __forceinline__ void Fma(float w, const T& x, T& acc) {
    acc.x = fmaf(w, x.x, acc.x);
    acc.y = fmaf(w, x.y, acc.y);
    acc.z = fmaf(w, x.z, acc.z);
    acc.w = fmaf(w, x.w, acc.w);
  }
  static __device__ __forceinline__ void Add(const T& x, T& acc) {
    acc.x += x.x;
    acc.y += x.y;
    acc.z += x.z;
    acc.w += x.w;
  }
  static __device__ __forceinline__ void Store(float* p, const T& v) {  // out is 8-byte aligned
    reinterpret_cast<float2*>(p)[0] = make_float2(v.x, v.y);
    reinterpret_cast<float2*>(p)[1] = make_float2(v.z, v.w);
  }
};
template <>
struct CombVec<1> {
  using T = float;
  static __device__ __forceinline__ T Zero() { return 0.f; }
  static __device__ __forceinline__ void Fma(float w, const T& x, T& acc) { acc = fmaf(w, x, acc); }
  static __device__ __forceinline__ void Add(const T& x, T& acc) { acc += x; }
  static __device__ __forceinline__ void Store(float* p, const T& v) { *p = v; }
};

__device__ __forceinline__ float CombBlockReduce(float v, bool is_max, float* red) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `red` may still be read by the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kCombGroups; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

template <int W>
__global__ void __launch_bounds__(kCombThreads) MlaDecodeCombineKernel(const DecodeArgs a) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  using V = CombVec<W>;
  using T = typename V::T;
  __shared__ float sW[kMlaMaxSplits];
  __shared__ float sRed[kCombGroups];
  __shared__ T sAcc[kCombGroups][32];
  const int h = blockIdx.x, S = a.S, H = a.H, dl = a.dl, tid = threadIdx.x;
  const int grp = tid >> 5, lane = tid & 31;
  const int64_t n = blockIdx.y;
  const int d = (blockIdx.z * 32 + lane) * W;
  const bool col = d < dl;  // W = 4: dl % 4 == 0, so the whole vector is in range
  const int64_t split_stride = static_cast<int64_t>(H) * dl;
  const float* po = a.ws_o + (n * S * H + h) * static_cast<int64_t>(dl) + d;
  auto load = [&](int s) {
    return (col && s < S) ? *reinterpret_cast<const T*>(po + s * split_stride) : V::Zero();
  };
  T x[kCombBatch];
#pragma unroll
  for (int b = 0; b < kCombBatch; ++b) x[b] = load(grp + kCombGroups * b);

  const float* ml = a.ws_ml + (n * S * H + h) * 2;  // split s at ml[s * H * 2]
  float m_t = -INFINITY, l_t = 0.0f;
  if (tid < S) {
    m_t = ml[static_cast<int64_t>(tid) * H * 2];
    l_t = ml[static_cast<int64_t>(tid) * H * 2 + 1];
  }
  const float mx = CombBlockReduce(m_t, true, sRed);
  const float e = (mx == -INFINITY || m_t == -INFINITY) ? 0.0f : expf(m_t - mx);
  const float sum = CombBlockReduce(e * l_t, false, sRed);
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // padding / empty: zeros
  if (tid < S) sW[tid] = e * inv;
  __syncthreads();

  T acc = V::Zero();
  for (int base = 0; base < S; base += kCombGroups * kCombBatch) {
    if (base > 0) {
#pragma unroll
      for (int b = 0; b < kCombBatch; ++b) x[b] = load(base + grp + kCombGroups * b);
    }
#pragma unroll
    for (int b = 0; b < kCombBatch; ++b) {
      const int s = base + grp + kCombGroups * b;
      if (s < S) V::Fma(sW[s], x[b], acc);
    }
  }
  sAcc[grp][lane] = acc;
  __syncthreads();
  if (grp == 0 && col) {
    T r = sAcc[0][lane];
#pragma unroll
    for (int k = 1; k < kCombGroups; ++k) V::Add(sAcc[k][lane], r);
    V::Store(a.out + (n * H + h) * dl + d, r);
  }
}

template <class T>
cudaError_t LaunchSimt(const DecodeArgs& a, int N, cudaStream_t stream) {
  const size_t smem = SimtSmemBytes(a.dl + a.dr, a.dl);
  static bool attr_set = false;
  if (!attr_set) {
    const cudaError_t err = RaiseSmem(MlaDecodeSimtKernel<T>, DeviceSmemOptin());
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  const dim3 grid(static_cast<unsigned>((a.H + kSimtHeads - 1) / kSimtHeads), a.S, N);
  LaunchPdl(MlaDecodeSimtKernel<T>, grid, kSimtThreads, smem, stream, a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchDecodeSimt(const DecodeArgs& a, int N, bool f32_cache, cudaStream_t stream) {
  return f32_cache ? LaunchSimt<float>(a, N, stream) : LaunchSimt<__nv_bfloat16>(a, N, stream);
}

cudaError_t LaunchDecodeCombine(const DecodeArgs& a, int N, cudaStream_t stream) {
  // float4 columns need dl % 4 == 0 (16-byte partial rows) and an 8-byte aligned `out`
  // (two float2 stores); the API asks that of `out` only on the tensor-core paths.
  if (a.dl % 4 == 0 && reinterpret_cast<uintptr_t>(a.out) % 8 == 0) {
    const dim3 grid(a.H, N, static_cast<unsigned>((a.dl / 4 + 31) / 32));
    LaunchPdl(MlaDecodeCombineKernel<4>, grid, kCombThreads, 0, stream, a);
  } else {
    const dim3 grid(a.H, N, static_cast<unsigned>((a.dl + 31) / 32));
    LaunchPdl(MlaDecodeCombineKernel<1>, grid, kCombThreads, 0, stream, a);
  }
  return cudaGetLastError();
}

}  // namespace kl::cuda::mla
