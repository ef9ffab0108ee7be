// MLA absorbed decode over the paged latent cache (one new token per sequence, all H
// heads sharing each cache row: MQA with a (latent + rope)-d key and a latent-d value).
//
// Split-KV: grid (split, sequence); sequence n's rows [0, len) are cut into S ranges of
// ceil(ceil(len / S) / 64) * 64 rows, so every sequence spreads over all S CTAs whatever
// its length (read on the device). Each CTA reads its rows exactly once for all heads
// and leaves (unnormalised output, running max, running sum) per head in the workspace;
// MlaDecodeCombineKernel merges the S partial softmax states (S == 1: the attention
// kernel writes the final output itself).
//
// Tensor-core kernel (bf16 cache, latent % 64 == 0, rope % 16 == 0, H <= 32), 256
// threads, one CTA per SM (~200 KB shared at latent 512 + rope 64, H = 32):
//  - q (fp32) -> bf16 [16 M][D] in shared memory once (M = ceil(H / 16) head tiles,
//    padded heads are zero rows whose results are dropped);
//  - 64-row cache tiles double-buffered with cp.async (16-byte chunks, zero-fill for
//    rows past the range or on an invalid page); the copy of tile t+1 is in flight
//    while tile t is computed, so the memory system always has ~74 KB per SM queued;
//  - S = Q K^T with mma.sync m16n8k16 (ldmatrix A from q, B from the cache tile rows),
//    each warp one head tile x 8 M rows; S to shared memory;
//  - online softmax in the exp2 domain by 16 / M threads per head row (state in
//    registers), P (bf16) and the rescale factor to shared memory;
//  - O += P V with V = the first latent columns of the same tile (ldmatrix.trans),
//    each warp owning latent / 8 output columns for all heads in registers.
// SIMT kernel (fp32 cache, or shapes the tensor-core kernel does not take): exact fp32
// FFMA math, grid (head group of 8, split, sequence), one warp per head for the scores
// (lane = cache row), the [8][latent] accumulator in shared memory.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/mla_device.cuh"

namespace kl::cuda {
namespace {

using namespace kl::cuda::dev;  // NOLINT
using mla::CacheView;

constexpr float kLn2 = 0.6931471805599453f;

struct DecodeArgs {
  CacheView c;
  const float* q;
  const int32_t* seq_lens;
  float* out;    // [N][H][dl]               (S == 1)
  float* ws_o;   // [N][S][H][dl] partial o  (S > 1)
  float* ws_ml;  // [N][S][H][2] (max in natural-log units, sum)
  int H, dl, dr, S;
  float scale;  // natural units
};

// Row range [begin, end) of split s of a sequence of length len.
struct SplitRange {
  int64_t begin, end;
};
__device__ __forceinline__ SplitRange RangeOf(int32_t len, int S, int s) {
  if (len <= 0) return {0, 0};
  const int64_t chunk = ((static_cast<int64_t>(len) + S - 1) / S + 63) / 64 * 64;
  const int64_t b = s * chunk;
  const int64_t e = b + chunk < len ? b + chunk : len;
  return {b, e > b ? e : b};
}

// Physical row of position pos (< 2^31) of sequence n, 32-bit division; -1: no page.
__device__ __forceinline__ int64_t PhysRow32(const CacheView& c, int64_t n, int pos) {
  const int ps = static_cast<int>(c.page_size);
  const int page = pos / ps;
  if (page >= c.max_pages) return -1;
  const int32_t phys = __ldg(c.block_table + n * c.max_pages + page);
  if (phys < 0 || phys >= c.num_pages) return -1;
  return static_cast<int64_t>(phys) * ps + (pos - page * ps);
}

__device__ __forceinline__ void Ldmatrix2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void Ldmatrix2Trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(p)));
}

// ================================ tensor-core kernel ==================================
constexpr int kTcRows = 64;      // cache rows per tile
constexpr int kTcThreads = 256;  // 8 warps
constexpr int kLdS = 72;         // fp32 score row stride: half-warp float2 stores conflict-free
constexpr int kLdP = 72;         // bf16 P row stride: 144 B = 9 x 16 B, ldmatrix conflict-free

struct TcLayout {
  int ld;  // bf16 row stride of q / cache tiles: D + 8 (odd multiple of 16 B when D % 16 == 0)
  size_t q, kv, s, p, alpha, l, m, ok, total;  // byte offsets
};

__host__ __device__ inline TcLayout MakeTcLayout(int D, int M) {
  TcLayout t;
  t.ld = D + 8;
  const size_t rows = 16 * M;
  t.q = 0;
  t.kv = t.q + rows * t.ld * 2;
  t.s = t.kv + 2 * kTcRows * t.ld * 2;
  t.p = t.s + rows * kLdS * 4;
  t.alpha = t.p + rows * kLdP * 2;
  t.l = t.alpha + rows * 4;
  t.m = t.l + rows * 4;
  t.ok = t.m + rows * 4;
  t.total = t.ok + 2 * kTcRows * 4;
  return t;
}

// Issues the cp.async copies of tile `t` of the range into buffer `buf`: warp w copies
// rows w, w + 8, ... (one block-table lookup per row), lanes stride the 16-byte chunks.
__device__ __forceinline__ void TcLoadTile(const DecodeArgs& a, int64_t n, SplitRange rg, int t,
                                           __nv_bfloat16* dst_tile, int* ok, int ld, int D,
                                           int warp, int lane) {
  const int cpr = D / 8;  // 16-byte chunks per row
  const __nv_bfloat16* pool = static_cast<const __nv_bfloat16*>(a.c.pool);
  for (int r = warp; r < kTcRows; r += kTcThreads / 32) {
    const int64_t pos = rg.begin + static_cast<int64_t>(t) * kTcRows + r;
    const int64_t phys = pos < rg.end ? PhysRow32(a.c, n, static_cast<int>(pos)) : -1;
    const __nv_bfloat16* src = phys >= 0 ? pool + phys * D : pool;
    const int bytes = phys >= 0 ? 16 : 0;  // 0: zero-fill (finite zeros, masked anyway)
    for (int ch = lane; ch < cpr; ch += 32) CpAsync16(dst_tile + r * ld + ch * 8, src + ch * 8, bytes);
    if (lane == 0) ok[r] = phys >= 0;
  }
}

template <int M, int NT>  // M: 16-head tiles; NT: latent = 64 NT (8-column MMA tiles per warp)
__global__ void __launch_bounds__(kTcThreads, 1) MlaDecodeTcKernel(const DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = a.dl + a.dr;
  const TcLayout L = MakeTcLayout(D, M);
  const int ld = L.ld;
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem + L.q);
  __nv_bfloat16* sKV = reinterpret_cast<__nv_bfloat16*>(smem + L.kv);
  float* sS = reinterpret_cast<float*>(smem + L.s);
  __nv_bfloat16* sP = reinterpret_cast<__nv_bfloat16*>(smem + L.p);
  float* sAlpha = reinterpret_cast<float*>(smem + L.alpha);
  float* sL = reinterpret_cast<float*>(smem + L.l);
  float* sM = reinterpret_cast<float*>(smem + L.m);
  int* sOk = reinterpret_cast<int*>(smem + L.ok);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int s_idx = blockIdx.x, S = a.S, H = a.H;
  const int64_t n = blockIdx.y;
  const SplitRange rg = RangeOf(a.seq_lens[n], S, s_idx);
  const int ntiles = static_cast<int>((rg.end - rg.begin + kTcRows - 1) / kTcRows);

  if (ntiles > 0) {
    TcLoadTile(a, n, rg, 0, sKV, sOk, ld, D, warp, lane);
    CpAsyncCommit();
    // q -> bf16 while tile 0 is in flight; head rows >= H are zeros.
    const int d4n = D / 4;
    for (int i = tid; i < 16 * M * d4n; i += kTcThreads) {
      const int hr = i / d4n, d4 = i - hr * d4n;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (hr < H) v = *reinterpret_cast<const float4*>(a.q + (n * H + hr) * D + 4 * d4);
      uint2 u;
      u.x = PackBf16(v.x, v.y);
      u.y = PackBf16(v.z, v.w);
      *reinterpret_cast<uint2*>(sQ + hr * ld + 4 * d4) = u;
    }
  }

  // Softmax ownership: TPR threads per head row, CPT columns each (c = part + TPR i).
  constexpr int kTpr = 16 / M, kCpt = kTcRows / kTpr;
  const int srow = tid / kTpr, part = tid % kTpr;
  float m_run = -INFINITY, l_run = 0.0f;  // log2 domain
  const float sl2 = a.scale * kLog2e;
  // QK ownership: head tile mw, MMA column tiles n0 .. n0 + M - 1.
  constexpr int kWpm = 8 / M;
  const int mw = warp / kWpm, n0 = (warp % kWpm) * M;

  float o[M][NT][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j) o[m][j][0] = o[m][j][1] = o[m][j][2] = o[m][j][3] = 0.0f;

  const int ksteps = D / 16;
  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    CpAsyncWait<0>();
    __syncthreads();  // tile t visible; every warp is past tile t-1 (buffer buf^1 free)
    if (t + 1 < ntiles) {
      TcLoadTile(a, n, rg, t + 1, sKV + (buf ^ 1) * kTcRows * ld, sOk + (buf ^ 1) * kTcRows, ld,
                 D, warp, lane);
    }
    CpAsyncCommit();
    const __nv_bfloat16* kv = sKV + buf * kTcRows * ld;

    // ---- scores S[16 M][64] = Q K^T ----
    {
      // Two accumulator sets (even / odd k-steps) halve the dependent MMA chain.
      float acc[2][M][4];
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int j = 0; j < M; ++j) acc[e][j][0] = acc[e][j][1] = acc[e][j][2] = acc[e][j][3] = 0.0f;
      const __nv_bfloat16* qa = sQ + (mw * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * ld + (lane / 16) * 8;
      const __nv_bfloat16* kb =
          M == 2 ? kv + ((n0 + lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8
                 : kv + (n0 * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8;
      auto kstep = [&](int kk, float (&c)[M][4]) {
        uint32_t af[4];
        Ldmatrix4(af, qa + kk * 16);
        if constexpr (M == 2) {
          uint32_t bf[4];
          Ldmatrix4(bf, kb + kk * 16);
          Mma16816(c[0], af, bf[0], bf[1]);
          Mma16816(c[1], af, bf[2], bf[3]);
        } else {
          uint32_t bf[2];
          Ldmatrix2(bf, kb + kk * 16);
          Mma16816(c[0], af, bf[0], bf[1]);
        }
      };
      int kk = 0;
      for (; kk + 2 <= ksteps; kk += 2) {
        kstep(kk, acc[0]);
        kstep(kk + 1, acc[1]);
      }
      if (kk < ksteps) kstep(kk, acc[0]);
      const int row = mw * 16 + lane / 4;
#pragma unroll
      for (int j = 0; j < M; ++j) {
        const int col = (n0 + j) * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(sS + row * kLdS + col) =
            make_float2(acc[0][j][0] + acc[1][j][0], acc[0][j][1] + acc[1][j][1]);
        *reinterpret_cast<float2*>(sS + (row + 8) * kLdS + col) =
            make_float2(acc[0][j][2] + acc[1][j][2], acc[0][j][3] + acc[1][j][3]);
      }
    }
    __syncthreads();

    // ---- online softmax (exp2 domain), P in bf16 ----
    {
      const int* ok = sOk + buf * kTcRows;
      float v[kCpt];
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kCpt; ++i) {
        const int c = part + kTpr * i;
        v[i] = ok[c] ? sS[srow * kLdS + c] * sl2 : -INFINITY;
        mx = fmaxf(mx, v[i]);
      }
#pragma unroll
      for (int off = kTpr / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_run, mx);
      const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_run - m_new);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kCpt; ++i) {
        const __nv_bfloat16 pb = __float2bfloat16_rn(v[i] == -INFINITY ? 0.0f : exp2f(v[i] - m_new));
        sP[srow * kLdP + part + kTpr * i] = pb;
        sum += __bfloat162float(pb);  // the sum of exactly the weights P.V uses
      }
#pragma unroll
      for (int off = kTpr / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (part == 0) sAlpha[srow] = alpha;
    }
    __syncthreads();

    // ---- O = diag(alpha) O + P V  (warp: latent columns [64 NT warp / 8 ...)) ----
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float a0 = sAlpha[m * 16 + lane / 4], a1 = sAlpha[m * 16 + lane / 4 + 8];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        o[m][j][0] *= a0; o[m][j][1] *= a0; o[m][j][2] *= a1; o[m][j][3] *= a1;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kTcRows / 16; ++ks) {
      uint32_t pa[M][4];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        Ldmatrix4(pa[m], sP + (m * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kLdP + ks * 16 + (lane / 16) * 8);
      }
      const __nv_bfloat16* vrow = kv + (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * ld;
      if constexpr (NT == 1) {
        uint32_t vb[2];
        Ldmatrix2Trans(vb, vrow + warp * 8);
#pragma unroll
        for (int m = 0; m < M; ++m) Mma16816(o[m][0], pa[m], vb[0], vb[1]);
      } else {
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          uint32_t vb[4];
          Ldmatrix4Trans(vb, vrow + (warp * NT + j + lane / 16) * 8);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            Mma16816(o[m][j], pa[m], vb[0], vb[1]);
            Mma16816(o[m][j + 1], pa[m], vb[2], vb[3]);
          }
        }
      }
    }
  }

  // ---- epilogue: final output (S == 1) or the partial state of this split ----
  if (part == 0) {
    sL[srow] = l_run;
    sM[srow] = m_run;
  }
  __syncthreads();
  const int dl = a.dl;
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int h = m * 16 + lane / 4 + 8 * half;
      if (h >= H) continue;
      float* dst;
      float inv = 1.0f;
      if (S == 1) {
        dst = a.out + (n * H + h) * dl;
        inv = sL[h] > 0.0f ? 1.0f / sL[h] : 0.0f;  // padding / empty: zeros
      } else {
        dst = a.ws_o + ((n * S + s_idx) * H + h) * dl;
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int col = (warp * NT + j) * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(dst + col) =
            make_float2(o[m][j][2 * half] * inv, o[m][j][2 * half + 1] * inv);
      }
    }
  }
  if (S > 1 && tid < H) {
    float* ml = a.ws_ml + ((n * S + s_idx) * H + tid) * 2;
    ml[0] = sM[tid] * kLn2;  // -inf stays -inf
    ml[1] = sL[tid];
  }
}

// ==================================== SIMT kernel =====================================
constexpr int kSimtHeads = 8;    // heads per CTA (one warp each for the scores)
constexpr int kSimtRows = 32;    // cache rows per tile (one lane each for the scores)
constexpr int kSimtThreads = 256;

inline size_t SimtSmemBytes(int D, int dl) {
  const int ldt = D | 1;
  return sizeof(float) * (static_cast<size_t>(kSimtHeads) * D + kSimtRows * ldt +
                          kSimtHeads * dl + kSimtHeads * kSimtRows + 3 * kSimtHeads + kSimtRows);
}

template <class T>
__global__ void __launch_bounds__(kSimtThreads) MlaDecodeSimtKernel(const DecodeArgs a) {
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
// One CTA per (head, sequence): out = sum_s w_s o_s with w_s = e^(m_s - M) / sum_s e^(m_s - M) l_s.
__global__ void __launch_bounds__(128) MlaDecodeCombineKernel(const DecodeArgs a) {
  __shared__ float sW[kMlaMaxSplits];
  const int h = blockIdx.x, S = a.S, H = a.H, dl = a.dl, tid = threadIdx.x;
  const int64_t n = blockIdx.y;
  const float* ml = a.ws_ml + (n * S * H + h) * 2;  // split s at ml[s * H * 2]
  if (tid < 32) {
    float mx = -INFINITY;
    for (int s = tid; s < S; s += 32) mx = fmaxf(mx, ml[static_cast<int64_t>(s) * H * 2]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.0f;
    if (mx != -INFINITY) {
      for (int s = tid; s < S; s += 32) {
        const float* e = ml + static_cast<int64_t>(s) * H * 2;
        sum += expf(e[0] - mx) * e[1];
      }
    }
    sum = WarpSum(sum);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // padding / empty: zeros
    for (int s = tid; s < S; s += 32) {
      const float m_s = ml[static_cast<int64_t>(s) * H * 2];
      sW[s] = (inv == 0.0f || m_s == -INFINITY) ? 0.0f : expf(m_s - mx) * inv;
    }
  }
  __syncthreads();
  const float* po = a.ws_o + (n * S * H + h) * static_cast<int64_t>(dl);  // split stride H * dl
  for (int d = tid; d < dl; d += 128) {
    float acc = 0.0f;
    for (int s = 0; s < S; ++s) acc = fmaf(sW[s], po[static_cast<int64_t>(s) * H * dl + d], acc);
    a.out[(n * H + h) * dl + d] = acc;
  }
}

// ===================================== launchers ======================================
int DeviceSmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1) {
    cudaGetLastError();  // clear; fall back to an H100's count
    return 132;
  }
  return sms;
}

int DeviceSmemOptin() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return 48 * 1024;
  }
  return v;
}

int TcHeadTiles(int64_t H) { return H <= 16 ? 1 : 2; }

// Raised once per kernel to the device's opt-in limit (the launch's own size is checked
// against that limit before launching).
template <class K>
cudaError_t RaiseSmem(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <int M, int NT>
cudaError_t LaunchTc(const DecodeArgs& a, int N, cudaStream_t stream) {
  const size_t smem = MakeTcLayout(a.dl + a.dr, M).total;
  static bool attr_set = false;  // idempotent; racing threads set the same value
  if (!attr_set) {
    const cudaError_t err = RaiseSmem(MlaDecodeTcKernel<M, NT>, DeviceSmemOptin());
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  MlaDecodeTcKernel<M, NT><<<dim3(a.S, N), kTcThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <int M>
cudaError_t LaunchTcM(const DecodeArgs& a, int N, cudaStream_t stream) {
  switch (a.dl / 64) {
    case 1: return LaunchTc<M, 1>(a, N, stream);
    case 2: return LaunchTc<M, 2>(a, N, stream);
    case 4: return LaunchTc<M, 4>(a, N, stream);
    default: return LaunchTc<M, 8>(a, N, stream);
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
  MlaDecodeSimtKernel<T><<<grid, kSimtThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool MlaDecodeUsesTensorCores(const MlaDecodeParams& p) {
  const MlaPagedCache& c = p.cache;
  if (c.dtype != DType::kBF16 || p.num_heads < 1 || p.num_heads > 32) return false;
  const int64_t dl = c.latent_dim;
  if (dl != 64 && dl != 128 && dl != 256 && dl != 512) return false;
  if (c.rope_dim < 0 || c.rope_dim % 16 != 0 || c.rope_dim > 4096) return false;
  const size_t smem = MakeTcLayout(static_cast<int>(dl + c.rope_dim), TcHeadTiles(p.num_heads)).total;
  return smem <= static_cast<size_t>(DeviceSmemOptin());
}

int64_t MlaDecodeNumSplits(const MlaDecodeParams& p) {
  if (p.num_splits > 0) return std::min<int64_t>(p.num_splits, kMlaMaxSplits);
  const int64_t N = std::max<int64_t>(p.num_seqs, 1);
  const bool tc = MlaDecodeUsesTensorCores(p);
  // CTAs that fill the device once: the tensor-core kernel runs one CTA per SM; the
  // SIMT kernel ~2 per SM and already has ceil(H / 8) CTAs per (sequence, split).
  const int64_t per_seq = tc ? 1 : (std::max<int64_t>(p.num_heads, 1) + kSimtHeads - 1) / kSimtHeads;
  const int64_t target = (tc ? 1 : 2) * static_cast<int64_t>(DeviceSmCount());
  int64_t s = std::max<int64_t>(1, target / (N * per_seq));
  if (p.max_seq_len_hint > 0) s = std::min<int64_t>(s, (p.max_seq_len_hint + 255) / 256);
  return std::clamp<int64_t>(s, 1, kMlaMaxSplits);
}

size_t MlaDecodeWorkspaceBytes(const MlaDecodeParams& p) {
  const int64_t S = MlaDecodeNumSplits(p);
  if (S <= 1 || p.num_seqs <= 0 || p.num_heads <= 0) return 0;
  const size_t parts = static_cast<size_t>(p.num_seqs) * S * p.num_heads;
  const size_t o_bytes = (parts * p.cache.latent_dim * 4 + 255) / 256 * 256;
  return o_bytes + parts * 2 * 4;
}

absl::Status MlaDecodeAttention(const MlaDecodeParams& p, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_seqs > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("MlaDecodeAttention: num_seqs out of [0, 65535]: ", p.num_seqs));
  }
  if (p.num_seqs == 0) return absl::OkStatus();
  if (p.num_heads < 1 || p.num_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("MlaDecodeAttention: num_heads=", p.num_heads));
  }
  if (absl::Status s = mla::ValidateCache(p.cache); !s.ok()) return s;
  if (p.cache.page_size > INT32_MAX || p.cache.max_pages_per_seq > INT32_MAX) {
    return absl::InvalidArgumentError("MlaDecodeAttention: page_size / max_pages_per_seq too large");
  }
  if (!p.q || !p.seq_lens || !p.out) {
    return absl::InvalidArgumentError("MlaDecodeAttention: null tensor pointer");
  }
  const int64_t D = p.cache.row_dim(), dl = p.cache.latent_dim;
  const bool tc = MlaDecodeUsesTensorCores(p);
  if (!tc && SimtSmemBytes(static_cast<int>(std::min<int64_t>(D, 1 << 20)),
                           static_cast<int>(std::min<int64_t>(dl, 1 << 20))) >
                 static_cast<size_t>(DeviceSmemOptin())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MlaDecodeAttention: latent_dim + rope_dim too large for the SIMT kernel: ", D));
  }
  if (tc && (reinterpret_cast<uintptr_t>(p.q) % 16 != 0 || reinterpret_cast<uintptr_t>(p.out) % 8 != 0 ||
             reinterpret_cast<uintptr_t>(p.cache.pool) % 16 != 0)) {
    return absl::InvalidArgumentError("MlaDecodeAttention: q / pool must be 16-byte and out 8-byte aligned");
  }
  const int64_t S = MlaDecodeNumSplits(p);
  const size_t need = MlaDecodeWorkspaceBytes(p);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need ||
                   reinterpret_cast<uintptr_t>(workspace) % 16 != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MlaDecodeAttention: workspace needs ", need, " bytes (16-byte aligned), got ", workspace_bytes));
  }
  DecodeArgs a;
  a.c = mla::View(p.cache);
  a.q = p.q;
  a.seq_lens = p.seq_lens;
  a.out = p.out;
  a.ws_o = need > 0 ? static_cast<float*>(workspace) : nullptr;
  const size_t parts = static_cast<size_t>(p.num_seqs) * S * p.num_heads;
  a.ws_ml = need > 0 ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                               (parts * dl * 4 + 255) / 256 * 256)
                     : nullptr;
  a.H = static_cast<int>(p.num_heads);
  a.dl = static_cast<int>(dl);
  a.dr = static_cast<int>(p.cache.rope_dim);
  a.S = static_cast<int>(S);
  a.scale = p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const int N = static_cast<int>(p.num_seqs);

  cudaError_t err;
  if (tc) {
    err = TcHeadTiles(p.num_heads) == 1 ? LaunchTcM<1>(a, N, stream) : LaunchTcM<2>(a, N, stream);
  } else if (p.cache.dtype == DType::kF32) {
    err = LaunchSimt<float>(a, N, stream);
  } else {
    err = LaunchSimt<__nv_bfloat16>(a, N, stream);
  }
  if (err != cudaSuccess) return CudaStatus(err, "MlaDecodeAttention launch");
  if (S > 1) {
    MlaDecodeCombineKernel<<<dim3(a.H, N), 128, 0, stream>>>(a);
    return CudaStatus(cudaGetLastError(), "MlaDecodeAttention combine launch");
  }
  return absl::OkStatus();
}

}  // namespace kl::cuda
