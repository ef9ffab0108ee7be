// Intra-chunk kernel of the tensor-core chunked KDA prefill (K = V = 128, C = 64,
// bf16 operands, fp32 accumulation, sm_90a): grid (H, chunks of the launch's range),
// 256 threads, 2 CTAs / SM. Everything that does not depend on the carried state,
// for one (chunk, head):
//   gate + chunk cumsum G (log2 units, fp32) and beta; row norms of q, k;
//   L (beta-scaled k.k) and A_qk (q.k) with decays, all on mma.sync: off-diagonal
//   16-blocks split the decay at the block boundary e, exp2(G_r - G_e) *
//   exp2(G_e - G_j), both <= 1; the diagonal 16-blocks use the same split
//   hierarchically (levels 8/4/2/1: each pair (r, j) once, at the highest bit where
//   r and j differ), so no exponent is ever positive and no pairwise SIMT loop remains;
//   T_II = (I + L_II)^-1 for the 4 diagonal blocks (fp32 forward substitution);
//   [W | U] = (I + L)^-1 diag(beta) [K o Gamma | V] by block forward substitution on
//   tensor cores (per warp 32 columns, no CTA barrier between block rows);
//   QG = Q o Gamma, KH = K o exp(G_last - G), EG = exp(G_last).
// Writes one 76 KB item (layout in kda_chunk_internal.h).
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/kda_chunk_tc.cuh"
#include "kernels/cuda/kda_device.cuh"

namespace kl::cuda::internal::tc {
namespace {

using namespace kl::cuda::dev;  // NOLINT

constexpr int kIntraThreads = 256;  // phase 1b / 2c index maps assume exactly 256
static_assert(kIntraThreads == 256, "phase 1b: 8 threads x 32 row pairs; phase 2c: fixed channels");
constexpr int kLdL = 68;    // fp32 row stride of L
constexpr int kLdA = 72;    // bf16 row stride of the 64 x 64 tiles
// Shared-memory carve-up (bytes). The 64 x 128 tiles are unpadded and XOR-swizzled
// in 16-byte chunks (TB / TG below).
constexpr int kSmQ = 0;                            // bf16 [64][128] raw q -> LT16 bf16 [64][72]
constexpr int kSmK = kSmQ + kC * kK * 2;           // bf16 [64][128] raw k -> k-hat o Gamma -> W
constexpr int kSmV = kSmK + kC * kK * 2;           // bf16 [64][128] v -> U
constexpr int kSmG = kSmV + kC * kK * 2;           // fp32 [64][128] G (log2)
constexpr int kSmL = kSmG + kC * kK * 4;           // fp32 [64][68] L (gate scratch before)
constexpr int kSmA = kSmL + kC * kLdL * 4;         // bf16 [64][72] A_qk
constexpr int kSmBeta = kSmA + kC * kLdA * 2;      // fp32 [64] beta
constexpr int kSmInvQ = kSmBeta + kC * 4;          // fp32 [64] scale / |q|
constexpr int kSmInvK = kSmInvQ + kC * 4;          // fp32 [64] 1 / |k|
constexpr int kIntraSmem = kSmInvK + kC * 4;       // 109,312 B -> 2 CTAs / SM (+ one state CTA)

// Swizzled element offsets. bf16 [64][128] tiles: the 16-B chunk j of row r sits at
// chunk j ^ SwzB(r); conflict-free for (a) one row's 8 chunks, (b) 8 consecutive
// rows (aligned) at one chunk (ldmatrix / stmatrix, 16-B column reads), (c) the
// 8-byte fragment loads of the L / A products, whose half-warps read 4 rows that
// differ in two of the three low row bits (SwzB >> 1 is a bijection on any two).
// fp32 [64][128] G: chunk (4 floats) j of row r at j ^ SwzG(r); conflict-free for
// 8 consecutive rows at one chunk and for the row pairs (r, r+1), (r, r+2) of the
// 16-B fragment loads (bit 2 of SwzG differs).
__device__ __forceinline__ int SwzB(int r) {
  const int r2 = (r >> 2) & 1;
  return (((r ^ r2) & 1) << 1) | ((((r >> 1) ^ r2) & 1) << 2) | r2;
}
__device__ __forceinline__ int TB(int r, int c) { return r * kK + ((((c >> 3) ^ SwzB(r))) << 3) + (c & 7); }
__device__ __forceinline__ int SwzG(int r) { return (((r ^ (r >> 1)) & 1) << 2) | ((r >> 1) & 3); }
__device__ __forceinline__ int TG(int r, int c) { return r * kK + ((((c >> 2) ^ SwzG(r))) << 2) + (c & 3); }

__device__ __forceinline__ uint32_t MulBf16x2(uint32_t a, uint32_t b) {
  uint32_t y;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(y) : "r"(a), "r"(b));
  return y;
}

// Byte offsets of element (row, col) in the item's core-matrix layouts (col % 8 == 0
// gives the start of 8 contiguous elements); see kda_chunk_internal.h.
__device__ __forceinline__ int CoreK128(int r, int d) { return ((r >> 3) * 16 + (d >> 3)) * 128 + (r & 7) * 16 + (d & 7) * 2; }
__device__ __forceinline__ int CoreK64(int r, int j) { return ((r >> 3) * 8 + (j >> 3)) * 128 + (r & 7) * 16 + (j & 7) * 2; }
__device__ __forceinline__ int CoreMN(int j, int d) { return ((d >> 3) * 8 + (j >> 3)) * 128 + (j & 7) * 16 + (d & 7) * 2; }

// Decay-weighted 8 x 8 block products of L and A_qk, one m16n8k16 per k-step each.
// An "upper" row r and a "lower" row j share a reference row e with j <= e < r; the
// decay exp2(G_r - G_j) is split into exp2(G_r - G_e) * exp2(G_e - G_j), both <= 1,
// folded into the bf16 operands (fp32 exp2, bf16 products):
//   A rows 0-7: k of the 8 upper rows, rows 8-15: q of the same rows; B: k of 8 lower rows.
// The k-slots {2t, 2t+1, 2t+8, 2t+9} of lane (g, t) in a k-step are mapped to the four
// contiguous channels 16 kk + 4t .. + 3 (a dot product is order-free), so each operand
// piece is one 16-B (G) or 8-B (bf16) load.
// Writes L[r][j] = beta_r |k_r|^-1 |k_j|^-1 (k_r . k_j decayed) and
// A[r][j] = (scale |q_r|^-1) |k_j|^-1 (q_r . k_j decayed) for the valid pairs.
struct Smem {
  const float* G;
  const bf16 *Q, *K;
  const float *beta, *inv_q, *inv_k;
  float* L;
  bf16* A;
};

// Per-lane offsets of the 4-channel group c = 16 kk + 4 t4 of a row (excluding r * 128)
// in the swizzled tiles. The swizzles depend on r % 8 only and touch the low chunk
// bits, so with kk known at compile time an access is a register plus an immediate:
//   G:    TG(r, c) = r * 128 + g[kk & 1] + 16 * (kk & 6)
//   bf16: TB(r, c) = r * 128 + b[kk & 3] + 16 * (kk & 4)
struct RowOff {
  int g[2], b[4];
};
__device__ __forceinline__ RowOff MakeRowOff(int r, int t4) {
  const int sg = SwzG(r), sb = SwzB(r);
  const int gl = 4 * (t4 ^ (sg & 3)), g2 = sg >> 2;
  const int bl = 8 * ((t4 >> 1) ^ (sb & 1)) + 4 * (t4 & 1), mb = sb >> 1;
  RowOff o;
  o.g[0] = gl + 16 * g2;
  o.g[1] = gl + 16 * (1 ^ g2);
#pragma unroll
  for (int j = 0; j < 4; ++j) o.b[j] = bl + 16 * (j ^ mb);
  return o;
}
__device__ __forceinline__ float4 LdG(const float* G, int r, const RowOff& o, int kk) {
  return *reinterpret_cast<const float4*>(G + r * kK + o.g[kk & 1] + 16 * (kk & 6));
}
__device__ __forceinline__ uint2 LdB(const bf16* T, int r, const RowOff& o, int kk) {
  return *reinterpret_cast<const uint2*>(T + r * kK + o.b[kk & 3] + 16 * (kk & 4));
}

// A fragments of k-step kk for upper row `ur` (k in rows 0-7, q in rows 8-15) with the
// reference row's G values `gr`.
__device__ __forceinline__ void UpperFrag(const Smem& m, int ur, const RowOff& ou, const float4& gr, int kk,
                                          uint32_t (&af)[4]) {
  const float4 gu = LdG(m.G, ur, ou, kk);
  const uint2 k4 = LdB(m.K, ur, ou, kk);
  const uint2 q4 = LdB(m.Q, ur, ou, kk);
  const uint32_t r01 = PackBf16(Exp2Fast(gu.x - gr.x), Exp2Fast(gu.y - gr.y));
  const uint32_t r23 = PackBf16(Exp2Fast(gu.z - gr.z), Exp2Fast(gu.w - gr.w));
  af[0] = MulBf16x2(k4.x, r01);
  af[1] = MulBf16x2(q4.x, r01);
  af[2] = MulBf16x2(k4.y, r23);
  af[3] = MulBf16x2(q4.y, r23);
}
// B fragment pair of k-step kk for lower row `lr` with reference G `gr` (exp2(G_ref - G_lr) <= 1).
__device__ __forceinline__ void LowerFrag(const Smem& m, int lr, const RowOff& ol, const float4& gr, int kk,
                                          uint32_t& b0, uint32_t& b1) {
  const float4 gl = LdG(m.G, lr, ol, kk);
  const uint2 k4 = LdB(m.K, lr, ol, kk);
  b0 = MulBf16x2(k4.x, PackBf16(Exp2Fast(gr.x - gl.x), Exp2Fast(gr.y - gl.y)));
  b1 = MulBf16x2(k4.y, PackBf16(Exp2Fast(gr.z - gl.z), Exp2Fast(gr.w - gl.w)));
}
// Scales and stores the fragment outputs of upper row ur x lower rows (lr0, lr1).
__device__ __forceinline__ void StoreLA(const Smem& m, int ur, int lr0, int lr1, bool v0, bool v1,
                                        const float (&acc)[4]) {
  const float ls = m.beta[ur] * m.inv_k[ur], as = m.inv_q[ur];
  if (v0) {
    const float ik = m.inv_k[lr0];
    m.L[ur * kLdL + lr0] = ls * ik * acc[0];
    m.A[ur * kLdA + lr0] = __float2bfloat16_rn(as * ik * acc[2]);
  }
  if (v1) {
    const float ik = m.inv_k[lr1];
    m.L[ur * kLdL + lr1] = ls * ik * acc[1];
    m.A[ur * kLdA + lr1] = __float2bfloat16_rn(as * ik * acc[3]);
  }
}

// Diagonal 16-block b at level l: pairs whose in-block indices first differ in bit l
// (sub-blocks of 2^l x 2^l; e = last lower row of the sub-block). The mma also forms
// cross-sub-block products, which are discarded.
// At level 0 the lower row of every lane is the reference row itself (pairs (2i + 1,
// 2i), e = 2i): its factor exp2(G_e - G_e) is exactly 1, so the B operand is k as it
// is (the same bits as multiplying by bf16 1.0) and half of the level's exp2 go.
template <bool kLevel0>
__device__ __forceinline__ void DiagLevel(const Smem& m, int b, int l, int lane) {
  const int g8 = lane >> 2, t4 = lane & 3;
  const int base = 16 * b, mask = (1 << l) - 1;
  auto lower_row = [&](int idx) { return base + ((idx >> l) << (l + 1)) + (idx & mask); };
  const int ref = base + ((g8 >> l) << (l + 1)) + (1 << l) - 1;  // shared by upper/lower index g8
  const int ur = ref + 1 + (g8 & mask), lr = lower_row(g8);
  const RowOff ou = MakeRowOff(ur, t4), orf = MakeRowOff(ref, t4), ol = MakeRowOff(lr, t4);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t af[4], b0, b1;
    const float4 gr = LdG(m.G, ref, orf, kk);
    UpperFrag(m, ur, ou, gr, kk, af);
    if (kLevel0) {
      const uint2 k4 = LdB(m.K, lr, ol, kk);
      b0 = k4.x;
      b1 = k4.y;
    } else {
      LowerFrag(m, lr, ol, gr, kk, b0, b1);
    }
    Mma16816(acc, af, b0, b1);
  }
  const int w0 = 2 * t4, w1 = w0 + 1;
  StoreLA(m, ur, lower_row(w0), lower_row(w1), (w0 >> l) == (g8 >> l), (w1 >> l) == (g8 >> l), acc);
}

// Upper rows 16 I + 8 hu + (0..7) against the lower 8-row halves (J, hl) for
// J in [J0, J0 + kNJ), hl in {0, 1} of the off-diagonal blocks (e = 16 I - 1): the
// A fragments are built once per k-step for all 2 kNJ B sides.
template <int kNJ>
__device__ __forceinline__ void OffDiagRows(const Smem& m, int I, int hu, int J0, int lane) {
  const int g8 = lane >> 2, t4 = lane & 3;
  const int ref = 16 * I - 1, ur = 16 * I + 8 * hu + g8;
  // The upper and all lower rows of this lane are g8 modulo 8: one set of offsets.
  const RowOff o = MakeRowOff(g8, t4), orf = MakeRowOff(7, t4);
  float acc[2 * kNJ][4] = {};
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t af[4];
    const float4 gr = LdG(m.G, ref, orf, kk);
    UpperFrag(m, ur, o, gr, kk, af);
#pragma unroll
    for (int bs = 0; bs < 2 * kNJ; ++bs) {
      uint32_t b0, b1;
      LowerFrag(m, 16 * (J0 + (bs >> 1)) + 8 * (bs & 1) + g8, o, gr, kk, b0, b1);
      Mma16816(acc[bs], af, b0, b1);
    }
  }
#pragma unroll
  for (int bs = 0; bs < 2 * kNJ; ++bs) {
    const int lr0 = 16 * (J0 + (bs >> 1)) + 8 * (bs & 1) + 2 * t4;
    StoreLA(m, ur, lr0, lr0 + 1, true, true, acc[bs]);
  }
}

__global__ void __launch_bounds__(kIntraThreads, 2) KdaChunkIntraKernel(const TcArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem + kSmQ);
  bf16* sK = reinterpret_cast<bf16*>(smem + kSmK);
  bf16* sV = reinterpret_cast<bf16*>(smem + kSmV);
  float* sG = reinterpret_cast<float*>(smem + kSmG);
  float* sL = reinterpret_cast<float*>(smem + kSmL);
  bf16* sA = reinterpret_cast<bf16*>(smem + kSmA);
  float* sBeta = reinterpret_cast<float*>(smem + kSmBeta);
  float* sInvQ = reinterpret_cast<float*>(smem + kSmInvQ);
  float* sInvK = reinterpret_cast<float*>(smem + kSmInvK);

  const int h = blockIdx.x, c = a.c0 + static_cast<int>(blockIdx.y), H = a.H;
  if (c >= a.c1 || c >= a.offs[a.N]) return;
  const int n = FindSeq(a.offs, a.N, c);
  const int64_t tok0 = a.cu[n] + static_cast<int64_t>(c - a.offs[n]) * kC;
  const int64_t left = a.cu[n + 1] - tok0;
  const int nr = left < kC ? static_cast<int>(left) : kC;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int t4 = lane & 3;
  const int lrow = (lane & 7) + 8 * (lane >> 4), lcol = 8 * ((lane >> 3) & 1);
  unsigned char* item = a.items + (static_cast<size_t>(c) * H + h) * kItemBytes;

  // ---- phase 0: async loads of q, k, v rows (rows >= nr zero-filled), zero A ----
  {
    const int seg = tid & 15, r0 = tid >> 4;
    const int64_t row_stride = static_cast<int64_t>(H) * kK;  // elements between tokens
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + 16 * i;
      const int64_t off = (tok0 + (r < nr ? r : nr - 1)) * row_stride + h * kK + seg * 8;
      const int bytes = r < nr ? 16 : 0;
      CpAsync16(sQ + TB(r, seg * 8), a.q + off, bytes);
      CpAsync16(sK + TB(r, seg * 8), a.k + off, bytes);
      CpAsync16(sV + TB(r, seg * 8), a.v + off, bytes);
    }
    CpAsyncCommit();
    for (int i = tid; i < kC * kLdA / 8; i += kIntraThreads) {
      reinterpret_cast<uint4*>(sA)[i] = make_uint4(0, 0, 0, 0);
    }
  }
  // ---- phase 1: gate and chunk cumsum in log2 units (8 channels x 4 rows per thread) ----
  {
    const int cg = tid & 15, rg = tid >> 4, d0 = cg * 8;
    const float neg_rate = -__expf(a.a_log[h]) * kLog2e;
    const float4 db0 = *reinterpret_cast<const float4*>(a.dt_bias + h * kK + d0);
    const float4 db1 = *reinterpret_cast<const float4*>(a.dt_bias + h * kK + d0 + 4);
    const float dtb[8] = {db0.x, db0.y, db0.z, db0.w, db1.x, db1.y, db1.z, db1.w};
    uint4 fr[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * rg + i;
      fr[i] = r < nr ? *reinterpret_cast<const uint4*>(a.f + (tok0 + r) * H * kK + h * kK + d0)
                     : make_uint4(0, 0, 0, 0);
    }
    float gl[4][8], run[8];
#pragma unroll
    for (int ch = 0; ch < 8; ++ch) run[ch] = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w4[4] = {fr[i].x, fr[i].y, fr[i].z, fr[i].w};
      const bool in = 4 * rg + i < nr;
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float2 fv = UnpackBf16(w4[m]);
        run[2 * m] += in ? neg_rate * Softplus<false>(fv.x + dtb[2 * m]) : 0.0f;
        run[2 * m + 1] += in ? neg_rate * Softplus<false>(fv.y + dtb[2 * m + 1]) : 0.0f;
      }
#pragma unroll
      for (int ch = 0; ch < 8; ++ch) gl[i][ch] = run[ch];
    }
    float* tot = sL;  // [16 row groups][128] scratch
    *reinterpret_cast<float4*>(tot + rg * kK + d0) = make_float4(run[0], run[1], run[2], run[3]);
    *reinterpret_cast<float4*>(tot + rg * kK + d0 + 4) = make_float4(run[4], run[5], run[6], run[7]);
    if (tid < kC) {
      sBeta[tid] = tid < nr ? Sigmoid<false>(__bfloat162float(a.b[(tok0 + tid) * H + h])) : 0.0f;
    }
    __syncthreads();
    float pre[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int q = 0; q < rg; ++q) {
      const float4 x0 = *reinterpret_cast<const float4*>(tot + q * kK + d0);
      const float4 x1 = *reinterpret_cast<const float4*>(tot + q * kK + d0 + 4);
      pre[0] += x0.x; pre[1] += x0.y; pre[2] += x0.z; pre[3] += x0.w;
      pre[4] += x1.x; pre[5] += x1.y; pre[6] += x1.z; pre[7] += x1.w;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * rg + i;
      *reinterpret_cast<float4*>(sG + TG(r, d0)) = make_float4(gl[i][0] + pre[0], gl[i][1] + pre[1],
                                                               gl[i][2] + pre[2], gl[i][3] + pre[3]);
      *reinterpret_cast<float4*>(sG + TG(r, d0 + 4)) = make_float4(gl[i][4] + pre[4], gl[i][5] + pre[5],
                                                                   gl[i][6] + pre[6], gl[i][7] + pre[7]);
    }
  }
  CpAsyncWait<0>();
  __syncthreads();
  if (a.stop_after == 1) return;

  // ---- phase 1b: row norms of q, k and the diagonal q_r . k_r (tiles are not rewritten).
  //      8 threads per row, 2 rows per thread (r and r + 32), each thread 2 of the row's
  //      16 chunks (c8 and c8 + 8): one pass, all loads up front; the 8 lanes of a row
  //      read 8 distinct bank groups (conflict-free under the swizzle). ----
  {
    const int c8 = tid & 7, rb = tid >> 3;
    float sqq[2] = {0.f, 0.f}, skk[2] = {0.f, 0.f}, sqk[2] = {0.f, 0.f};
    uint4 uq[2][2], uk[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int r = rb + 32 * j, c = 8 * (c8 + 8 * h2);
        uq[j][h2] = *reinterpret_cast<const uint4*>(sQ + TB(r, c));
        uk[j][h2] = *reinterpret_cast<const uint4*>(sK + TB(r, c));
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const uint32_t qw[4] = {uq[j][h2].x, uq[j][h2].y, uq[j][h2].z, uq[j][h2].w};
        const uint32_t kw[4] = {uk[j][h2].x, uk[j][h2].y, uk[j][h2].z, uk[j][h2].w};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const float2 qv = UnpackBf16(qw[m]), kv = UnpackBf16(kw[m]);
          sqq[j] += qv.x * qv.x + qv.y * qv.y;
          skk[j] += kv.x * kv.x + kv.y * kv.y;
          sqk[j] += qv.x * kv.x + qv.y * kv.y;
        }
      }
#pragma unroll
      for (int o = 4; o > 0; o >>= 1) {
        sqq[j] += __shfl_xor_sync(0xffffffffu, sqq[j], o);
        skk[j] += __shfl_xor_sync(0xffffffffu, skk[j], o);
        sqk[j] += __shfl_xor_sync(0xffffffffu, sqk[j], o);
      }
      if (c8 == 0) {
        const int r = rb + 32 * j;
        const float iq = rsqrtf(sqq[j] + 1e-6f) * a.scale, ik = rsqrtf(skk[j] + 1e-6f);
        sInvQ[r] = iq;
        sInvK[r] = ik;
        sA[r * kLdA + r] = __float2bfloat16_rn(iq * ik * sqk[j]);
      }
    }
  }
  __syncthreads();
  if (a.stop_after == 2) return;

  // ---- phase 2: L and A_qk on tensor cores. Warps 4-7: diagonal block w - 4, all four
  //      levels; warps 0-3: off-diagonal rows, balanced (8 x 8 B sides per warp: 6/6/6/6). ----
  {
    const Smem m{sG, sQ, sK, sBeta, sInvQ, sInvK, sL, sA};
    if (warp >= 4) {
      DiagLevel<true>(m, warp - 4, 0, lane);
#pragma unroll 1
      for (int l = 1; l < 4; ++l) DiagLevel<false>(m, warp - 4, l, lane);
    } else if (warp < 2) {        // rows of block 3 (half hu = warp) vs blocks 0-1, then 2
      OffDiagRows<2>(m, 3, warp, 0, lane);
      OffDiagRows<1>(m, 3, warp, 2, lane);
    } else {                      // rows of block 2 vs blocks 0-1, rows of block 1 vs block 0
      OffDiagRows<2>(m, 2, warp - 2, 0, lane);
      OffDiagRows<1>(m, 1, warp - 2, 0, lane);
    }
  }
  __syncthreads();
  if (a.stop_after == 3) return;

  // ---- phase 2c: elementwise: QG, KH out; K o Gamma (normalised) in place; EG out ----
  {
    // A thread's channels d0 .. d0 + 7 are the same in every iteration (the stride
    // is 32 core matrices = two full row groups): the last row's G is read once.
    const int d0 = ((tid >> 3) & 15) * 8;
    const float4 la = *reinterpret_cast<const float4*>(sG + TG(kC - 1, d0));
    const float4 lb = *reinterpret_cast<const float4*>(sG + TG(kC - 1, d0 + 4));
    const float lv[8] = {la.x, la.y, la.z, la.w, lb.x, lb.y, lb.z, lb.w};
#pragma unroll 2
    for (int it = tid; it < kC * 16; it += kIntraThreads) {
      // 8 consecutive threads = the 8 rows of one (8 x 8) core matrix: 128-B stores.
      const int cm = it >> 3, r = (cm >> 4) * 8 + (it & 7);
      const float4 ga = *reinterpret_cast<const float4*>(sG + TG(r, d0));
      const float4 gb = *reinterpret_cast<const float4*>(sG + TG(r, d0 + 4));
      const float gv[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
      const uint4 uq = *reinterpret_cast<const uint4*>(sQ + TB(r, d0));
      const uint4 uk = *reinterpret_cast<const uint4*>(sK + TB(r, d0));
      const uint32_t qw[4] = {uq.x, uq.y, uq.z, uq.w}, kw[4] = {uk.x, uk.y, uk.z, uk.w};
      const float iq = sInvQ[r], ik = sInvK[r];
      uint32_t oq[4], okh[4], okg[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float2 qv = UnpackBf16(qw[m]), kv = UnpackBf16(kw[m]);
        const float g0 = Exp2Fast(gv[2 * m]), g1 = Exp2Fast(gv[2 * m + 1]);
        const float h0 = Exp2Fast(lv[2 * m] - gv[2 * m]), h1 = Exp2Fast(lv[2 * m + 1] - gv[2 * m + 1]);
        oq[m] = PackBf16(qv.x * iq * g0, qv.y * iq * g1);
        okg[m] = PackBf16(kv.x * ik * g0, kv.y * ik * g1);
        okh[m] = PackBf16(kv.x * ik * h0, kv.y * ik * h1);
      }
      *reinterpret_cast<uint4*>(item + kItemQG + CoreK128(r, d0)) = make_uint4(oq[0], oq[1], oq[2], oq[3]);
      *reinterpret_cast<uint4*>(item + kItemKH + CoreMN(r, d0)) = make_uint4(okh[0], okh[1], okh[2], okh[3]);
      *reinterpret_cast<uint4*>(sK + TB(r, d0)) = make_uint4(okg[0], okg[1], okg[2], okg[3]);
    }
    if (tid < kK) {
      reinterpret_cast<float*>(item + kItemEG)[tid] = Exp2Fast(sG[TG(kC - 1, tid)]);
    }
  }
  __syncthreads();
  if (a.stop_after == 4) return;

  // ---- phase 3: LT16 (bf16, in the dead q tile): T_II = (I + L_II)^-1 on the diagonal
  //      blocks (fp32 forward substitution, warps 0-3), -L_IJ below them (warps 4-7) ----
  bf16* sLT = sQ;  // [64][72]
  if (warp < 4) {
    if (lane < 16) {
      const int I = warp, cc = lane;
      // Right-looking: once x[m] is final it updates every later row, so the
      // dependent chain is 16 FMAs long instead of 120; each x[r] still subtracts
      // its terms in the order m = 0, 1, ... (the same bits as row by row).
      float x[16];
#pragma unroll
      for (int r = 0; r < 16; ++r) x[r] = r == cc ? 1.0f : 0.0f;
#pragma unroll
      for (int m = 0; m < 16; ++m) {
#pragma unroll
        for (int r = m + 1; r < 16; ++r) x[r] -= sL[(16 * I + r) * kLdL + 16 * I + m] * x[m];
      }
#pragma unroll
      for (int r = 0; r < 16; ++r) sLT[(16 * I + r) * kLdA + 16 * I + cc] = __float2bfloat16_rn(x[r]);
    }
  } else {
    for (int i = tid - 128; i < 6 * 256; i += 128) {
      const int p = i >> 8, e = i & 255;
      const int I = p < 1 ? 1 : p < 3 ? 2 : 3, J = p - I * (I - 1) / 2;
      const int r = 16 * I + (e >> 4), j = 16 * J + (e & 15);
      sLT[r * kLdA + j] = __float2bfloat16_rn(-sL[r * kLdL + j]);
    }
  }
  __syncthreads();
  if (a.stop_after == 5) return;

  // ---- phase 4: [W | U] = (I + L)^-1 diag(beta) [K o Gamma | V] by block forward
  //      substitution on tensor cores, transposed (X^T = Z^T T_II^T with
  //      Z^T = beta B^T - sum_J X_J^T L_IJ^T); warp w owns 32 of the 256 columns, so the
  //      four block rows need no CTA barrier. X_I overwrites block row I of its own
  //      source columns (read just before), so W ends in sK and U in sV. ----
  {
    const int which = warp >> 2, col0 = 32 * (warp & 3);
    bf16* src = which == 0 ? sK : sV;
    const int mi = lane >> 3, mrow = lane & 7;  // stmatrix: matrix, row of this lane's address
#pragma unroll 1
    for (int I = 0; I < 4; ++I) {
      float y[2][2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {  // y^T init: beta_r B[r][c] in C layout (m = c, n = r)
        uint32_t u[4];
        Ldmatrix4Trans(u, src + TB(16 * I + lrow, col0 + 16 * mt + lcol));
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const float b0 = sBeta[16 * I + 8 * nt + 2 * t4], b1 = sBeta[16 * I + 8 * nt + 2 * t4 + 1];
          const float2 lo = UnpackBf16(u[2 * nt]), hi = UnpackBf16(u[2 * nt + 1]);
          y[mt][nt][0] = b0 * lo.x;
          y[mt][nt][1] = b1 * lo.y;
          y[mt][nt][2] = b0 * hi.x;
          y[mt][nt][3] = b1 * hi.y;
        }
      }
      for (int J = 0; J < I; ++J) {
        uint32_t bl[4];
        Ldmatrix4(bl, sLT + (16 * I + lrow) * kLdA + 16 * J + lcol);  // (-L_IJ)^T
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t ax[4];
          Ldmatrix4Trans(ax, src + TB(16 * J + lrow, col0 + 16 * mt + lcol));  // X_J^T
          Mma16816(y[mt][0], ax, bl[0], bl[1]);
          Mma16816(y[mt][1], ax, bl[2], bl[3]);
        }
      }
      uint32_t bt[4];
      Ldmatrix4(bt, sLT + (16 * I + lrow) * kLdA + 16 * I + lcol);  // T_II^T
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        uint32_t az[4];
        az[0] = PackBf16(y[mt][0][0], y[mt][0][1]);
        az[1] = PackBf16(y[mt][0][2], y[mt][0][3]);
        az[2] = PackBf16(y[mt][1][0], y[mt][1][1]);
        az[3] = PackBf16(y[mt][1][2], y[mt][1][3]);
        float x[2][4] = {};
        Mma16816(x[0], az, bt[0], bt[1]);
        Mma16816(x[1], az, bt[2], bt[3]);
        // X_I^T (m = c, n = r): four 8 x 8 fragments, stored transposed -> src[r][c].
        const uint32_t xs[4] = {PackBf16(x[0][0], x[0][1]), PackBf16(x[0][2], x[0][3]),
                                PackBf16(x[1][0], x[1][1]), PackBf16(x[1][2], x[1][3])};
        Stmatrix4Trans(src + TB(16 * I + 8 * (mi >> 1) + mrow, col0 + 16 * mt + 8 * (mi & 1)), xs);
      }
      __syncwarp();
    }
  }
  __syncthreads();
  if (a.stop_after == 6) return;

  // ---- phase 5: copy-out of W and A (core-matrix layout) and U (two padded slices) ----
  {
    const bf16* stW = sK;
    const bf16* stU = sV;
    for (int i = tid; i < kC * 16; i += kIntraThreads) {
      const int cm = i >> 3, r = (cm >> 4) * 8 + (i & 7), s8 = (cm & 15) * 8;
      *reinterpret_cast<uint4*>(item + kItemW + CoreK128(r, s8)) =
          *reinterpret_cast<const uint4*>(stW + TB(r, s8));
    }
    for (int i = tid; i < kC * 8; i += kIntraThreads) {
      const int cm = i >> 3, r = (cm >> 3) * 8 + (i & 7), s8 = (cm & 7) * 8;
      *reinterpret_cast<uint4*>(item + kItemA + CoreK64(r, s8)) =
          *reinterpret_cast<const uint4*>(sA + r * kLdA + s8);
    }
    uint4* gU = reinterpret_cast<uint4*>(item + kItemU);
    for (int i = tid; i < 2 * kC * 8; i += kIntraThreads) {  // [slice][64 rows][8 segs] (+ pad seg)
      const int sl = i >> 9, r = (i >> 3) & 63, s = i & 7;
      gU[(sl * kC + r) * (kLdA / 8) + s] = *reinterpret_cast<const uint4*>(stU + TB(r, 64 * sl + 8 * s));
    }
  }
  // Streamed mode: every thread's item stores, then the flag (release at GPU scope,
  // cumulative over the CTA barrier) for the state CTAs polling it.
  if (a.ready != nullptr) {
    FenceProxyAsyncGlobal();
    __syncthreads();
    if (tid == 0) StoreRelease(a.ready + static_cast<int64_t>(c) * H + h, 1);
  }
}

}  // namespace

cudaError_t IntraAttributes(cudaFuncAttributes* attr, int* dynamic_smem, int* threads) {
  *threads = kIntraThreads;
  *dynamic_smem = kIntraSmem;
  return cudaFuncGetAttributes(attr, KdaChunkIntraKernel);
}

cudaError_t LaunchIntra(const TcArgs& a, cudaStream_t stream) {
  static_assert(kIntraSmem <= 115712, "intra kernel must fit 2 CTAs per SM");
  static bool attr_set = false;  // idempotent; racing threads set the same value
  if (!attr_set) {
    const cudaError_t err =
        cudaFuncSetAttribute(KdaChunkIntraKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kIntraSmem);
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  if (a.c1 <= a.c0) return cudaSuccess;
  KdaChunkIntraKernel<<<dim3(a.H, static_cast<unsigned>(a.c1 - a.c0)), kIntraThreads, kIntraSmem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace kl::cuda::internal::tc
