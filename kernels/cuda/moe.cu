// MoE routing and routed experts: launchers, validation, and the kernels that are
// not tensor-core GEMMs (routing, sort, bf16 copy of x, the exact fp32 GEMMs, the
// combine). Design (README.md, "MoE"):
//  - MoeRoute: many tokens: one warp per token, expert e held by lane e % 32 (register
//    slot e / 32, E <= 512 -> 16 registers); k rounds of (per-lane scan, strict '>'
//    upward) + warp argmax with ties to the lower id = the CPU's upward strict scan.
//    Few tokens (decode): one CTA per token, each expert counts its rank in (score
//    desc, id asc) at once, the same picks without k dependent rounds (NaN scores fall
//    back to the scan).
//  - MoeExperts: one-CTA sort (shared-memory histogram, warp scan, scatter) gives
//    expert offsets, per-expert M-tile offsets and the permutation; GEMM grids are
//    (N tiles, worst-case M tiles) and a CTA finds its expert by binary search over
//    the tile offsets (tiles past the total exit). Gate+up is one GEMM (both weight
//    row blocks in one CTA) with SwiGLU in the epilogue; down writes w * (W2 h) per
//    routed slot; the combine gathers each token's k rows in ascending expert id
//    (optionally adding them to what `out` holds: a shared expert's output).
//  - Each expert's rows are in slot order (a stable scatter), the GEMMs have a fixed
//    reduction order and the combine no atomics: results are bitwise reproducible.
#include <cuda_bf16.h>

#include <climits>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/moe_internal.h"
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda {
namespace {

using internal::MoeGemmArgs;
using internal::MoeWorkspace;

// ---- routing ---------------------------------------------------------------------------
constexpr int kRouteWarps = 4;
constexpr int kRouteSlots = kMoeMaxExperts / 32;  // experts per lane

struct RouteArgs {
  const float* logits;
  const float* bias;
  int32_t* ids;
  float* weights;
  int64_t T;
  int32_t E, K;
  int32_t renormalize, biased;
  double scale;
};

// Same expression as the CPU's Sigmoidf (libm-accurate expf, IEEE division).
__device__ __forceinline__ float SigmoidExact(float x) { return 1.0f / (1.0f + expf(-x)); }

// Picks of one token = the CPU's sequential scan (best = lowest untaken id, replaced
// by each later untaken id with a strictly greater score). That scan picks the lowest
// untaken id when its score is NaN (nothing compares greater), else the greatest
// non-NaN score with ties to the lower id (a NaN never compares greater). Each of the
// k rounds: per-lane scan over the lane's non-NaN untaken experts, warp argmax (ties to
// the lower id); with a NaN in the token, also the lowest untaken id and its score.
// sel[i]: selection score of expert lane + 32 i; s_sig[e]: sigmoid of expert e
// (shared memory, the weight of an unbiased pick).
__device__ __forceinline__ void WarpPicks(int E, int K, int lane, const float (&sel)[kRouteSlots],
                                          const float* s_sig, bool biased, int32_t* s_id, float* s_w) {
  bool lane_nan = false;
#pragma unroll
  for (int i = 0; i < kRouteSlots; ++i) lane_nan |= lane + 32 * i < E && sel[i] != sel[i];
  const bool has_nan = __any_sync(0xffffffffu, lane_nan);
  uint32_t taken = 0;  // bit i: expert lane + 32 i already picked
  for (int j = 0; j < K; ++j) {
    float bv = 0.0f;
    int be = INT_MAX;
#pragma unroll
    for (int i = 0; i < kRouteSlots; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !((taken >> i) & 1u) && sel[i] == sel[i] && (be == INT_MAX || sel[i] > bv)) {
        bv = sel[i];
        be = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oe = __shfl_xor_sync(0xffffffffu, be, o);
      const bool take = oe != INT_MAX && (be == INT_MAX || ov > bv || (ov == bv && oe < be));
      if (take) {
        bv = ov;
        be = oe;
      }
    }
    be = __shfl_sync(0xffffffffu, be, 0);
    bv = __shfl_sync(0xffffffffu, bv, 0);
    if (has_nan) {  // is the lowest untaken id's score NaN? then it is the pick
      int first = INT_MAX;
      bool first_nan = false;
#pragma unroll
      for (int i = kRouteSlots - 1; i >= 0; --i) {
        if (lane + 32 * i < E && !((taken >> i) & 1u)) {
          first = lane + 32 * i;
          first_nan = sel[i] != sel[i];
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const int of = __shfl_xor_sync(0xffffffffu, first, o);
        const bool on = __shfl_xor_sync(0xffffffffu, first_nan, o);
        if (of < first) {
          first = of;
          first_nan = on;
        }
      }
      if (first_nan) {  // the same on every lane
        be = first;
        bv = __int_as_float(0x7fffffff);
      }
    }
    // k <= E: be is a valid id (an all-NaN remainder has a NaN lowest untaken id).
    if ((be & 31) == lane) taken |= 1u << (be >> 5);
    if (lane == 0) {
      s_id[j] = be;
      s_w[j] = biased ? bv : s_sig[be];  // no dependent global load
    }
  }
}

// Writes a token's k picks: every lane forms the same double sum in pick order (as
// the CPU); lane j < k writes pick j.
__device__ __forceinline__ void WritePicks(const RouteArgs& a, int64_t t, int lane, const int32_t* s_id,
                                           const float* s_w) {
  double sum = 0.0;
  for (int j = 0; j < a.K; ++j) sum += static_cast<double>(s_w[j]);
  const double norm = a.renormalize ? 1.0 / (sum + 1e-20) : 1.0;
  if (lane < a.K) {
    a.ids[t * a.K + lane] = s_id[lane];
    a.weights[t * a.K + lane] = static_cast<float>(static_cast<double>(s_w[lane]) * norm * a.scale);
  }
}

// Many tokens: one warp per token, expert e in lane e % 32, register slot e / 32.
__global__ void __launch_bounds__(kRouteWarps * 32) MoeRouteKernel(const RouteArgs a) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  __shared__ int32_t s_id[kRouteWarps][kMoeMaxTopK];
  __shared__ float s_w[kRouteWarps][kMoeMaxTopK];
  __shared__ float s_sig[kRouteWarps][kMoeMaxExperts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= a.T) return;  // whole warp; no block-wide barrier below
  const float* lg = a.logits + t * a.E;
  const int E = a.E;
  float sel[kRouteSlots];
#pragma unroll
  for (int i = 0; i < kRouteSlots; ++i) {
    const int e = lane + 32 * i;
    sel[i] = 0.0f;
    if (e < E) {
      const float sg = SigmoidExact(lg[e]);
      s_sig[warp][e] = sg;
      sel[i] = sg + (a.bias != nullptr ? a.bias[e] : 0.0f);
    }
  }
  __syncwarp();
  WarpPicks(E, a.K, lane, sel, s_sig[warp], a.biased, s_id[warp], s_w[warp]);
  __syncwarp();
  WritePicks(a, t, lane, s_id[warp], s_w[warp]);
}

// Few tokens (decode): one CTA per token. With no NaN score the k picks of the
// sequential scan are the experts of rank < k in the order (score desc, id asc), so
// every expert finds its rank by counting at once instead of k dependent rounds; a
// token with a NaN score takes the warp path above (the CPU's scan is not a total
// order then; the warp rounds above follow it exactly).
constexpr int kRankThreads = 256;
__global__ void __launch_bounds__(kRankThreads) MoeRouteRankKernel(const RouteArgs a) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  __shared__ float s_sel[kMoeMaxExperts], s_sig[kMoeMaxExperts];
  __shared__ int32_t s_id[kMoeMaxTopK];
  __shared__ float s_w[kMoeMaxTopK];
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x, E = a.E;
  const float* lg = a.logits + t * E;
  int nan = 0;
  for (int e = tid; e < E; e += kRankThreads) {
    const float sg = SigmoidExact(lg[e]);
    const float sl = sg + (a.bias != nullptr ? a.bias[e] : 0.0f);
    s_sig[e] = sg;
    s_sel[e] = sl;
    nan |= sl != sl;
  }
  if (__syncthreads_or(nan)) {
    if (tid < 32) {
      float sel[kRouteSlots];
#pragma unroll
      for (int i = 0; i < kRouteSlots; ++i) sel[i] = tid + 32 * i < E ? s_sel[tid + 32 * i] : 0.0f;
      WarpPicks(E, a.K, tid, sel, s_sig, a.biased, s_id, s_w);
      __syncwarp();
      WritePicks(a, t, tid, s_id, s_w);
    }
    return;
  }
  for (int e = tid; e < E; e += kRankThreads) {
    const float x = s_sel[e];
    int rank = 0;
#pragma unroll 8
    for (int e2 = 0; e2 < E; ++e2) {
      const float y = s_sel[e2];  // same address across the warp: a broadcast
      rank += (y > x || (y == x && e2 < e)) ? 1 : 0;
    }
    if (rank < a.K) {
      s_id[rank] = e;
      s_w[rank] = a.biased ? x : s_sig[e];
    }
  }
  __syncthreads();
  if (tid < 32) WritePicks(a, t, tid, s_id, s_w);
}

// ---- sort: counts, offsets, tile offsets, permutation (one CTA) -------------------------
__device__ __forceinline__ uint2 ToBf16x4(const float4 v) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<uint32_t*>(&lo);
  u.y = *reinterpret_cast<uint32_t*>(&hi);
  return u;
}

constexpr int kSortThreads = 1024;
// Decode batches whose x has at most this many float4 (4 per thread) get their bf16
// copy from the sort kernel instead of a launch of ToBf16Kernel of their own (at
// decode batch 1 each launch is ~2 us of latency, 26 per token at the 48B shape).
constexpr int64_t kSortFusedBf16Max = 4 * kSortThreads;

__global__ void __launch_bounds__(kSortThreads)
    MoeSortKernel(const int32_t* __restrict__ ids, int32_t S, int32_t E, int32_t rows_per_tile,
                  int32_t max_tiles, MoeWorkspace ws, const float4* __restrict__ x, int32_t x_n4) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  __shared__ int32_t s_cnt[kMoeMaxExperts];
  __shared__ int32_t s_cur[kMoeMaxExperts];
  __shared__ int32_t s_off[kMoeMaxExperts + 1];
  __shared__ int32_t s_toff[kMoeMaxExperts + 1];
  __shared__ uint16_t s_wcnt[kSortThreads / 32][kMoeMaxExperts];  // per-round warp counts
  const int tid = threadIdx.x;
  // The fused bf16 copy of x (x_n4 <= kSortFusedBf16Max; 0: none): loads first.
  if (x_n4 > 0) {
    float4 v[kSortFusedBf16Max / kSortThreads];
#pragma unroll
    for (int j = 0; j < kSortFusedBf16Max / kSortThreads; ++j) {
      const int i = tid + j * kSortThreads;
      if (i < x_n4) v[j] = x[i];
    }
#pragma unroll
    for (int j = 0; j < kSortFusedBf16Max / kSortThreads; ++j) {
      const int i = tid + j * kSortThreads;
      if (i < x_n4) reinterpret_cast<uint2*>(ws.xb)[i] = ToBf16x4(v[j]);
    }
  }
  for (int e = tid; e < E; e += kSortThreads) s_cnt[e] = 0;
  // A round's slots are contiguous, so only warps below ceil(min(S, 1024) / 32) have
  // slots, and a slot reads only lower warps' rows: those rows are all that is zeroed.
  const int used_warps = (min(S, kSortThreads) + 31) / 32;
  for (int i = tid; i < used_warps * kMoeMaxExperts; i += kSortThreads) (&s_wcnt[0][0])[i] = 0;
  __syncthreads();
  for (int s = tid; s < S; s += kSortThreads) {
    const int32_t e = ids[s];
    if (e >= 0 && e < E) atomicAdd(&s_cnt[e], 1);
  }
  __syncthreads();
  if (tid < 32) {  // warp 0: exclusive scans of counts and of ceil(count / rows_per_tile)
    const int lane = tid;
    const int per = (E + 31) / 32;
    const int lo = lane * per;
    int c = 0, tl = 0;
    for (int i = 0; i < per; ++i) {
      const int e = lo + i;
      if (e < E) {
        c += s_cnt[e];
        tl += (s_cnt[e] + rows_per_tile - 1) / rows_per_tile;
      }
    }
    int ci = c, ti = tl;  // inclusive scans
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int cn = __shfl_up_sync(0xffffffffu, ci, o);
      const int tn = __shfl_up_sync(0xffffffffu, ti, o);
      if (lane >= o) {
        ci += cn;
        ti += tn;
      }
    }
    int cp = ci - c, tp = ti - tl;
    for (int i = 0; i < per; ++i) {
      const int e = lo + i;
      if (e < E) {
        ws.offsets[e] = cp;
        ws.tile_off[e] = tp;
        s_off[e] = cp;
        s_toff[e] = tp;
        s_cur[e] = cp;
        cp += s_cnt[e];
        tp += (s_cnt[e] + rows_per_tile - 1) / rows_per_tile;
      }
    }
    if (lane == 31) {
      ws.offsets[E] = ci;
      ws.tile_off[E] = ti;
      s_off[E] = ci;
      s_toff[E] = ti;
    }
  }
  __syncthreads();
  // Tile table: the expert of tile mt is the largest e with s_toff[e] <= mt (experts
  // without rows have s_toff[e] == s_toff[e + 1] and are skipped).
  const int tiles = s_toff[E];
  for (int mt = tid; mt < max_tiles; mt += kSortThreads) {
    int4 info = make_int4(-1, 0, 0, 0);
    if (mt < tiles) {
      int lo = 0, hi = E - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_toff[mid] <= mt) lo = mid; else hi = mid - 1;
      }
      const int p0 = s_off[lo] + (mt - s_toff[lo]) * rows_per_tile;
      info = make_int4(lo, p0, min(rows_per_tile, s_off[lo + 1] - p0), 0);
    }
    ws.tile_info[mt] = info;
  }
  // Stable scatter, kSortThreads slots per round: a slot's position is its expert's
  // cursor + same-expert slots of lower warps (s_wcnt) + lower lanes of its own warp
  // (match_any), so each expert's rows stay in slot order: the permutation, and with it
  // every result, is the same on every run.
  const int warp = tid >> 5, lane = tid & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = 0; base < S; base += kSortThreads) {  // uniform trip count
    const int s = base + tid;
    int32_t e = -1;
    if (s < S) {
      e = ids[s];
      if (e < 0 || e >= E) e = -1;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & lanes_below);
    const bool leader = rank == 0 && e >= 0;
    if (leader) s_wcnt[warp][e] = static_cast<uint16_t>(__popc(peers));
    __syncthreads();
    int32_t pos = -1;
    if (e >= 0) {
      pos = s_cur[e] + rank;
      for (int w = 0; w < warp; ++w) pos += s_wcnt[w][e];
      ws.sorted_slot[pos] = s;
    }
    if (s < S) ws.slot_pos[s] = pos;
    __syncthreads();  // every read of s_cur / s_wcnt of this round is done
    if (leader) {
      atomicAdd(&s_cur[e], __popc(peers));  // integer: order-independent
      s_wcnt[warp][e] = 0;
    }
    __syncthreads();
  }
}

// ---- bf16 copy of x (tensor-core paths) ----------------------------------------------------
__global__ void ToBf16Kernel(const float4* __restrict__ x, uint2* __restrict__ xb, int64_t n4) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    xb[i] = ToBf16x4(x[i]);
  }
}

// ---- exact fp32 GEMMs (SIMT) ---------------------------------------------------------------
constexpr int kExRows = internal::kMoeExactRows;  // 16 rows per M tile
constexpr int kExBN = 64;                          // output columns per CTA
constexpr int kExBK = 32;
constexpr int kExThreads = 256;

__device__ __forceinline__ float WToF32(float w) { return w; }
__device__ __forceinline__ float WToF32(__nv_bfloat16 w) { return __bfloat162float(w); }

// kGateUp: h[p][n] = silu(x_p . W1[n]) * (x_p . W3[n]) (fp32 h), n < I, K = D.
// else:    y[p][n] = w_p * (h_p . W2[n]), n < D, K = I.
// Thread (m = tid / 16, c = tid % 16) owns outputs n0 + c + 16 q, q < 4, of row m.
template <class W, bool kGateUp>
__global__ void __launch_bounds__(kExThreads) MoeExactGemmKernel(const MoeGemmArgs a,
                                                                 const MoeWorkspace ws) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  constexpr int kBRows = kGateUp ? 2 * kExBN : kExBN;
  __shared__ float sA[kExRows][kExBK + 1];
  __shared__ float sB[kBRows][kExBK + 1];
  __shared__ const float* s_arow[kExRows];
  const int4 tile = ws.tile_info[blockIdx.y];
  if (tile.x < 0) return;  // no work: uniform per CTA, before any barrier
  const int e = tile.x, p0 = tile.y, rows = tile.z;
  const int K = kGateUp ? a.D : a.I, N = kGateUp ? a.I : a.D;
  const int n0 = blockIdx.x * kExBN;
  const W* wa = static_cast<const W*>(kGateUp ? a.w1[e] : a.w2[e]);
  const W* wb = kGateUp ? static_cast<const W*>(a.w3[e]) : nullptr;
  const int tid = threadIdx.x, m = tid >> 4, c = tid & 15;
  if (tid < kExRows) {
    const float* src = nullptr;
    if (tid < rows) {
      const int64_t p = p0 + tid;
      src = kGateUp ? a.x + static_cast<int64_t>(ws.sorted_slot[p] / a.topk) * a.D
                    : static_cast<const float*>(ws.h) + p * a.I;
    }
    s_arow[tid] = src;
  }
  __syncthreads();
  float accg[4] = {0.f, 0.f, 0.f, 0.f}, accu[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k0 = 0; k0 < K; k0 += kExBK) {
    for (int i = tid; i < kExRows * kExBK; i += kExThreads) {
      const int r = i / kExBK, kk = i % kExBK;
      sA[r][kk] = (r < rows && k0 + kk < K) ? s_arow[r][k0 + kk] : 0.0f;
    }
    for (int i = tid; i < kBRows * kExBK; i += kExThreads) {
      const int r = i / kExBK, kk = i % kExBK;
      const int n = n0 + (r % kExBN);
      const W* src = (r < kExBN) ? wa : wb;
      sB[r][kk] = (n < N && k0 + kk < K) ? WToF32(src[static_cast<int64_t>(n) * K + k0 + kk]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kExBK; ++kk) {
      const float av = sA[m][kk];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        accg[q] = fmaf(av, sB[c + 16 * q][kk], accg[q]);
        if (kGateUp) accu[q] = fmaf(av, sB[kExBN + c + 16 * q][kk], accu[q]);
      }
    }
    __syncthreads();
  }
  if (m >= rows) return;
  const int64_t p = p0 + m;
  if (kGateUp) {
    float* h = static_cast<float*>(ws.h) + p * a.I;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int n = n0 + c + 16 * q;
      if (n < N) h[n] = accg[q] * SigmoidExact(accg[q]) * accu[q];
    }
  } else {
    const float w = a.topk_weights[ws.sorted_slot[p]];
    float* y = ws.y + p * a.D;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int n = n0 + c + 16 * q;
      if (n < N) y[n] = w * accg[q];
    }
  }
}

// ---- combine: out[t] (+)= Σ over the token's slots in ascending expert id of y[pos] -----
// Grid (T, column blocks): a token's row is spread over several CTAs, so a decode step
// (T = 1) is not one CTA's serial loop; the k loads of an output are issued together.
constexpr int kCombineThreads = 128;

__global__ void __launch_bounds__(kCombineThreads)
    MoeCombineKernel(const int32_t* __restrict__ ids, const int32_t* __restrict__ slot_pos,
                     const float4* __restrict__ y, int32_t D4, int32_t topk, int32_t accumulate,
                     float4* __restrict__ out) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  __shared__ int32_t s_pos[kMoeMaxTopK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < kMoeMaxTopK) s_pos[threadIdx.x] = -1;
  __syncthreads();
  if (threadIdx.x < topk) {
    // Rank of slot j among the token's slots by (expert id, j): the CPU's expert order.
    const int j = threadIdx.x;
    const int32_t e = ids[t * topk + j];
    int rank = 0;
    for (int jj = 0; jj < topk; ++jj) {
      const int32_t ee = ids[t * topk + jj];
      rank += (ee < e || (ee == e && jj < j)) ? 1 : 0;
    }
    s_pos[rank] = slot_pos[t * topk + j];  // -1: out-of-range id, contributes nothing
  }
  __syncthreads();
  const int d = blockIdx.y * kCombineThreads + threadIdx.x;
  if (d >= D4) return;
  float4 v[kMoeMaxTopK];
#pragma unroll
  for (int r = 0; r < kMoeMaxTopK; ++r) {
    const int32_t p = s_pos[r];
    v[r] = p >= 0 ? y[static_cast<int64_t>(p) * D4 + d] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int r = 0; r < kMoeMaxTopK; ++r) {  // same order and rounding as the serial sum
    if (s_pos[r] < 0) continue;
    acc.x += v[r].x;
    acc.y += v[r].y;
    acc.z += v[r].z;
    acc.w += v[r].w;
  }
  float4* o = out + t * D4 + d;
  if (accumulate) {
    const float4 prev = *o;
    acc = make_float4(prev.x + acc.x, prev.y + acc.y, prev.z + acc.z, prev.w + acc.w);
  }
  *o = acc;
}

template <class W>
cudaError_t LaunchExactGemms(const MoeGemmArgs& a, const MoeWorkspace& ws, cudaStream_t stream) {
  const dim3 g1((a.I + kExBN - 1) / kExBN, a.max_m_tiles), g2((a.D + kExBN - 1) / kExBN, a.max_m_tiles);
  LaunchPdl(MoeExactGemmKernel<W, true>, g1, kExThreads, 0, stream, a, ws);
  LaunchPdl(MoeExactGemmKernel<W, false>, g2, kExThreads, 0, stream, a, ws);
  return cudaGetLastError();
}

int RowsPerTile(MoeAlgo algo) {
  return algo == MoeAlgo::kExact              ? internal::kMoeExactRows
         : algo == MoeAlgo::kTensorCoreSkinny ? internal::kMoeSkinnyRows
                                              : internal::kMoeTiledRows;
}

size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

// Byte offsets of the workspace views (256-byte aligned each).
struct Layout {
  size_t offsets, tile_off, tile_info, sorted_slot, slot_pos, xb, h, y, total;
};

Layout MakeLayout(const MoeExpertsParams& p, MoeAlgo algo) {
  const size_t S = static_cast<size_t>(p.num_tokens) * static_cast<size_t>(p.top_k);
  const bool tc = algo != MoeAlgo::kExact;
  Layout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += AlignUp(bytes);
    return here;
  };
  l.offsets = take(4 * static_cast<size_t>(p.num_experts + 1));
  l.tile_off = take(4 * static_cast<size_t>(p.num_experts + 1));
  l.tile_info = take(16 * static_cast<size_t>(
                              internal::MoeMaxMTiles(static_cast<int64_t>(S), p.num_experts,
                                                     RowsPerTile(algo))));
  l.sorted_slot = take(4 * S);
  l.slot_pos = take(4 * S);
  l.xb = take(tc ? 2 * static_cast<size_t>(p.num_tokens) * static_cast<size_t>(p.hidden) : 0);
  l.h = take((tc ? 2 : 4) * S * static_cast<size_t>(p.inter));
  l.y = take(4 * S * static_cast<size_t>(p.hidden));
  l.total = at;
  return l;
}

bool Aligned(const void* x, uintptr_t n) { return reinterpret_cast<uintptr_t>(x) % n == 0; }

}  // namespace

absl::Status MoeRoute(const MoeRouteParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0) return absl::InvalidArgumentError("MoeRoute: num_tokens < 0");
  if (p.num_experts < 1 || p.num_experts > kMoeMaxExperts) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoeRoute: num_experts out of [1, ", kMoeMaxExperts, "]: ", p.num_experts));
  }
  if (p.top_k < 1 || p.top_k > kMoeMaxTopK || p.top_k > p.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("MoeRoute: top_k out of [1, min(", kMoeMaxTopK,
                                                   ", E)]: ", p.top_k));
  }
  if (p.num_tokens == 0) return absl::OkStatus();
  if (p.logits == nullptr || p.topk_ids == nullptr || p.topk_weights == nullptr) {
    return absl::InvalidArgumentError("MoeRoute: null tensor pointer");
  }
  const int64_t blocks = (p.num_tokens + kRouteWarps - 1) / kRouteWarps;
  if (blocks > INT32_MAX) return absl::InvalidArgumentError("MoeRoute: too many tokens");
  RouteArgs a{p.logits,
              p.correction_bias,
              p.topk_ids,
              p.topk_weights,
              p.num_tokens,
              static_cast<int32_t>(p.num_experts),
              static_cast<int32_t>(p.top_k),
              p.renormalize ? 1 : 0,
              p.biased_weights ? 1 : 0,
              p.routed_scaling_factor};
  if (p.num_tokens <= kMoeRouteRankMaxTokens) {
    LaunchPdl(MoeRouteRankKernel, static_cast<unsigned>(p.num_tokens), kRankThreads, 0, stream, a);
  } else {
    LaunchPdl(MoeRouteKernel, static_cast<unsigned>(blocks), kRouteWarps * 32, 0, stream, a);
  }
  return CudaStatus(cudaGetLastError(), "MoeRoute");
}

MoeAlgo MoeResolveAlgo(const MoeExpertsParams& p) {
  if (p.algo != MoeAlgo::kAuto) return p.algo;
  if (p.weight_dtype != DType::kBF16) return MoeAlgo::kExact;
  return p.num_tokens <= kMoeSkinnyMaxTokens ? MoeAlgo::kTensorCoreSkinny
                                             : MoeAlgo::kTensorCoreTiled;
}

size_t MoeWorkspaceBytes(const MoeExpertsParams& p) {
  if (p.num_tokens <= 0 || p.top_k <= 0 || p.num_experts <= 0 || p.hidden <= 0 || p.inter <= 0) {
    return 0;
  }
  return MakeLayout(p, MoeResolveAlgo(p)).total;
}

absl::Status MoeExperts(const MoeExpertsParams& p, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  if (p.num_tokens < 0) return absl::InvalidArgumentError("MoeExperts: num_tokens < 0");
  if (p.num_experts < 1 || p.num_experts > kMoeMaxExperts) {
    return absl::InvalidArgumentError(absl::StrCat("MoeExperts: num_experts out of [1, ",
                                                   kMoeMaxExperts, "]: ", p.num_experts));
  }
  if (p.top_k < 1 || p.top_k > kMoeMaxTopK) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoeExperts: top_k out of [1, ", kMoeMaxTopK, "]: ", p.top_k));
  }
  if (p.hidden < 4 || p.hidden % 4 != 0 || p.inter < 1 || p.hidden > (1 << 20) ||
      p.inter > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoeExperts: hidden must be a positive multiple of 4 and hidden, inter <= 2^20: D=",
        p.hidden, " I=", p.inter));
  }
  if (p.weight_dtype != DType::kF32 && p.weight_dtype != DType::kBF16) {
    return absl::InvalidArgumentError("MoeExperts: weight dtype must be kF32 or kBF16");
  }
  const MoeAlgo algo = MoeResolveAlgo(p);
  const bool tc = algo != MoeAlgo::kExact;
  if (tc && (p.weight_dtype != DType::kBF16 || p.hidden % 128 != 0 || p.inter % 64 != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoeExperts: tensor-core paths need bf16 weights, hidden % 128 == 0 and inter % 64 == 0 "
        "(D=", p.hidden, " I=", p.inter, ")"));
  }
  if (p.num_tokens == 0) return absl::OkStatus();
  const int64_t S = p.num_tokens * p.top_k;
  const int rows_per_tile = RowsPerTile(algo);
  const int64_t max_m_tiles = internal::MoeMaxMTiles(S, p.num_experts, rows_per_tile);
  if (S > INT32_MAX / 2 || max_m_tiles > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoeExperts: too many routed slots for one call (T*k = ", S, "); split the batch"));
  }
  if (p.x == nullptr || p.topk_ids == nullptr || p.topk_weights == nullptr || p.w1 == nullptr ||
      p.w3 == nullptr || p.w2 == nullptr || p.out == nullptr) {
    return absl::InvalidArgumentError("MoeExperts: null tensor pointer");
  }
  const Layout l = MakeLayout(p, algo);
  if (workspace == nullptr || workspace_bytes < l.total) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoeExperts: workspace too small: ", workspace_bytes, " < ", l.total));
  }
  if (!Aligned(workspace, 256) || !Aligned(p.x, 16) || !Aligned(p.out, 16)) {
    return absl::InvalidArgumentError("MoeExperts: workspace / x / out not aligned (256 / 16 / 16)");
  }
  char* base = static_cast<char*>(workspace);
  MoeWorkspace ws;
  ws.offsets = reinterpret_cast<int32_t*>(base + l.offsets);
  ws.tile_off = reinterpret_cast<int32_t*>(base + l.tile_off);
  ws.tile_info = reinterpret_cast<int4*>(base + l.tile_info);
  ws.sorted_slot = reinterpret_cast<int32_t*>(base + l.sorted_slot);
  ws.slot_pos = reinterpret_cast<int32_t*>(base + l.slot_pos);
  ws.xb = tc ? reinterpret_cast<uint16_t*>(base + l.xb) : nullptr;
  ws.h = base + l.h;
  ws.y = reinterpret_cast<float*>(base + l.y);
  MoeGemmArgs a;
  a.T = static_cast<int32_t>(p.num_tokens);
  a.D = static_cast<int32_t>(p.hidden);
  a.I = static_cast<int32_t>(p.inter);
  a.E = static_cast<int32_t>(p.num_experts);
  a.topk = static_cast<int32_t>(p.top_k);
  a.x = p.x;
  a.w1 = p.w1;
  a.w3 = p.w3;
  a.w2 = p.w2;
  a.topk_weights = p.topk_weights;
  a.max_m_tiles = static_cast<int32_t>(max_m_tiles);

  const int64_t n4 = tc ? p.num_tokens * p.hidden / 4 : 0;
  const bool fuse_bf16 = n4 <= kSortFusedBf16Max;
  LaunchPdl(MoeSortKernel, 1, kSortThreads, 0, stream, p.topk_ids, static_cast<int32_t>(S), a.E,
            rows_per_tile, a.max_m_tiles, ws, reinterpret_cast<const float4*>(p.x),
            fuse_bf16 ? static_cast<int32_t>(n4) : 0);
  KL_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (tc) {
    if (!fuse_bf16) {
      const int64_t blocks = (n4 + 255) / 256 < 1024 ? (n4 + 255) / 256 : 1024;
      LaunchPdl(ToBf16Kernel, static_cast<unsigned>(blocks), 256, 0, stream,
                reinterpret_cast<const float4*>(p.x), reinterpret_cast<uint2*>(ws.xb), n4);
      KL_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
    KL_CUDA_RETURN_IF_ERROR(
        internal::LaunchMoeTcGemms(a, ws, algo == MoeAlgo::kTensorCoreSkinny, stream));
  } else if (p.weight_dtype == DType::kF32) {
    KL_CUDA_RETURN_IF_ERROR(LaunchExactGemms<float>(a, ws, stream));
  } else {
    KL_CUDA_RETURN_IF_ERROR(LaunchExactGemms<__nv_bfloat16>(a, ws, stream));
  }
  const dim3 combine_grid(static_cast<unsigned>(p.num_tokens),
                          static_cast<unsigned>((a.D / 4 + kCombineThreads - 1) / kCombineThreads));
  LaunchPdl(MoeCombineKernel, combine_grid, kCombineThreads, 0, stream, p.topk_ids, ws.slot_pos,
            reinterpret_cast<const float4*>(ws.y), a.D / 4, a.topk, p.accumulate ? 1 : 0,
            reinterpret_cast<float4*>(p.out));
  return CudaStatus(cudaGetLastError(), "MoeExperts");
}

}  // namespace kl::cuda
