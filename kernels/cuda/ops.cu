// Element-wise and row-wise kernels of the forward (ops.h). Memory-bound and
// simple by design: one thread per element (grid-stride), one block or warp per
// row for the norms, with double accumulation in the reductions so they agree
// with the CPU oracle (which also sums in double) to rounding.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/common/splitmix64.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned Blocks(int64_t n, int64_t per_block = kThreads) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 1 << 20));
}

__device__ __forceinline__ float SigmoidF(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ double WarpSum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum of one double per thread; every thread gets the result.
__device__ double BlockSum(double v) {
  __shared__ double part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // `part` may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  double s = lane < nw ? part[lane] : 0.0;
  return WarpSum(s);
}

template <class T>
__device__ __forceinline__ float ToF(T v);
template <>
__device__ __forceinline__ float ToF<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float ToF<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <class T>
__global__ void EmbeddingKernel(const int32_t* ids, const T* table, int64_t vocab, int64_t dim,
                                float* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  float* yr = y + i * dim;
  if (id < 0 || id >= vocab) {
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = 0.0f;
    return;
  }
  const T* tr = table + static_cast<int64_t>(id) * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = ToF(tr[c]);
}

// Row norms, one block per row. Up to kNormPer elements per thread (every row of
// the model's shapes) take the staged path: all loads of a thread are issued before
// its first store, so a row costs one round trip to memory for the loads instead of
// one per loop iteration (y, x and a may alias, which keeps the compiler from
// hoisting loads over stores in a plain loop; at decode batch 1 these kernels are
// pure latency). Each thread reads and writes the same elements, so y == x is safe.
constexpr int kNormPer = 8;

__global__ void RmsNormKernel(const float* x, int64_t dim, int64_t stride, const float* w,
                              float eps, float* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const float* xr = x + blockIdx.x * stride;
  float* yr = y + blockIdx.x * stride;
  double ss = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) ss += static_cast<double>(xr[c]) * xr[c];
  ss = BlockSum(ss);
  const float inv = static_cast<float>(1.0 / sqrt(ss / dim + static_cast<double>(eps)));
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = w[c] * (xr[c] * inv);
}

// RmsNormKernel after AddKernel, fused: each thread updates the residual
// values it then normalises (the same elements in both loops).
__global__ void AddRmsNormKernel(const float* a, float* x, int64_t dim, const float* w, float eps,
                                 float* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const float* ar = a + blockIdx.x * dim;
  float* xr = x + blockIdx.x * dim;
  float* yr = y + blockIdx.x * dim;
  double ss = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    const float v = xr[c] + ar[c];
    xr[c] = v;
    ss += static_cast<double>(v) * v;
  }
  ss = BlockSum(ss);
  const float inv = static_cast<float>(1.0 / sqrt(ss / dim + static_cast<double>(eps)));
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) yr[c] = w[c] * (xr[c] * inv);
}

// The staged row norm, plain (kAdd = false: y = norm(x)) or fused with the residual
// add (kAdd: x += a written back, then y = norm(x)); rows `stride` apart.
template <bool kAdd>
__global__ void RmsNormStagedKernel(const float* a, const float* x, float* x_out, int64_t dim,
                                    int64_t stride, const float* w, float eps, float* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const float* xr = x + blockIdx.x * stride;
  float* yr = y + blockIdx.x * stride;
  float v[kNormPer], wv[kNormPer];
#pragma unroll
  for (int i = 0; i < kNormPer; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    v[i] = c < dim ? (kAdd ? xr[c] + a[blockIdx.x * stride + c] : xr[c]) : 0.0f;
    wv[i] = c < dim ? w[c] : 0.0f;
  }
  double ss = 0;
#pragma unroll
  for (int i = 0; i < kNormPer; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (kAdd && c < dim) x_out[blockIdx.x * stride + c] = v[i];
    ss += static_cast<double>(v[i]) * v[i];
  }
  ss = BlockSum(ss);
  const float inv = static_cast<float>(1.0 / sqrt(ss / dim + static_cast<double>(eps)));
#pragma unroll
  for (int i = 0; i < kNormPer; ++i) {
    const int64_t c = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (c < dim) yr[c] = wv[i] * (v[i] * inv);
  }
}

// One warp per (row, head). Heads of up to 32 * kNormPer values take the staged path
// (all loads before the first store, as the row norms above).
__global__ void GatedRmsNormKernel(const float* o, const float* z, int64_t groups, int64_t dim,
                                   const float* w, float eps, float* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       g < groups; g += warps) {
    const float* orow = o + g * dim;
    const float* zrow = z + g * dim;
    float* yrow = y + g * dim;
    if (dim <= 32 * kNormPer) {  // uniform
      float ov[kNormPer], zv[kNormPer], wv[kNormPer];
#pragma unroll
      for (int i = 0; i < kNormPer; ++i) {
        const int64_t j = lane + 32 * i;
        ov[i] = j < dim ? orow[j] : 0.0f;
        zv[i] = j < dim ? zrow[j] : 0.0f;
        wv[i] = j < dim ? w[j] : 0.0f;
      }
      double ss = 0;
#pragma unroll
      for (int i = 0; i < kNormPer; ++i) ss += static_cast<double>(ov[i]) * ov[i];
      ss = WarpSum(ss);
      const float inv = static_cast<float>(1.0 / sqrt(ss / dim + static_cast<double>(eps)));
#pragma unroll
      for (int i = 0; i < kNormPer; ++i) {
        const int64_t j = lane + 32 * i;
        if (j < dim) yrow[j] = ov[i] * inv * wv[i] * SigmoidF(zv[i]);
      }
      continue;
    }
    double ss = 0;
    for (int64_t j = lane; j < dim; j += 32) ss += static_cast<double>(orow[j]) * orow[j];
    ss = WarpSum(ss);
    const float inv = static_cast<float>(1.0 / sqrt(ss / dim + static_cast<double>(eps)));
    for (int64_t j = lane; j < dim; j += 32) yrow[j] = orow[j] * inv * w[j] * SigmoidF(zrow[j]);
  }
}

template <class T>
__global__ void FillSyntheticKernel(T* dst, int64_t n, float mean, float half_range,
                                    uint64_t seed) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>((SplitMix64At(seed, i) >> 40) * 0x1.0p-24);
    const float v = mean + half_range * (2.0f * u - 1.0f);
    if constexpr (sizeof(T) == 4) {
      dst[i] = v;
    } else {
      dst[i] = __float2bfloat16_rn(v);
    }
  }
}

__global__ void AddKernel(const float* x, int64_t n, float* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += x[i];
  }
}

__global__ void SwiGluKernel(const float* gate, const float* up, int64_t n, float* out) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g * SigmoidF(g) * up[i];
  }
}

// One warp's share of y[r] = Σ_k x[r][k] · row[k] (r < R): the 8-element pieces
// k = 8 (lane + 32 part) + 256 parts · i, i = 0, 1, ... (parts = 1: the whole row).
template <int R>
__device__ __forceinline__ void GemvWarpPart(const float* __restrict__ x, int64_t ldx,
                                             const __nv_bfloat16* __restrict__ row, int64_t K, int part,
                                             int parts, float (&acc)[R]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
#pragma unroll 4
  for (int64_t k = (lane + 32 * part) * 8; k < K; k += 256 * parts) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    float wf[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      wf[2 * j] = f.x;
      wf[2 * j + 1] = f.y;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 a = *reinterpret_cast<const float4*>(x + r * ldx + k);
      const float4 b = *reinterpret_cast<const float4*>(x + r * ldx + k + 4);
      acc[r] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] +
                b.y * wf[5] + b.z * wf[6] + b.w * wf[7];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  }
}

// Several weight matrices over the same x in one launch: blocks [begin[s],
// begin[s+1]) compute segment s. A segment with split[s] = 1 has 8 output columns
// per block, one warp each; a short segment (few columns: too few blocks to keep the
// GPU's memory busy) splits each column's K over split[s] warps, 8 / split[s]
// columns per block, and adds the parts in a fixed order (deterministic). The split
// depends only on the segment's own shape, so a matrix gives the same bits whatever
// it is launched with.
struct GemvMultiArgs {
  const float* x;
  int64_t ldx, K;
  int num;
  GemvSegment seg[kMaxGemvSegments];
  int split[kMaxGemvSegments];
  int64_t begin[kMaxGemvSegments + 1];
};

template <int R>
__global__ void __launch_bounds__(256) SkinnyGemvMultiKernel(const GemvMultiArgs a) {
  int s = 0;
  while (s + 1 < a.num && a.begin[s + 1] <= blockIdx.x) ++s;
  const GemvSegment& g = a.seg[s];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, parts = a.split[s];
  const __nv_bfloat16* w = static_cast<const __nv_bfloat16*>(g.w);
  {
    // While the kernel ahead finishes (pdl.cuh): this warp's weight lines into L2, one
    // prefetch per 128-byte line of the pieces GemvWarpPart will load.
    const int64_t n = (blockIdx.x - a.begin[s]) * (8 / parts) + warp / parts;
    if (n < g.n && (lane & 7) == 0) {
      const __nv_bfloat16* row = w + n * a.K;
      for (int64_t k = (lane + 32 * (warp % parts)) * 8; k < a.K; k += 256 * parts) {
        PrefetchL2(row + k);
      }
    }
  }
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  float acc[R];
  if (parts == 1) {  // block-uniform
    const int64_t n = (blockIdx.x - a.begin[s]) * 8 + warp;
    if (n >= g.n) return;
    GemvWarpPart<R>(a.x, a.ldx, w + n * a.K, a.K, 0, 1, acc);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) g.y[n + r * g.ldy] = acc[r];
    }
    return;
  }
  __shared__ float s_part[8][R];
  const int64_t n = (blockIdx.x - a.begin[s]) * (8 / parts) + warp / parts;
  const int part = warp % parts;
  if (n < g.n) {
    GemvWarpPart<R>(a.x, a.ldx, w + n * a.K, a.K, part, parts, acc);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) s_part[warp][r] = acc[r];
    }
  }
  __syncthreads();
  if (n < g.n && part == 0 && lane < R) {
    float v = s_part[warp][lane];
    for (int j = 1; j < parts; ++j) v += s_part[warp + j][lane];
    g.y[n + lane * g.ldy] = v;
  }
}

// Warps per output column for a segment of n columns and depth K: the smallest
// power of two up to 8 that gives >= kGemvTargetBlocks blocks, with >= 256 elements
// of K per warp.
constexpr int64_t kGemvTargetBlocks = 256;
int GemvSplit(int64_t n, int64_t K) {
  int parts = 1;
  while (parts < 8 && (n * parts + 7) / 8 < kGemvTargetBlocks && K >= 256 * 2 * parts) parts *= 2;
  return parts;
}

__global__ void F32ToBf16Kernel(const float* x, int64_t n, __nv_bfloat16* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __float2bfloat16_rn(x[i]);
  }
}

__global__ void Bf16ToF32Kernel(const __nv_bfloat16* x, int64_t n, float* y) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = __bfloat162float(x[i]);
  }
}

__global__ void GatherRowsKernel(const float* src, int64_t src_stride, int64_t dim,
                                 const int64_t* rows, float* dst) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const float* s = src + rows[blockIdx.x] * src_stride;
  float* d = dst + static_cast<int64_t>(blockIdx.x) * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) d[c] = s[c];
}

// Sequence of packed token t: the s with cu[s] <= t < cu[s+1] (binary search).
__device__ __forceinline__ int64_t SeqOf(const int64_t* cu, int64_t n, int64_t t) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Up to three same-shaped convs (q, k and v of a KDA layer) per launch.
struct ConvGroup {
  ShortConvVarlenParams p[kMaxConvGroup];
  int n;
};

// One thread per (group, token, channel).
__global__ void ShortConvKernel(const ConvGroup gp) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t C = gp.p[0].channels, W = gp.p[0].width, per = gp.p[0].num_tokens * C;
  for (int64_t gidx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       gidx < gp.n * per; gidx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const ShortConvVarlenParams& p = gp.p[gidx / per];
    const int64_t idx = gidx % per;
    const int64_t t = idx / C, c = idx % C;
    const int64_t s = SeqOf(p.cu_seqlens, p.num_seqs, t);
    const int64_t begin = p.cu_seqlens[s], i = t - begin;
    const int32_t slot = p.slots[s];
    const float* tail = (slot >= 0 && slot < p.num_slots)
                            ? p.tail_pool + static_cast<int64_t>(slot) * (W - 1) * C
                            : nullptr;
    float acc = 0.0f;
    for (int64_t j = 0; j < W; ++j) {
      const int64_t src = i - (W - 1) + j;  // relative to the sequence's first new token
      float xv = 0.0f;
      if (src >= 0) {
        xv = p.x[(begin + src) * C + c];
      } else if (tail != nullptr) {
        xv = tail[(W - 1 + src) * C + c];
      }
      acc += p.w[c * W + j] * xv;
    }
    p.out[idx] = acc * SigmoidF(acc);
  }
}

// One thread per (group, sequence, channel): the new tail = last W-1 rows of [tail; x].
__global__ void ShortConvTailKernel(const ConvGroup gp) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t C = gp.p[0].channels, W = gp.p[0].width, per = gp.p[0].num_seqs * C;
  if (W < 2) return;
  for (int64_t gidx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       gidx < gp.n * per; gidx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const ShortConvVarlenParams& p = gp.p[gidx / per];
    const int64_t idx = gidx % per;
    const int64_t s = idx / C, c = idx % C;
    const int32_t slot = p.slots[s];
    const int64_t begin = p.cu_seqlens[s], len = p.cu_seqlens[s + 1] - begin;
    if (slot < 0 || slot >= p.num_slots || len == 0) continue;
    float* tail = p.tail_pool + static_cast<int64_t>(slot) * (W - 1) * C;
    float v[7];
    for (int64_t j = 0; j < W - 1; ++j) {
      const int64_t at = len + j;  // index into [tail (W-1 rows); x (len rows)]
      v[j] = at < W - 1 ? tail[at * C + c] : p.x[(begin + at - (W - 1)) * C + c];
    }
    for (int64_t j = 0; j < W - 1; ++j) tail[j * C + c] = v[j];
  }
}

// One token per sequence: thread per (group, sequence, channel) reads the window,
// writes the output (same sum order as ShortConvKernel) and shifts the tail.
__global__ void ShortConvOneTokenKernel(const ConvGroup gp) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t C = gp.p[0].channels, W = gp.p[0].width, per = gp.p[0].num_seqs * C;
  for (int64_t gidx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       gidx < gp.n * per; gidx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const ShortConvVarlenParams& p = gp.p[gidx / per];
    const int64_t idx = gidx % per;
    const int64_t s = idx / C, c = idx % C;
    const int32_t slot = p.slots[s];
    float* tail = (slot >= 0 && slot < p.num_slots) ? p.tail_pool + static_cast<int64_t>(slot) * (W - 1) * C
                                                    : nullptr;
    float win[8];
    for (int64_t j = 0; j + 1 < W; ++j) win[j] = tail != nullptr ? tail[j * C + c] : 0.0f;
    win[W - 1] = p.x[idx];
    float acc = 0.0f;
    for (int64_t j = 0; j < W; ++j) acc += p.w[c * W + j] * win[j];
    p.out[idx] = acc * SigmoidF(acc);
    if (tail != nullptr) {
      for (int64_t j = 0; j + 1 < W; ++j) tail[j * C + c] = win[j + 1];
    }
  }
}

__global__ void MlaCopyQPeKernel(const float* q, int64_t rows, int64_t heads, int64_t nope,
                                 int64_t rope, int64_t lora, float* qcat) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t n = rows * heads * rope;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rh = i / rope, j = i % rope;
    qcat[rh * (lora + rope) + lora + j] = q[rh * (nope + rope) + nope + j];
  }
}

__global__ void MlaBuildKvKernel(const float* kv, const float* latent, int64_t rows, int64_t heads,
                                 int64_t nope, int64_t v_dim, int64_t lora, int64_t rope, float* k,
                                 float* v) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  const int64_t qk = nope + rope, kvh = nope + v_dim;
  const int64_t per_head = qk + v_dim;
  const int64_t n = rows * heads * per_head;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rh = i / per_head, j = i % per_head;
    const int64_t r = rh / heads, h = rh % heads;
    if (j < nope) {
      k[rh * qk + j] = kv[rh * kvh + j];
    } else if (j < qk) {
      k[rh * qk + j] = latent[r * (lora + rope) + lora + (j - nope)];
    } else {
      v[rh * v_dim + (j - qk)] = kv[(r * heads + h) * kvh + nope + (j - qk)];
    }
  }
}

}  // namespace

absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType table_dtype,
                             int64_t vocab, int64_t dim, float* y, cudaStream_t stream) {
  if (n < 0 || dim <= 0 || vocab <= 0) return absl::InvalidArgumentError("EmbeddingGather: shape");
  if (n == 0) return absl::OkStatus();
  if (table_dtype == DType::kF32) {
    LaunchPdl(EmbeddingKernel<float>, static_cast<unsigned>(n), kThreads, 0, stream, ids,
              static_cast<const float*>(table), vocab, dim, y);
  } else if (table_dtype == DType::kBF16) {
    LaunchPdl(EmbeddingKernel<__nv_bfloat16>, static_cast<unsigned>(n), kThreads, 0, stream, ids,
              static_cast<const __nv_bfloat16*>(table), vocab, dim, y);
  } else {
    return absl::InvalidArgumentError("EmbeddingGather: table dtype must be f32 or bf16");
  }
  return CudaStatus(cudaGetLastError(), "EmbeddingGather");
}

absl::Status RmsNormRows(const float* x, int64_t rows, int64_t dim, int64_t stride, const float* w,
                         float eps, float* y, cudaStream_t stream) {
  if (rows < 0 || dim <= 0 || stride < dim) return absl::InvalidArgumentError("RmsNormRows: shape");
  if (rows == 0) return absl::OkStatus();
  const int threads = dim >= 1024 ? 512 : (dim >= 256 ? 256 : 128);
  if (dim <= static_cast<int64_t>(threads) * kNormPer) {
    LaunchPdl(RmsNormStagedKernel<false>, static_cast<unsigned>(rows), threads, 0, stream, nullptr,
              x, nullptr, dim, stride, w, eps, y);
  } else {
    LaunchPdl(RmsNormKernel, static_cast<unsigned>(rows), threads, 0, stream, x, dim, stride, w,
              eps, y);
  }
  return CudaStatus(cudaGetLastError(), "RmsNormRows");
}

absl::Status AddRmsNormRows(const float* a, float* x, int64_t rows, int64_t dim, const float* w,
                            float eps, float* y, cudaStream_t stream) {
  if (rows < 0 || dim <= 0) return absl::InvalidArgumentError("AddRmsNormRows: shape");
  if (rows == 0) return absl::OkStatus();
  const int threads = dim >= 1024 ? 512 : (dim >= 256 ? 256 : 128);  // as RmsNormRows
  if (dim <= static_cast<int64_t>(threads) * kNormPer) {
    LaunchPdl(RmsNormStagedKernel<true>, static_cast<unsigned>(rows), threads, 0, stream, a, x, x,
              dim, dim, w, eps, y);
  } else {
    LaunchPdl(AddRmsNormKernel, static_cast<unsigned>(rows), threads, 0, stream, a, x, dim, w, eps,
              y);
  }
  return CudaStatus(cudaGetLastError(), "AddRmsNormRows");
}

absl::Status GatedRmsNormRows(const float* o, const float* z, int64_t rows, int64_t heads,
                              int64_t dim, const float* w, float eps, float* y,
                              cudaStream_t stream) {
  if (rows < 0 || heads <= 0 || dim <= 0) return absl::InvalidArgumentError("GatedRmsNorm: shape");
  const int64_t groups = rows * heads;
  if (groups == 0) return absl::OkStatus();
  LaunchPdl(GatedRmsNormKernel, Blocks(groups, kThreads / 32), kThreads, 0, stream, o, z, groups,
            dim, w, eps, y);
  return CudaStatus(cudaGetLastError(), "GatedRmsNorm");
}

absl::Status FillSynthetic(void* dst, DType dtype, int64_t n, float mean, float half_range,
                           uint64_t seed, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("FillSynthetic: n < 0");
  if (n == 0) return absl::OkStatus();
  if (dtype == DType::kF32) {
    LaunchPdl(FillSyntheticKernel<float>, Blocks(n), kThreads, 0, stream, static_cast<float*>(dst),
              n, mean, half_range, seed);
  } else if (dtype == DType::kBF16) {
    LaunchPdl(FillSyntheticKernel<__nv_bfloat16>, Blocks(n), kThreads, 0, stream,
              static_cast<__nv_bfloat16*>(dst), n, mean, half_range, seed);
  } else {
    return absl::InvalidArgumentError("FillSynthetic: dtype must be f32 or bf16");
  }
  return CudaStatus(cudaGetLastError(), "FillSynthetic");
}

absl::Status AddInPlace(const float* x, int64_t n, float* y, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("AddInPlace: n < 0");
  if (n == 0) return absl::OkStatus();
  LaunchPdl(AddKernel, Blocks(n), kThreads, 0, stream, x, n, y);
  return CudaStatus(cudaGetLastError(), "AddInPlace");
}

absl::Status SwiGluElementwise(const float* gate, const float* up, int64_t n, float* out,
                               cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("SwiGlu: n < 0");
  if (n == 0) return absl::OkStatus();
  LaunchPdl(SwiGluKernel, Blocks(n), kThreads, 0, stream, gate, up, n, out);
  return CudaStatus(cudaGetLastError(), "SwiGlu");
}

bool SkinnyGemvSupported(const float* x, int64_t ldx, int64_t rows, const void* w, int64_t K) {
  return rows >= 1 && rows <= 8 && K % 8 == 0 && ldx % 4 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

absl::Status SkinnyGemvBf16(const float* x, int64_t ldx, int64_t rows, const void* w, int64_t N,
                            int64_t K, float* y, int64_t ldy, cudaStream_t stream) {
  const GemvSegment seg{w, N, y, ldy};
  return SkinnyGemvMultiBf16(x, ldx, rows, &seg, 1, K, stream);
}

absl::Status SkinnyGemvMultiBf16(const float* x, int64_t ldx, int64_t rows,
                                 const GemvSegment* segs, int num_segs, int64_t K,
                                 cudaStream_t stream) {
  if (num_segs < 1 || num_segs > kMaxGemvSegments) {
    return absl::InvalidArgumentError("SkinnyGemvMultiBf16: 1 to 8 segments");
  }
  GemvMultiArgs a;
  a.x = x;
  a.ldx = ldx;
  a.K = K;
  a.num = num_segs;
  a.begin[0] = 0;
  for (int i = 0; i < num_segs; ++i) {
    const GemvSegment& g = segs[i];
    if (!SkinnyGemvSupported(x, ldx, rows, g.w, K) || g.n < 1 || g.ldy < g.n || g.y == nullptr) {
      return absl::InvalidArgumentError("SkinnyGemvMultiBf16: unsupported shape or alignment");
    }
    a.seg[i] = g;
    a.split[i] = GemvSplit(g.n, K);
    const int64_t per_block = 8 / a.split[i];
    a.begin[i + 1] = a.begin[i] + (g.n + per_block - 1) / per_block;
  }
  const unsigned blocks = static_cast<unsigned>(a.begin[num_segs]);
  switch (rows) {
#define KL_SKINNY_CASE(R)                                           \
  case R:                                                           \
    LaunchPdl(SkinnyGemvMultiKernel<R>, blocks, 256, 0, stream, a); \
    break;
    KL_SKINNY_CASE(1)
    KL_SKINNY_CASE(2)
    KL_SKINNY_CASE(3)
    KL_SKINNY_CASE(4)
    KL_SKINNY_CASE(5)
    KL_SKINNY_CASE(6)
    KL_SKINNY_CASE(7)
    KL_SKINNY_CASE(8)
#undef KL_SKINNY_CASE
  }
  return CudaStatus(cudaGetLastError(), "SkinnyGemvMultiBf16");
}

absl::Status F32ToBf16(const float* x, int64_t n, void* y, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("F32ToBf16: n < 0");
  if (n == 0) return absl::OkStatus();
  LaunchPdl(F32ToBf16Kernel, Blocks(n), kThreads, 0, stream, x, n, static_cast<__nv_bfloat16*>(y));
  return CudaStatus(cudaGetLastError(), "F32ToBf16");
}

absl::Status Bf16ToF32(const void* x, int64_t n, float* y, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("Bf16ToF32: n < 0");
  if (n == 0) return absl::OkStatus();
  LaunchPdl(Bf16ToF32Kernel, Blocks(n), kThreads, 0, stream, static_cast<const __nv_bfloat16*>(x),
            n, y);
  return CudaStatus(cudaGetLastError(), "Bf16ToF32");
}

absl::Status GatherRowsF32(const float* src, int64_t src_stride, int64_t dim, const int64_t* rows,
                           int64_t n, float* dst, cudaStream_t stream) {
  if (n < 0 || dim <= 0 || src_stride < dim) return absl::InvalidArgumentError("GatherRows: shape");
  if (n == 0) return absl::OkStatus();
  LaunchPdl(GatherRowsKernel, static_cast<unsigned>(n), kThreads, 0, stream, src, src_stride, dim,
            rows, dst);
  return CudaStatus(cudaGetLastError(), "GatherRows");
}

absl::Status ShortConvVarlen(const ShortConvVarlenParams& p, cudaStream_t stream) {
  return ShortConvVarlenMulti(&p, 1, stream);
}

absl::Status ShortConvVarlenMulti(const ShortConvVarlenParams* ps, int n, cudaStream_t stream) {
  if (n < 1 || n > kMaxConvGroup) return absl::InvalidArgumentError("ShortConvVarlen: 1 to 3 convs");
  ConvGroup gp;
  gp.n = n;
  for (int i = 0; i < n; ++i) {
    const ShortConvVarlenParams& p = ps[i];
    if (p.num_seqs < 0 || p.num_tokens < 0 || p.channels <= 0 || p.width < 1 || p.width > 8 ||
        p.num_slots < 0) {
      return absl::InvalidArgumentError(absl::StrCat("ShortConvVarlen: bad shape (N=", p.num_seqs,
                                                     " T=", p.num_tokens, " C=", p.channels,
                                                     " W=", p.width, ")"));
    }
    const ShortConvVarlenParams& q = ps[0];
    if (p.num_seqs != q.num_seqs || p.num_tokens != q.num_tokens || p.channels != q.channels ||
        p.width != q.width || p.num_slots != q.num_slots || p.cu_seqlens != q.cu_seqlens ||
        p.slots != q.slots || p.one_token_each != q.one_token_each) {
      return absl::InvalidArgumentError("ShortConvVarlenMulti: convs of different shapes");
    }
    if (p.num_seqs > 0 && p.num_tokens > 0 &&
        (p.x == nullptr || p.w == nullptr || p.cu_seqlens == nullptr || p.slots == nullptr ||
         p.out == nullptr || (p.num_slots > 0 && p.tail_pool == nullptr))) {
      return absl::InvalidArgumentError("ShortConvVarlen: null pointer");
    }
    gp.p[i] = p;
  }
  const ShortConvVarlenParams& p = ps[0];
  if (p.one_token_each && p.num_tokens != p.num_seqs) {
    return absl::InvalidArgumentError("ShortConvVarlen: one_token_each needs num_tokens == num_seqs");
  }
  if (p.num_seqs == 0 || p.num_tokens == 0) return absl::OkStatus();
  if (p.one_token_each) {
    LaunchPdl(ShortConvOneTokenKernel, Blocks(n * p.num_seqs * p.channels), kThreads, 0, stream,
              gp);
    return CudaStatus(cudaGetLastError(), "ShortConvVarlen");
  }
  LaunchPdl(ShortConvKernel, Blocks(n * p.num_tokens * p.channels), kThreads, 0, stream, gp);
  KL_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (p.width > 1 && p.num_slots > 0) {
    LaunchPdl(ShortConvTailKernel, Blocks(n * p.num_seqs * p.channels), kThreads, 0, stream, gp);
    KL_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

absl::Status MlaCopyQPe(const float* q, int64_t rows, int64_t heads, int64_t nope, int64_t rope,
                        int64_t lora, float* qcat, cudaStream_t stream) {
  if (rows < 0 || heads <= 0 || nope < 0 || rope < 0 || lora <= 0) {
    return absl::InvalidArgumentError("MlaCopyQPe: shape");
  }
  if (rows == 0 || rope == 0) return absl::OkStatus();
  LaunchPdl(MlaCopyQPeKernel, Blocks(rows * heads * rope), kThreads, 0, stream, q, rows, heads,
            nope, rope, lora, qcat);
  return CudaStatus(cudaGetLastError(), "MlaCopyQPe");
}

absl::Status MlaBuildKv(const float* kv, const float* latent, int64_t rows, int64_t heads,
                        int64_t nope, int64_t v_dim, int64_t lora, int64_t rope, float* k, float* v,
                        cudaStream_t stream) {
  if (rows < 0 || heads <= 0 || nope < 0 || v_dim <= 0 || lora <= 0 || rope < 0) {
    return absl::InvalidArgumentError("MlaBuildKv: shape");
  }
  if (rows == 0) return absl::OkStatus();
  LaunchPdl(MlaBuildKvKernel, Blocks(rows * heads * (nope + rope + v_dim)), kThreads, 0, stream, kv,
            latent, rows, heads, nope, v_dim, lora, rope, k, v);
  return CudaStatus(cudaGetLastError(), "MlaBuildKv");
}

}  // namespace kl::cuda
