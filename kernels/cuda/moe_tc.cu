// Tensor-core grouped expert GEMMs (bf16 weights, mma.sync m16n8k16, fp32 accumulate).
// Both GEMMs are C[p][n] = Σ_k A[p][k] W_e[n][k] with A and W K-contiguous:
//   gate+up: A = bf16 x of the slot's token, W = W1_e and W3_e (two row blocks of one
//            tile), h[p][i] = bf16(silu(g) * u);
//   down:    A = h[p], W = W2_e, y[p][n] = w_p * acc (fp32).
// Skinny (decode, <= 16 routed rows per M tile): swapped operands, weights are the
// mma A operand loaded straight from global memory as 16-byte streaming loads, the
// tokens the B operand. Lane (g, t) loads 8 consecutive k (8t .. 8t+7 of a 32-wide
// step) of weight rows g and g+8 and of tokens g and g+8: the same k permutation on
// both operands, so the dot products are unchanged and no shared memory is needed.
// A CTA (8 warps) owns 32 weight rows (16 gate + 16 up, or 32 down rows) and splits K
// over its warps (3 steps in flight per warp), reduced in fixed order through shared
// memory: deterministic.
// Tiled (prefill): 128 x 128 x 32 tiles, 8 warps of 64 x 32, 3-stage cp.async ring,
// XOR-swizzled 64-byte rows (conflict-free ldmatrix), 48 KB static shared memory.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/moe_internal.h"
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda::internal {
namespace {

using namespace kl::cuda::dev;  // NOLINT
using bf16 = __nv_bfloat16;

__device__ __forceinline__ float SiluMul(float g, float u) {
  return g * (1.0f / (1.0f + expf(-g))) * u;
}

// 16-byte streaming load: weights are read once, keep them out of L1.
__device__ __forceinline__ uint4 LdgStream(const bf16* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}
__device__ __forceinline__ uint4 Ldg16(const bf16* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Source row of routed position p (the A operand): the bf16 token row for gate+up,
// the SwiGLU row for down.
template <bool kGateUp>
__device__ __forceinline__ const bf16* ActRow(const MoeGemmArgs& a, const MoeWorkspace& ws,
                                              int p) {
  if (kGateUp) {
    return reinterpret_cast<const bf16*>(ws.xb) +
           static_cast<int64_t>(ws.sorted_slot[p] / a.topk) * a.D;
  }
  return static_cast<const bf16*>(ws.h) + static_cast<int64_t>(p) * a.I;
}

// ---- skinny (decode) --------------------------------------------------------------------
constexpr int kSkThreads = 256;
constexpr int kSkWarps = kSkThreads / 32;
constexpr int kSkU = 3;  // K steps (of 32) in flight per warp
constexpr int kSkRows = kMoeSkinnyRows;
static_assert(kSkRows == 16, "two n8 token tiles per M tile");

template <bool kGateUp>
__global__ void __launch_bounds__(kSkThreads, 2) MoeSkinnyKernel(const MoeGemmArgs a,
                                                                 const MoeWorkspace ws) {
  PdlBegin();                                     // launched by LaunchPdl (pdl.cuh)
  __shared__ float s_red[kSkWarps][2][2][4][32];  // [warp][tile][token n8][reg][lane]
  const int4 tile = ws.tile_info[blockIdx.y];
  if (tile.x < 0) return;  // no work: uniform per CTA, before the barrier
  const int e = tile.x, p0 = tile.y, rows = tile.z;
  const int K = kGateUp ? a.D : a.I;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;

  // Weight tiles: gate+up: W1 / W3 rows n0 .. n0+15; down: W2 rows n0 .. n0+31.
  int n0;
  const bf16 *wt0, *wt1;
  if (kGateUp) {
    n0 = blockIdx.x * 16;
    wt0 = static_cast<const bf16*>(a.w1[e]) + static_cast<int64_t>(n0) * K;
    wt1 = static_cast<const bf16*>(a.w3[e]) + static_cast<int64_t>(n0) * K;
  } else {
    n0 = blockIdx.x * 32;
    wt0 = static_cast<const bf16*>(a.w2[e]) + static_cast<int64_t>(n0) * K;
    wt1 = wt0 + static_cast<int64_t>(16) * K;
  }
  const bf16* wr[4] = {wt0 + g * K + 8 * t4, wt0 + (g + 8) * K + 8 * t4, wt1 + g * K + 8 * t4,
                       wt1 + (g + 8) * K + 8 * t4};
  const bf16* xr0 = g < rows ? ActRow<kGateUp>(a, ws, p0 + g) + 8 * t4 : nullptr;
  const bf16* xr1 = g + 8 < rows ? ActRow<kGateUp>(a, ws, p0 + g + 8) + 8 * t4 : nullptr;
  const bool two = rows > 8;  // second token n8 tile in use (CTA-uniform)
  // Down: the epilogue's routing weight (two dependent loads) fetched now, while the
  // weight stream runs, instead of after the reduction (ncu, H200, 48B decode B = 1:
  // 15.6 -> 14.6-14.9 us per launch).
  float wscale = 0.0f;
  if (!kGateUp && (tid >> 4) < rows) wscale = a.topk_weights[ws.sorted_slot[p0 + (tid >> 4)]];

  float acc[2][2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  const int steps = K / 32;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int s = warp; s < steps; s += kSkWarps * kSkU) {
    uint4 wv[kSkU][4], xv[kSkU][2];
#pragma unroll
    for (int u = 0; u < kSkU; ++u) {  // all loads first
      const int su = s + u * kSkWarps;
      const int64_t ko = static_cast<int64_t>(su) * 32;
      const bool ok = su < steps;
#pragma unroll
      for (int r = 0; r < 4; ++r) wv[u][r] = ok ? LdgStream(wr[r] + ko) : zero;
      xv[u][0] = (ok && xr0 != nullptr) ? Ldg16(xr0 + ko) : zero;
      xv[u][1] = (ok && xr1 != nullptr) ? Ldg16(xr1 + ko) : zero;
    }
#pragma unroll
    for (int u = 0; u < kSkU; ++u) {
      if (s + u * kSkWarps >= steps) break;  // warp-uniform
#pragma unroll
      for (int tile = 0; tile < 2; ++tile) {
        const uint4 ra = wv[u][2 * tile], rb = wv[u][2 * tile + 1];  // rows g, g + 8
        // k 8t+0..3 as mma 0 (a0/a1: 2t.., a2/a3: 2t+8..), 8t+4..7 as mma 1.
        const uint32_t A0[4] = {ra.x, rb.x, ra.y, rb.y};
        const uint32_t A1[4] = {ra.z, rb.z, ra.w, rb.w};
        Mma16816(acc[tile][0], A0, xv[u][0].x, xv[u][0].y);
        Mma16816(acc[tile][0], A1, xv[u][0].z, xv[u][0].w);
        if (two) {
          Mma16816(acc[tile][1], A0, xv[u][1].x, xv[u][1].y);
          Mma16816(acc[tile][1], A1, xv[u][1].z, xv[u][1].w);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) s_red[warp][i][j][r][lane] = acc[i][j][r];
  __syncthreads();
  // Thread (token m, weight row rr): c0/c1 = (row g, tokens 2t, 2t+1), c2/c3 = row g + 8.
  const int m = tid >> 4, rr = tid & 15;
  if (m >= rows) return;
  const int nt = m >> 3, mm = m & 7;
  const int reg = (rr >> 3) * 2 + (mm & 1), ln = (rr & 7) * 4 + (mm >> 1);
  float v[2];
#pragma unroll
  for (int tile = 0; tile < 2; ++tile) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kSkWarps; ++w) sum += s_red[w][tile][nt][reg][ln];
    v[tile] = sum;
  }
  const int64_t p = p0 + m;
  if (kGateUp) {
    static_cast<bf16*>(ws.h)[p * a.I + n0 + rr] = __float2bfloat16_rn(SiluMul(v[0], v[1]));
  } else {
    const float w = wscale;  // thread (m, rr) fetched token m's weight above
    float* y = ws.y + p * a.D + n0;
    y[rr] = w * v[0];
    y[16 + rr] = w * v[1];
  }
}

// ---- tiled (prefill) --------------------------------------------------------------------
constexpr int kTlBM = kMoeTiledRows, kTlBN = 128, kTlBK = 32, kTlStages = 3, kTlThreads = 256;
static_assert(kTlBM == 128, "loader and warp layout assume 128 rows");

// Element offset of 8-element chunk `ch` (0..3) of row r in a [rows][32] bf16 tile:
// chunk index XOR (r / 2) % 4, so the 8 rows an ldmatrix phase reads hit 8 distinct
// 16-byte bank groups.
__device__ __forceinline__ int Swz(int r, int ch) { return r * kTlBK + ((ch ^ ((r >> 1) & 3)) << 3); }

template <bool kGateUp>
__global__ void __launch_bounds__(kTlThreads) MoeTiledKernel(const MoeGemmArgs a,
                                                             const MoeWorkspace ws) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  __shared__ alignas(128) bf16 sA[kTlStages][kTlBM * kTlBK];
  __shared__ alignas(128) bf16 sB[kTlStages][kTlBN * kTlBK];
  const int4 tile = ws.tile_info[blockIdx.y];
  if (tile.x < 0) return;  // no work: uniform per CTA, before the barrier
  const int e = tile.x, p0 = tile.y, rows = tile.z;
  const int K = kGateUp ? a.D : a.I;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // gate+up: B row rr is W1 (8-row block rr/8 even) or W3 (odd) row n0 + (rr/16)*8 + rr%8,
  // so n8 tiles alternate gate / up for the same 8 intermediate columns.
  const int n0 = blockIdx.x * (kGateUp ? kTlBN / 2 : kTlBN);

  // Loader: chunk c of rows lr and lr + 64 of both tiles.
  const int c = tid & 3, lr = tid >> 2;
  const bf16* asrc[2];
  int abytes[2];
  const bf16* bsrc[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lr + 64 * i;
    if (r < rows) {
      asrc[i] = ActRow<kGateUp>(a, ws, p0 + r) + c * 8;
      abytes[i] = 16;
    } else {  // zero-fill; the address is valid but not read
      asrc[i] = kGateUp ? reinterpret_cast<const bf16*>(ws.xb) : static_cast<const bf16*>(ws.h);
      abytes[i] = 0;
    }
    const bf16* mat;
    int n;
    if (kGateUp) {
      const int b = r >> 3;
      mat = static_cast<const bf16*>((b & 1) ? a.w3[e] : a.w1[e]);
      n = n0 + (b >> 1) * 8 + (r & 7);
    } else {
      mat = static_cast<const bf16*>(a.w2[e]);
      n = n0 + r;
    }
    bsrc[i] = mat + static_cast<int64_t>(n) * K + c * 8;
  }
  auto load_stage = [&](int stage, int kt) {
    const int ko = kt * kTlBK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = lr + 64 * i;
      CpAsync16(&sA[stage][Swz(r, c)], asrc[i] + (abytes[i] ? ko : 0), abytes[i]);
      CpAsync16(&sB[stage][Swz(r, c)], bsrc[i] + ko);
    }
  };

  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64.., B rows wn*32..
  // Rows of this warp's 64 that hold routed slots: m16 tiles past them are all zeros
  // (zero-filled A), so their ldmatrix / mma are skipped (a warp-uniform test). An
  // expert's last tile is often nearly empty at prefill sizes.
  const int warp_rows = rows - wm * 64;
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  const int KT = K / kTlBK;
  load_stage(0, 0);
  CpAsyncCommit();
  if (KT > 1) load_stage(1, 1);
  CpAsyncCommit();
  for (int kt = 0; kt < KT; ++kt) {
    CpAsyncWait<1>();  // groups 0 .. kt landed (this thread's copies)
    __syncthreads();   // everyone's copies visible; stage (kt + 2) % 3 no longer read
    if (kt + 2 < KT) load_stage((kt + 2) % kTlStages, kt + 2);
    CpAsyncCommit();
    const bf16* tA = sA[kt % kTlStages];
    const bf16* tB = sB[kt % kTlStages];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t af[4][4], bfr[2][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        if (mi * 16 >= warp_rows) break;
        const int row = wm * 64 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        Ldmatrix4(af[mi], tA + Swz(row, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int row = wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8;
        Ldmatrix4(bfr[np], tB + Swz(row, kk * 2 + ((lane >> 3) & 1)));
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        if (mi * 16 >= warp_rows) break;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          Mma16816(acc[mi][ni], af[mi], bfr[ni >> 1][(ni & 1) * 2], bfr[ni >> 1][(ni & 1) * 2 + 1]);
        }
      }
    }
  }
  CpAsyncWait<0>();  // no copy outlives the CTA (the last groups are empty)

  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int m = wm * 64 + mi * 16 + g + 8 * hr;
      if (m >= rows) continue;
      const int64_t p = p0 + m;
      if (kGateUp) {
        bf16* h = static_cast<bf16*>(ws.h) + p * a.I;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int i = n0 + (wn * 2 + j) * 8 + 2 * t4;
          *reinterpret_cast<__nv_bfloat162*>(h + i) = __floats2bfloat162_rn(
              SiluMul(acc[mi][2 * j][2 * hr], acc[mi][2 * j + 1][2 * hr]),
              SiluMul(acc[mi][2 * j][2 * hr + 1], acc[mi][2 * j + 1][2 * hr + 1]));
        }
      } else {
        const float w = a.topk_weights[ws.sorted_slot[p]];
        float* y = ws.y + p * a.D + n0 + wn * 32 + 2 * t4;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          *reinterpret_cast<float2*>(y + ni * 8) =
              make_float2(w * acc[mi][ni][2 * hr], w * acc[mi][ni][2 * hr + 1]);
        }
      }
    }
  }
}

}  // namespace

cudaError_t LaunchMoeTcGemms(const MoeGemmArgs& a, const MoeWorkspace& ws, bool skinny,
                             cudaStream_t stream) {
  const unsigned my = static_cast<unsigned>(a.max_m_tiles);
  if (skinny) {
    LaunchPdl(MoeSkinnyKernel<true>, dim3(a.I / 16, my), kSkThreads, 0, stream, a, ws);
    LaunchPdl(MoeSkinnyKernel<false>, dim3(a.D / 32, my), kSkThreads, 0, stream, a, ws);
  } else {
    LaunchPdl(MoeTiledKernel<true>, dim3(a.I / (kTlBN / 2), my), kTlThreads, 0, stream, a, ws);
    LaunchPdl(MoeTiledKernel<false>, dim3(a.D / kTlBN, my), kTlThreads, 0, stream, a, ws);
  }
  return cudaGetLastError();
}

}  // namespace kl::cuda::internal
