// MLA absorbed decode: the warp-specialised wgmma kernel (sm_90a: H100 / H200), the
// default path for a bf16 cache of the model's shapes. Launched by MlaDecodeAttention
// (mla_decode.cu), which owns validation, the split choice and the combine kernel.
//
// Transposed formulation, so that the 32 heads are the N of every MMA and no MMA row is
// padding (a head-major M = 64 tile would be half empty at H = 32):
//   S^T[64 rows][32 heads]  = K_tile[64][D]   . Q^T[D][32]        (wgmma m64n32k16, 4 D/64 steps)
//   O^T[dl][32 heads]      += V^T[dl][64 rows] . P^T[64 rows][32]  (dl / 64 m-blocks x 4 k-steps)
// with V = the first dl columns of the same tile. Every operand comes from shared memory
// in the 128-byte-swizzle layout: the cache tile as TMA writes it ([D / 64 chunks][64 rows]
// [128 B]; K-major A for the scores, M-major A for P.V), q converted once per CTA into the
// same layout ([chunks][32 heads][128 B]), P^T stored by stmatrix.trans ([32][128 B]).
//
// CTA = one (split, sequence), 160 threads, ~190 KB of shared memory (one CTA per SM):
//  - warp 4, the producer: per 64-row tile, one block-table lookup per TMA box (box =
//    gcd(page_size, 64) rows x 64 columns, never straddling a page), then D / 64 boxes
//    per box row (cp.async.bulk.tensor.2d) into a 2-stage ring guarded by full / empty
//    mbarriers. Boxes past the range or on unmapped pages are pointed outside the tensor
//    map, which the TMA unit fills with zeros (no bytes read);
//  - warps 0-3, one consumer warpgroup: each thread looks up whether its 2 score rows are
//    attended to (in range, mapped page: the producer's rule) before waiting for the
//    tile; scores (fp32 in registers), online softmax in the
//    exp2 domain per head (column max over the 64 rows: shuffles inside a warp, shared
//    memory across the 4 warps), P rounded to bf16 (the running sum adds exactly the
//    rounded weights), O^T += V^T P^T with the [dl][32] fp32 accumulator in registers
//    (dl / 2 per thread), rescaled only when some running max moved. Rows of the last
//    tile past the range end are zeroed in shared memory before use (the page may hold
//    anything there; masked scores alone would still multiply NaN by 0).
// The producer refills a stage as soon as its tile is consumed, so 1-2 tiles (74-147 KB
// at D = 576) are in flight per SM while the warpgroup computes.
#include <cuda.h>  // CUtensorMap (types only; the encoder comes through the runtime)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <numeric>

#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/mla_device.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace kl::cuda::mla {
namespace {

using namespace kl::cuda::dev;  // NOLINT

constexpr int kWgRows = 64;                       // cache rows per tile (M of the scores)
constexpr int kWgHeads = 32;                      // heads per CTA (N of both MMAs), zero-padded
constexpr int kWgStages = 2;                      // tiles in the ring
constexpr int kWgConsumers = 128;                 // one warpgroup
constexpr int kWgThreads = kWgConsumers + 32;     // + the producer warp
constexpr uint32_t kChunk = kWgRows * 128;        // one 64-column chunk of a tile (8 KB)
constexpr uint32_t kQChunk = kWgHeads * 128;      // one 64-column chunk of q (4 KB)
constexpr int kBarConsumers = 1;                  // named barrier of the consumer warpgroup

struct WgLayout {
  uint32_t kv, q, p, red, bar, total;  // byte offsets from the 1024-aligned base
};
__host__ __device__ constexpr WgLayout MakeWgLayout(int nc) {
  WgLayout L{};
  L.kv = 0;
  L.q = L.kv + kWgStages * nc * kChunk;
  L.p = L.q + nc * kQChunk;
  L.red = L.p + kWgHeads * 128;
  L.bar = L.red + 4 * kWgHeads * 4;
  L.total = L.bar + 2 * kWgStages * 8 + 1024;  // + slack for aligning the base to 1024
  return L;
}

__device__ __forceinline__ void ConsumerSync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kBarConsumers), "n"(kWgConsumers) : "memory");
}
// Orders this thread's generic shared-memory writes before later async-proxy accesses
// (wgmma operand reads, TMA writes).
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// 2-D tensor-map box (coordinates: column, row) -> shared memory, completing on `bar`.
__device__ __forceinline__ void TmaLoad2D(uint32_t dst, const CUtensorMap* map, int col, int row,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(SmemAddr(bar))
      : "memory");
}
// Four 8x8 b16 matrices stored transposed: lane l gives the address of row l % 8 of
// matrix l / 8, which receives column l % 8 of that matrix's fragment.
__device__ __forceinline__ void StmatrixX4Trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                                uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

// NC = D / 64 column chunks (D = latent + rope), NM = latent / 64 output m-blocks.
template <int NC, int NM>
__global__ void __launch_bounds__(kWgThreads, 1)
    MlaDecodeWgKernel(const DecodeArgs a, const __grid_constant__ CUtensorMap tmap, int box_rows,
                      int oob_row) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  constexpr WgLayout L = MakeWgLayout(NC);
  constexpr uint32_t kStage = NC * kChunk;
  constexpr int D = NC * 64, dl = NM * 64;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = SmemAddr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  unsigned char* smem = smem_raw + (base - raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L.bar);
  uint64_t* empty = full + kWgStages;
  float* red = reinterpret_cast<float*>(smem + L.red);  // [4 warps][32 heads]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int H = a.H, S = a.S, s_idx = blockIdx.x;
  const int64_t n = blockIdx.y;
  const SplitRange rg = RangeOf(a.seq_lens[n], S, s_idx);
  const int ntiles = static_cast<int>((rg.end - rg.begin + kWgRows - 1) / kWgRows);

  if (tid == 0) {
    for (int i = 0; i < kWgStages; ++i) {
      MbarInit(&full[i], 1);   // the producer's arrive.expect_tx (+ the TMA bytes)
      MbarInit(&empty[i], 4);  // one arrive per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the last CTA-wide barrier: the roles split here

  if (warp == kWgConsumers / 32) {
    // ================================ producer warp =====================================
    if (lane == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap)) : "memory");
    }
    const int nbox = kWgRows / box_rows;  // lane b < nbox owns box row b of every tile
    for (int t = 0; t < ntiles; ++t) {
      const int stage = t % kWgStages;
      // The lookup first: it does not depend on the stage being free.
      int row = oob_row;  // outside the tensor map: zero fill, no bytes read
      if (lane < nbox) {
        const int64_t pos = rg.begin + static_cast<int64_t>(t) * kWgRows + lane * box_rows;
        const int64_t phys = pos < rg.end ? PhysRow32(a.c, n, static_cast<int>(pos)) : -1;
        if (phys >= 0) row = static_cast<int>(phys);  // the whole box lies in this page
      }
      if (t >= kWgStages) MbarWait(&empty[stage], (t / kWgStages - 1) & 1);  // tile t-2 consumed
      if (lane == 0) MbarExpectTx(&full[stage], kStage);
      __syncwarp();
      if (lane < nbox) {
        const uint32_t dst = base + L.kv + stage * kStage + lane * box_rows * 128;
#pragma unroll
        for (int c = 0; c < NC; ++c) TmaLoad2D(dst + c * kChunk, &tmap, c * 64, row, &full[stage]);
      }
    }
    return;
  }

  // ============================= consumer warpgroup (warps 0-3) ===========================
  const int g = lane / 4, tq = lane % 4;
  const uint32_t q_base = base + L.q, p_base = base + L.p;
  if (ntiles > 0) {  // q -> bf16 [chunk][head][64], 16-byte units swizzled by head % 8
    // Units of 8 values, kQIters per thread, loaded kQBatch at a time (a few round trips
    // to L2 instead of one per unit: this is on the path to the first tile's scores).
    constexpr int kQIters = kWgHeads * D / 8 / kWgConsumers, kQBatch = 6;
#pragma unroll
    for (int b0 = 0; b0 < kQIters; b0 += kQBatch) {
      float4 x[kQBatch][2];
#pragma unroll
      for (int b = 0; b < kQBatch; ++b) {
        const int i = tid + (b0 + b) * kWgConsumers, h = i / (D / 8), k0 = (i % (D / 8)) * 8;
        x[b][0] = x[b][1] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (b0 + b < kQIters && h < H) {
          const float4* src = reinterpret_cast<const float4*>(a.q + (n * H + h) * D + k0);
          x[b][0] = src[0];
          x[b][1] = src[1];
        }
      }
#pragma unroll
      for (int b = 0; b < kQBatch; ++b) {
        const int i = tid + (b0 + b) * kWgConsumers, h = i / (D / 8), k0 = (i % (D / 8)) * 8;
        const int c = k0 / 64, u = (k0 % 64) / 8;
        if (b0 + b < kQIters) {
          *reinterpret_cast<uint4*>(smem + L.q + c * kQChunk + h * 128 + ((u ^ (h & 7)) << 4)) =
              make_uint4(PackBf16(x[b][0].x, x[b][0].y), PackBf16(x[b][0].z, x[b][0].w),
                         PackBf16(x[b][1].x, x[b][1].y), PackBf16(x[b][1].z, x[b][1].w));
        }
      }
    }
    FenceProxyAsync();
  }
  ConsumerSync();

  // Thread (warp w, g, tq) holds scores of tile rows r0 = 16w + g and r0 + 8 for heads
  // 8j + 2tq + e (j < 4, e < 2), and O^T rows 64mb + 16w + g (+ 8) for the same heads.
  float o[NM][16];
#pragma unroll
  for (int mb = 0; mb < NM; ++mb)
#pragma unroll
    for (int i = 0; i < 16; ++i) o[mb][i] = 0.0f;
  float m_run[8], l_run[8];  // per head 2j + e: running max (log2 units), this thread's sum
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    m_run[i] = -INFINITY;
    l_run[i] = 0.0f;
  }
  const float sl2 = a.scale * kLog2e;
  const int r0 = 16 * warp + g;

  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % kWgStages;
    const uint32_t kv = base + L.kv + stage * kStage;
    // Rows r0 and r0 + 8 attended to: inside the range and on a mapped page (the lookups
    // are in flight while the tile lands).
    const int64_t t0 = rg.begin + static_cast<int64_t>(t) * kWgRows, p0 = t0 + r0, p1 = p0 + 8;
    const bool ok0 = p0 < rg.end && PhysRow32(a.c, n, static_cast<int>(p0)) >= 0;
    const bool ok1 = p1 < rg.end && PhysRow32(a.c, n, static_cast<int>(p1)) >= 0;
    MbarWait(&full[stage], (t / kWgStages) & 1);
    const int64_t left = rg.end - t0;
    if (left < kWgRows) {  // last tile of the range: zero the rows past its end
      const int nv = static_cast<int>(left), nz = (kWgRows - nv) * 8;  // 16-byte units per chunk
      for (int i = tid; i < NC * nz; i += kWgConsumers) {
        const int c = i / nz, j = i - c * nz;
        *reinterpret_cast<uint4*>(smem + L.kv + stage * kStage + c * kChunk + nv * 128 + j * 16) =
            make_uint4(0u, 0u, 0u, 0u);
      }
      FenceProxyAsync();
      ConsumerSync();
    }

    // ---- S^T = K_tile . Q^T ----
    float s[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) s[i] = 0.0f;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < NC * 4; ++kk) {
      const uint32_t ka = kv + (kk / 4) * kChunk + (kk % 4) * 32;
      const uint32_t qb = q_base + (kk / 4) * kQChunk + (kk % 4) * 32;
      WgmmaM64N32K16SS<0>(s, WgmmaDescSw128(ka, 16, 1024), WgmmaDescSw128(qb, 16, 1024), 1);
    }
    WgmmaCommit();
    WgmmaWaitAll();

    // ---- online softmax per head (column) ----
    float mx[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float v0 = ok0 ? s[4 * j + e] * sl2 : -INFINITY;
        const float v1 = ok1 ? s[4 * j + 2 + e] * sl2 : -INFINITY;
        s[4 * j + e] = v0;
        s[4 * j + 2 + e] = v1;
        mx[2 * j + e] = fmaxf(v0, v1);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 4));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 8));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 16));
    }
    if (g == 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        *reinterpret_cast<float2*>(red + warp * kWgHeads + 8 * j + 2 * tq) = make_float2(mx[2 * j], mx[2 * j + 1]);
      }
    }
    ConsumerSync();
    float alpha[8];
    bool moved = false;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 w = *reinterpret_cast<const float2*>(red + 8 * j + 2 * tq);
#pragma unroll
      for (int k = 1; k < 4; ++k) {
        const float2 x = *reinterpret_cast<const float2*>(red + k * kWgHeads + 8 * j + 2 * tq);
        w.x = fmaxf(w.x, x.x);
        w.y = fmaxf(w.y, x.y);
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 2 * j + e;
        const float m_new = fmaxf(m_run[i], e == 0 ? w.x : w.y);
        alpha[i] = m_new == -INFINITY ? 1.0f : exp2f(m_run[i] - m_new);
        moved |= alpha[i] != 1.0f;
        m_run[i] = m_new;
      }
    }
    uint32_t pk[2][4];  // [row half][j]: bf16 pairs (heads 8j + 2tq, + 1)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float m0 = m_run[2 * j], m1 = m_run[2 * j + 1];
      const float x00 = s[4 * j] == -INFINITY ? 0.0f : exp2f(s[4 * j] - m0);
      const float x01 = s[4 * j + 1] == -INFINITY ? 0.0f : exp2f(s[4 * j + 1] - m1);
      const float x10 = s[4 * j + 2] == -INFINITY ? 0.0f : exp2f(s[4 * j + 2] - m0);
      const float x11 = s[4 * j + 3] == -INFINITY ? 0.0f : exp2f(s[4 * j + 3] - m1);
      const __nv_bfloat162 lo = __floats2bfloat162_rn(x00, x01), hi = __floats2bfloat162_rn(x10, x11);
      pk[0][j] = *reinterpret_cast<const uint32_t*>(&lo);
      pk[1][j] = *reinterpret_cast<const uint32_t*>(&hi);
      const float2 flo = __bfloat1622float2(lo), fhi = __bfloat1622float2(hi);
      l_run[2 * j] = l_run[2 * j] * alpha[2 * j] + (flo.x + fhi.x);
      l_run[2 * j + 1] = l_run[2 * j + 1] * alpha[2 * j + 1] + (flo.y + fhi.y);
    }
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int mb = 0; mb < NM; ++mb) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            o[mb][4 * j + e] *= alpha[2 * j + e];
            o[mb][4 * j + 2 + e] *= alpha[2 * j + e];
          }
        }
      }
    }
    // P^T [head][64 rows] bf16: row-chunk q = 2w + rh of head l holds tile rows 8q..8q+7.
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const uint32_t addr = p_base + lane * 128 + ((((2 * warp + rh) ^ (lane & 7))) << 4);
      StmatrixX4Trans(addr, pk[rh][0], pk[rh][1], pk[rh][2], pk[rh][3]);
    }
    FenceProxyAsync();
    ConsumerSync();  // all of P^T written (and every warp past this tile's reads of red)

    // ---- O^T += V^T . P^T ----
    WgmmaFence();
#pragma unroll
    for (int mb = 0; mb < NM; ++mb) {
#pragma unroll
      for (int ks = 0; ks < kWgRows / 16; ++ks) {
        // V^T: M-major, 8-row groups along K (tile rows) 1024 B apart; one 64-wide M atom.
        WgmmaM64N32K16SS<1>(o[mb], WgmmaDescSw128(kv + mb * kChunk + ks * 2048, 1024, 1024),
                            WgmmaDescSw128(p_base + ks * 32, 16, 1024), 1);
      }
    }
    WgmmaCommit();
    WgmmaWaitAll();  // P^T and the stage are free once every warp is past this
    if (lane == 0) MbarArrive(&empty[stage]);
  }

  // ---- epilogue: row sums over the warpgroup, then the output or this split's state ----
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 4);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 8);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 16);
  }
  ConsumerSync();  // red is free
  if (g == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<float2*>(red + warp * kWgHeads + 8 * j + 2 * tq) = make_float2(l_run[2 * j], l_run[2 * j + 1]);
    }
  }
  ConsumerSync();
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = 8 * j + 2 * tq + e, i = 2 * j + e;
      if (h >= H) continue;
      float l_tot = 0.0f;
#pragma unroll
      for (int k = 0; k < 4; ++k) l_tot += red[k * kWgHeads + h];
      float* dst;
      float inv = 1.0f;
      if (S == 1) {
        dst = a.out + (n * H + h) * dl;
        inv = l_tot > 0.0f ? 1.0f / l_tot : 0.0f;  // padding / empty: zeros
      } else {
        dst = a.ws_o + ((n * S + s_idx) * H + h) * dl;
        if (warp == 0 && g == 0) {
          float* ml = a.ws_ml + ((n * S + s_idx) * H + h) * 2;
          ml[0] = m_run[i] * kLn2;  // -inf stays -inf
          ml[1] = l_tot;
        }
      }
#pragma unroll
      for (int mb = 0; mb < NM; ++mb) {
        dst[64 * mb + r0] = o[mb][4 * j + e] * inv;
        dst[64 * mb + r0 + 8] = o[mb][4 * j + 2 + e] * inv;
      }
    }
  }
}

// ==================================== host side =======================================
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime (no link against libcuda); null if absent.
EncodeTiledFn EncodeTiled() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess || f == nullptr) {
      cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

bool DeviceIsSm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;  // sm_90a code runs on exactly 9.0
}

int BoxRows(int64_t page_size) { return static_cast<int>(std::gcd<int64_t>(page_size, kWgRows)); }

template <int NC, int NM>
cudaError_t LaunchWg(const DecodeArgs& a, int N, const CUtensorMap& map, int box_rows, int oob_row,
                     cudaStream_t stream) {
  constexpr uint32_t smem = MakeWgLayout(NC).total;
  static bool attr_set = false;  // idempotent; racing threads set the same value
  if (!attr_set) {
    const cudaError_t err = RaiseSmem(MlaDecodeWgKernel<NC, NM>, smem);
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  LaunchPdl(MlaDecodeWgKernel<NC, NM>, dim3(a.S, N), kWgThreads, smem, stream, a, map, box_rows,
            oob_row);
  return cudaGetLastError();
}

}  // namespace

bool DecodeWgSupported(const MlaDecodeParams& p) {
  const MlaPagedCache& c = p.cache;
  if (c.dtype != DType::kBF16 || p.num_heads < 1 || p.num_heads > kWgHeads) return false;
  if (c.latent_dim != 64 && c.latent_dim != 128 && c.latent_dim != 256 && c.latent_dim != 512) return false;
  if (c.rope_dim != 0 && c.rope_dim != 64) return false;
  if (c.page_size < 1 || c.page_size % 8 != 0 || c.num_pages < 1) return false;
  if (c.num_pages > (int64_t{INT32_MAX} - 2 * kWgRows) / c.page_size) return false;
  if (!DeviceIsSm90() || EncodeTiled() == nullptr) return false;
  const int nc = static_cast<int>(c.row_dim() / 64);
  return MakeWgLayout(nc).total <= static_cast<uint32_t>(DeviceSmemOptin());
}

cudaError_t LaunchDecodeWg(const DecodeArgs& a, int N, cudaStream_t stream) {
  const EncodeTiledFn encode = EncodeTiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const int D = a.dl + a.dr, box_rows = BoxRows(a.c.page_size);
  const int64_t rows = a.c.num_pages * a.c.page_size;
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(D) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(a.c.pool), dims, strides,
             box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    return cudaErrorInvalidValue;
  }
  const int oob_row = static_cast<int>(rows);  // a box starting here is entirely outside
  const bool rope = a.dr > 0;
  switch (a.dl / 64) {
    case 1: return rope ? LaunchWg<2, 1>(a, N, map, box_rows, oob_row, stream)
                        : LaunchWg<1, 1>(a, N, map, box_rows, oob_row, stream);
    case 2: return rope ? LaunchWg<3, 2>(a, N, map, box_rows, oob_row, stream)
                        : LaunchWg<2, 2>(a, N, map, box_rows, oob_row, stream);
    case 4: return rope ? LaunchWg<5, 4>(a, N, map, box_rows, oob_row, stream)
                        : LaunchWg<4, 4>(a, N, map, box_rows, oob_row, stream);
    default: return rope ? LaunchWg<9, 8>(a, N, map, box_rows, oob_row, stream)
                         : LaunchWg<8, 8>(a, N, map, box_rows, oob_row, stream);
  }
}

}  // namespace kl::cuda::mla
