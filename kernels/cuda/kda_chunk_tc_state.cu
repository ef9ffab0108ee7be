// State kernels of the tensor-core chunked KDA prefill (K = V = 128, C = 64, sm_90a):
// grid (V / 64, H, N), one warpgroup per (sequence, head, 64-column slice), walking
// the chunks of its sequence inside the launch's chunk range [c0, c1) in order. Each
// warp keeps 16 columns of S^T (16 x 128 fp32) in accumulator registers; per chunk
//    P = S^T [W; QG]^T,  Vt^T = U^T - P_W,  O^T = P_QG + Vt^T A^T,
//    S^T = S^T diag(EG) + Vt^T KH
// (S^T and Vt^T accumulators are reused directly as the A operand, FA2-style). The
// state enters from the slot (or zeros) when the range holds the sequence's first
// chunk, else from the carry buffer of the previous range; it leaves to the slot when
// the range holds the last chunk, else to the carry buffer of the next range.
//  - KdaChunkStateWgmmaKernel (default): wgmma; P_W and P_QG in separate groups so
//    Vt^T starts as soon as P_W is done; the output of chunk c is written while the
//    tensor cores run the S update of chunk c + 1; items arrive in three parts by bulk copies
//    ([W, QG] and [U, EG] double-buffered, [KH, A] single), 115 KB of shared memory
//    so that one CTA fits beside an intra-kernel CTA on an SM. In streamed mode (the
//    intra kernel running at the same time) a chunk's copies wait for its ready flag.
//  - KdaChunkStateMmaKernel: mma.sync + ldmatrix fallback, 3-stage whole-item pipeline.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/kda_chunk_tc.cuh"
#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/kda_state_layout.h"
#include "kernels/cuda/wgmma.cuh"

namespace kl::cuda::internal::tc {
namespace {

using namespace kl::cuda::dev;  // NOLINT

constexpr int kStateThreads = 128;  // one warpgroup
constexpr int kSliceV = 64;         // value columns per CTA
constexpr int kLdA = 72;            // bf16 row stride of the U slices
static_assert(kItemUSlice == 64 * kLdA * 2, "U slices are 64 padded rows");
static_assert(kItemQG == kItemW + 8 * 2048 && kItemA == kItemKH + 64 * 128 * 2, "item parts are contiguous");

__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count));
}
__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(SmemAddr(bar)), "r"(parity)
        : "memory");
  }
}
// Bulk global -> shared copy (size and addresses multiples of 16) completing on `bar`.
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          SmemAddr(dst)),
      "l"(src), "r"(bytes), "r"(SmemAddr(bar))
      : "memory");
}
// Orders this thread's (and, after a CTA barrier, everyone's) earlier generic-proxy
// accesses of shared memory before the next bulk copies into it.
__device__ __forceinline__ void ProxyFence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accumulator reads across the wgmma wait.
__device__ __forceinline__ void FenceRegs(float* d, int n) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Per-CTA view of one (sequence, head, slice) chain inside the launch's chunk range.
struct Chain {
  int cb, ce;             // chunks [cb, ce) of this launch
  int64_t tok_cb, tok_end;  // first token of chunk cb, end of the sequence
  const float* s_in;      // initial S (null: zeros)
  float* s_out;           // final S (null: discarded)
};
__device__ __forceinline__ bool ChainOf(const TcArgs& a, int n, int h, Chain* c) {
  const int first = a.offs[n], last = a.offs[n + 1];
  c->cb = max(first, a.c0);
  c->ce = min(last, a.c1);
  if (c->cb >= c->ce) return false;  // empty sequence or outside the range: untouched
  c->tok_cb = a.cu[n] + static_cast<int64_t>(c->cb - first) * kC;
  c->tok_end = a.cu[n + 1];
  const int32_t slot = a.slots[n];
  float* state = slot >= 0 && slot < a.num_slots ? a.state_pool + (static_cast<int64_t>(slot) * a.H + h) * kK * kV
                                                 : nullptr;
  auto carry = [&](int parity) {
    return a.carry + ((static_cast<int64_t>(parity) * a.N + n) * a.H + h) * kK * kV;
  };
  c->s_in = c->cb == first ? state : carry(a.seg & 1);
  c->s_out = c->ce == last ? state : carry((a.seg + 1) & 1);
  return true;
}

// S^T as mma C fragments (S in the pool layout, kda_state_layout.h, also for the carry
// buffer): s[4 nt + e], d in [8 nt, 8 nt + 8):
// e = 0: (v = vw + g8, d = 8 nt + 2 t4), 1: (v, d + 1), 2: (v + 8, d), 3: (v + 8, d + 1).
__device__ __forceinline__ void LoadS(float (&s)[64], const float* src, int vw, int g8, int t4) {
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const int d = 8 * nt + 2 * t4, v = vw + g8;
    if (src != nullptr) {
      s[4 * nt + 0] = src[KdaStateOffset(d, v, kK, kV)];
      s[4 * nt + 1] = src[KdaStateOffset(d + 1, v, kK, kV)];
      s[4 * nt + 2] = src[KdaStateOffset(d, v + 8, kK, kV)];
      s[4 * nt + 3] = src[KdaStateOffset(d + 1, v + 8, kK, kV)];
    } else {
      s[4 * nt + 0] = s[4 * nt + 1] = s[4 * nt + 2] = s[4 * nt + 3] = 0.0f;
    }
  }
}
__device__ __forceinline__ void StoreS(const float (&s)[64], float* dst, int vw, int g8, int t4) {
  if (dst == nullptr) return;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const int d = 8 * nt + 2 * t4, v = vw + g8;
    dst[KdaStateOffset(d, v, kK, kV)] = s[4 * nt + 0];
    dst[KdaStateOffset(d + 1, v, kK, kV)] = s[4 * nt + 1];
    dst[KdaStateOffset(d, v + 8, kK, kV)] = s[4 * nt + 2];
    dst[KdaStateOffset(d + 1, v + 8, kK, kV)] = s[4 * nt + 3];
  }
}
// Vt^T = U^T - P_W as bf16 A fragments over k = token j (U slice [64 j][72], padded).
__device__ __forceinline__ void MakeVt(uint32_t (&va)[4][4], const bf16* sU, const float* pw, int warp,
                                       int lane) {
  const int lrow = (lane & 7) + 8 * (lane >> 4), lcol = 8 * ((lane >> 3) & 1);
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    uint32_t u[4];
    Ldmatrix4Trans(u, sU + (16 * np + lrow) * kLdA + 16 * warp + lcol);
    const float2 u0 = UnpackBf16(u[0]), u1 = UnpackBf16(u[1]);
    const float2 u2 = UnpackBf16(u[2]), u3 = UnpackBf16(u[3]);
    const float* p = pw + 8 * np;
    va[np][0] = PackBf16(u0.x - p[0], u0.y - p[1]);
    va[np][1] = PackBf16(u1.x - p[2], u1.y - p[3]);
    va[np][2] = PackBf16(u2.x - p[4], u2.y - p[5]);
    va[np][3] = PackBf16(u3.x - p[6], u3.y - p[7]);
  }
}
// S^T <- S^T diag(EG).
__device__ __forceinline__ void ScaleS(float (&s)[64], const float* sE, int t4) {
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    const float2 e = *reinterpret_cast<const float2*>(sE + 8 * nt + 2 * t4);
    s[4 * nt + 0] *= e.x; s[4 * nt + 1] *= e.y; s[4 * nt + 2] *= e.x; s[4 * nt + 3] *= e.y;
  }
}
// O^T (this warp's 16 v x 64 r, C fragments o[4 j + e]) -> warp tile sO [64 r][16 v]
// (16-B halves swizzled by bit 2 of r) by stmatrix.trans -> rows < nr to global.
__device__ __forceinline__ void StoreO(const float (&o)[32], bf16* sO, bf16* dst, int64_t row_stride, int nr,
                                       int lane) {
  __syncwarp();  // earlier reads of sO are done
  const int mi = lane >> 3, i = lane & 7;
#pragma unroll
  for (int jp = 0; jp < 4; ++jp) {
    const uint32_t x[4] = {PackBf16(o[8 * jp + 0], o[8 * jp + 1]), PackBf16(o[8 * jp + 2], o[8 * jp + 3]),
                           PackBf16(o[8 * jp + 4], o[8 * jp + 5]), PackBf16(o[8 * jp + 6], o[8 * jp + 7])};
    const int r = 16 * jp + 8 * (mi >> 1) + i, hf = mi & 1;
    Stmatrix4Trans(sO + r * 16 + 8 * (hf ^ ((r >> 2) & 1)), x);
  }
  __syncwarp();
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int idx = lane + 32 * m, r = idx >> 1, hf = idx & 1;
    if (r < nr) {
      *reinterpret_cast<uint4*>(dst + r * row_stride + 8 * hf) =
          *reinterpret_cast<const uint4*>(sO + r * 16 + 8 * (hf ^ ((r >> 2) & 1)));
    }
  }
}

// ---------------------------------------------------------------------------------
// wgmma kernel
// ---------------------------------------------------------------------------------
constexpr int kXBytes = static_cast<int>(kItemKH - kItemW);       // W + QG: 32,768
constexpr int kY1Bytes = static_cast<int>(kItemUSlice) + kK * 4;   // U slice + EG: 9,728
constexpr int kY2Bytes = static_cast<int>(kItemU - kItemKH);       // KH + A: 24,576
constexpr int kOffX = 0;                                  // [2] W, QG
constexpr int kOffY1 = kOffX + 2 * kXBytes;               // [2] U slice, EG
constexpr int kOffY2 = kOffY1 + 2 * kY1Bytes;             // KH, A
constexpr int kOffO = kOffY2 + kY2Bytes;                  // [4 warps] O tile bf16 [64][16]
constexpr int kWgSmem = kOffO + 4 * kC * 16 * 2;          // 117,760 B
static_assert(kWgSmem + 1024 + 109312 + 1024 <= 233472, "state CTA must fit beside an intra CTA");

__device__ __forceinline__ void IssueX(unsigned char* smem, int b, const unsigned char* item, uint64_t* bar) {
  MbarExpectTx(bar, kXBytes);
  BulkCopy(smem + kOffX + b * kXBytes, item + kItemW, kXBytes, bar);
}
__device__ __forceinline__ void IssueY1(unsigned char* smem, int b, const unsigned char* item, int vs,
                                        uint64_t* bar) {
  MbarExpectTx(bar, kY1Bytes);
  unsigned char* dst = smem + kOffY1 + b * kY1Bytes;
  BulkCopy(dst, item + kItemU + vs * kItemUSlice, static_cast<uint32_t>(kItemUSlice), bar);
  BulkCopy(dst + kItemUSlice, item + kItemEG, kK * 4, bar);
}
__device__ __forceinline__ void IssueY2(unsigned char* smem, const unsigned char* item, uint64_t* bar) {
  MbarExpectTx(bar, kY2Bytes);
  BulkCopy(smem + kOffY2, item + kItemKH, kY2Bytes, bar);
}

// Streamed mode, thread 0: waits until the intra kernel has flagged item `f`.
// (Deliberately no watchdog: a __trap or printf in this loop costs ptxas the uniform
// datapath for the wgmma descriptors, +15-20% per chain step, measured. LaunchChunkTc
// streams only when the intra kernel is sure to make progress beside the state CTAs.)
__device__ __forceinline__ void WaitFlag(const int32_t* f) {
  while (LoadAcquire(f) == 0) __nanosleep(64);
  FenceProxyAsyncGlobal();  // the flagged item is next read by bulk copies
}
// Streamed mode, thread 0: a relaxed read of a flag, issued early in a chunk step and
// looked at only at its end, so the chain never waits on it. A set flag is enough to
// issue the item's bulk copies: the intra kernel's release makes the item visible in L2
// (GPU scope) before the flag, and the copies, issued only after the flag was seen, read
// L2 (after fence.proxy.async; WaitFlag is the fully ordered path when a chain catches up).
__device__ __forceinline__ int32_t LoadRelaxed(const int32_t* p) {
  int32_t v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}


// Registers: one state CTA and one intra CTA (128 per thread) share an SM's 64K, so
// this kernel must stay at or under 248 per thread (LaunchChunkTc checks before it streams;
// kda_test fails if it may not). No calls (printf) in it: ptxas serialises wgmma then.
template <bool kStreamed>
__global__ void __launch_bounds__(kStateThreads, 1) KdaChunkStateWgmmaKernel(const TcArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t bar_x[2], bar_y1[2], bar_y2;
  const int vs = blockIdx.x, h = blockIdx.y, n = blockIdx.z, H = a.H;
  Chain ch;
  if (!ChainOf(a, n, h, &ch)) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2, t4 = lane & 3;
  const int vw = vs * kSliceV + 16 * warp;  // warp's first value column
  auto item_of = [&](int ci) { return a.items + (static_cast<size_t>(ci) * H + h) * kItemBytes; };
  auto flag_of = [&](int ci) { return a.ready + static_cast<int64_t>(ci) * H + h; };  // kStreamed only
  // Thread 0: how far ahead of the current chunk the X + Y1 copies have gone out (2: the
  // next chunk's are out; streamed mode: 1 or 0 while the intra kernel has not flagged
  // the chunk after / this chunk yet). Addresses below stay expressions of ci (uniform:
  // ptxas keeps them, and the wgmma descriptors, on the uniform datapath).
  int x_ahead = 2;
  if (tid == 0) {
    MbarInit(&bar_x[0], 1);
    MbarInit(&bar_x[1], 1);
    MbarInit(&bar_y1[0], 1);
    MbarInit(&bar_y1[1], 1);
    MbarInit(&bar_y2, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    if (kStreamed) WaitFlag(flag_of(ch.cb));
    IssueX(smem, 0, item_of(ch.cb), &bar_x[0]);
    IssueY1(smem, 0, item_of(ch.cb), vs, &bar_y1[0]);
    IssueY2(smem, item_of(ch.cb), &bar_y2);
    if (ch.cb + 1 < ch.ce) {
      if (!kStreamed || LoadRelaxed(flag_of(ch.cb + 1)) != 0) {
        if (kStreamed) FenceProxyAsyncGlobal();
        IssueX(smem, 1, item_of(ch.cb + 1), &bar_x[1]);
        IssueY1(smem, 1, item_of(ch.cb + 1), vs, &bar_y1[1]);
      } else {
        x_ahead = 1;
      }
    }
  }
  float s[64];
  LoadS(s, ch.s_in, vw, g8, t4);
  __syncthreads();  // barrier init visible before anyone waits on it
  bf16* sO = reinterpret_cast<bf16*>(smem + kOffO) + warp * kC * 16;
  const uint32_t base = SmemAddr(smem);
  const int64_t row_stride = static_cast<int64_t>(H) * kV;
  // Matrix descriptors (start address in 16-B units in the low bits: + 16 per 256 B).
  const uint64_t desc_x0 = WgmmaDesc(base + kOffX, 128, 2048), desc_x1 = WgmmaDesc(base + kOffX + kXBytes, 128, 2048);
  const uint64_t desc_kh = WgmmaDesc(base + kOffY2, 128, 1024);
  const uint64_t desc_a = WgmmaDesc(base + kOffY2 + 64 * 128 * 2, 128, 1024);
  float o[32];  // O^T of the previous chunk (written while the next chunk's S update runs)
  int64_t o_tok = 0;
  int o_nr = 0;

#pragma unroll 1
  for (int ci = ch.cb; ci < ch.ce; ++ci) {
    const int k = ci - ch.cb, b = k & 1;
    const uint64_t dw = b ? desc_x1 : desc_x0, dq = dw + (64 * 128 * 2 / 16);
    const unsigned char* y1 = smem + kOffY1 + b * kY1Bytes;
    // Streamed, thread 0: the flags of chunks ci + 1 (if its copies are not out yet) and
    // ci + 2, read now and looked at after this step.
    int32_t flag1 = 1, flag2 = 1;
    if (kStreamed && tid == 0) {
      if (x_ahead == 0) {  // the intra kernel was behind: wait for chunk ci here
        WaitFlag(flag_of(ci));
        IssueX(smem, b, item_of(ci), &bar_x[b]);
        IssueY1(smem, b, item_of(ci), vs, &bar_y1[b]);
        IssueY2(smem, item_of(ci), &bar_y2);  // held back with X at the end of ci - 1
        x_ahead = 1;
      }
      if (x_ahead == 1 && ci + 1 < ch.ce) flag1 = LoadRelaxed(flag_of(ci + 1));
      flag2 = ci + 2 < ch.ce ? LoadRelaxed(flag_of(ci + 2)) : 0;
    }
    MbarWait(&bar_x[b], (k >> 1) & 1);

    // Group 1: P_W = S^T W^T, group 2: P_QG = S^T QG^T (A fragments from S).
    uint32_t af[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      af[kk][0] = PackBf16(s[8 * kk + 0], s[8 * kk + 1]);
      af[kk][1] = PackBf16(s[8 * kk + 2], s[8 * kk + 3]);
      af[kk][2] = PackBf16(s[8 * kk + 4], s[8 * kk + 5]);
      af[kk][3] = PackBf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
    float pw[32], pq[32];
    WgmmaFence();
    WgmmaM64N64K16Zero(pw, af[0], dw);
#pragma unroll
    for (int kk = 1; kk < 8; ++kk) WgmmaM64N64K16(pw, af[kk], dw + 16 * kk);
    WgmmaCommit();
    WgmmaM64N64K16Zero(pq, af[0], dq);
#pragma unroll
    for (int kk = 1; kk < 8; ++kk) WgmmaM64N64K16(pq, af[kk], dq + 16 * kk);
    WgmmaCommit();
    MbarWait(&bar_y1[b], (k >> 1) & 1);
    WgmmaWait<1>();
    FenceRegs(pw, 32);
    uint32_t va[4][4];
    MakeVt(va, reinterpret_cast<const bf16*>(y1), pw, warp, lane);
    // S^T diag(EG) while P_QG runs (touching S with both groups in flight makes ptxas
    // insert a full wait).
    ScaleS(s, reinterpret_cast<const float*>(y1 + kItemUSlice), t4);
    // Group 3: O^T = P_QG + Vt^T A^T (accumulating onto group 2's registers, in issue
    // order), S^T += Vt^T KH. Meanwhile: the previous chunk's output.
    MbarWait(&bar_y2, k & 1);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) WgmmaM64N64K16(pq, va[kk], desc_a + 16 * kk);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) WgmmaM64N128K16Trans(s, va[kk], desc_kh + 16 * kk);
    WgmmaCommit();
    if (k > 0) StoreO(o, sO, a.o + (o_tok * H + h) * kV + vw, row_stride, o_nr, lane);
    WgmmaWaitAll();
    FenceRegs(pq, 32);
    FenceRegs(s, 64);
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] = pq[i];
    o_tok = ch.tok_cb + static_cast<int64_t>(k) * kC;
    o_nr = ch.tok_end - o_tok < kC ? static_cast<int>(ch.tok_end - o_tok) : kC;
    __syncthreads();  // all reads of X[b], Y1[b], Y2 (wgmma and ldmatrix / loads) are done
    if (tid == 0) {
      ProxyFence();  // also covers the copies thread 0 issues later into these buffers
      if constexpr (!kStreamed) {
        if (ci + 1 < ch.ce) IssueY2(smem, item_of(ci + 1), &bar_y2);
        if (ci + 2 < ch.ce) {
          IssueX(smem, b, item_of(ci + 2), &bar_x[b]);
          IssueY1(smem, b, item_of(ci + 2), vs, &bar_y1[b]);
        }
      } else {
        // X + Y1 of ci + 1 if they are not out yet (x_ahead 1) and its flag was set when
        // read at the top of this step, then Y2 of ci + 1 (needed first), then X + Y1 of
        // ci + 2 if its flag was set: a chain that missed a flag is back two ahead as soon
        // as the intra kernel is. Whatever is not out goes out at the top of its step.
        const bool x1 = x_ahead == 1 && ci + 1 < ch.ce && flag1 != 0;
        const bool x2 = (x_ahead == 2 || x1) && ci + 2 < ch.ce && flag2 != 0;
        if (x1 || x2) FenceProxyAsyncGlobal();
        if (x1) {
          IssueX(smem, b ^ 1, item_of(ci + 1), &bar_x[b ^ 1]);
          IssueY1(smem, b ^ 1, item_of(ci + 1), vs, &bar_y1[b ^ 1]);
        }
        const bool y2 = x_ahead == 2 || x1;  // X of ci + 1 is out: its flag was seen
        if (y2 && ci + 1 < ch.ce) IssueY2(smem, item_of(ci + 1), &bar_y2);
        if (x2) {
          IssueX(smem, b, item_of(ci + 2), &bar_x[b]);
          IssueY1(smem, b, item_of(ci + 2), vs, &bar_y1[b]);
        }
        x_ahead = x2 ? 2 : y2 ? 1 : 0;
      }
    }
  }
  StoreO(o, sO, a.o + (o_tok * H + h) * kV + vw, row_stride, o_nr, lane);
  StoreS(s, ch.s_out, vw, g8, t4);
}

// ---------------------------------------------------------------------------------
// mma.sync kernel (fallback): 3-stage pipeline of [W, QG, KH, A, U slice, EG].
// ---------------------------------------------------------------------------------
constexpr int kStU = static_cast<int>(kItemU);
constexpr int kStE = kStU + static_cast<int>(kItemUSlice);
constexpr int kStageBytes = kStE + kK * 4;  // 67,072
constexpr int kStages = 3;
constexpr int kMmaSmem = kStages * kStageBytes + 4 * kC * 16 * 2;  // 209,408

__device__ __forceinline__ void IssueStage(unsigned char* st, const unsigned char* item, int vs, uint64_t* bar) {
  ProxyFence();
  MbarExpectTx(bar, kStageBytes);
  BulkCopy(st, item, static_cast<uint32_t>(kItemU), bar);  // W, QG, KH, A
  BulkCopy(st + kStU, item + kItemU + vs * kItemUSlice, static_cast<uint32_t>(kItemUSlice), bar);
  BulkCopy(st + kStE, item + kItemEG, kK * 4, bar);
}

__global__ void __launch_bounds__(kStateThreads, 1) KdaChunkStateMmaKernel(const TcArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t s_bar[kStages];
  const int vs = blockIdx.x, h = blockIdx.y, n = blockIdx.z, H = a.H;
  Chain ch;
  if (!ChainOf(a, n, h, &ch)) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2, t4 = lane & 3;
  const int vw = vs * kSliceV + 16 * warp;
  auto item_of = [&](int ci) { return a.items + (static_cast<size_t>(ci) * H + h) * kItemBytes; };
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) MbarInit(&s_bar[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    for (int i = 0; i < kStages - 1 && ch.cb + i < ch.ce; ++i) {
      IssueStage(smem + i * kStageBytes, item_of(ch.cb + i), vs, &s_bar[i]);
    }
  }
  float s[64];
  LoadS(s, ch.s_in, vw, g8, t4);
  __syncthreads();
  bf16* sO = reinterpret_cast<bf16*>(smem + kStages * kStageBytes) + warp * kC * 16;
  const int mi = lane >> 3, mr = (lane & 7) * 16;  // ldmatrix: matrix index, row byte offset

#pragma unroll 1
  for (int ci = ch.cb; ci < ch.ce; ++ci) {
    const int k = ci - ch.cb, stg = k % kStages;
    unsigned char* st = smem + stg * kStageBytes;
    MbarWait(&s_bar[stg], (k / kStages) & 1);
    __syncthreads();  // everyone is done with the stage of chunk ci - 1, refilled next
    if (tid == 0 && ci + kStages - 1 < ch.ce) {
      const int nxt = (k + kStages - 1) % kStages;
      IssueStage(smem + nxt * kStageBytes, item_of(ci + kStages - 1), vs, &s_bar[nxt]);
    }
    // p[4 j + e]: n-tiles j < 8: P_W = S^T W^T (r = 8 j ..), j >= 8: P_QG = S^T QG^T.
    float p[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) p[i] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      uint32_t af[4];
      af[0] = PackBf16(s[8 * kk + 0], s[8 * kk + 1]);
      af[1] = PackBf16(s[8 * kk + 2], s[8 * kk + 3]);
      af[2] = PackBf16(s[8 * kk + 4], s[8 * kk + 5]);
      af[3] = PackBf16(s[8 * kk + 6], s[8 * kk + 7]);
#pragma unroll
      for (int np = 0; np < 8; ++np) {  // 16 rows of [W; QG] per np
        uint32_t bw[4];
        Ldmatrix4(bw, st + kItemW + ((2 * np + (mi >> 1)) * 16 + 2 * kk + (mi & 1)) * 128 + mr);
        Mma16816(*reinterpret_cast<float(*)[4]>(p + 8 * np), af, bw[0], bw[1]);
        Mma16816(*reinterpret_cast<float(*)[4]>(p + 8 * np + 4), af, bw[2], bw[3]);
      }
    }
    uint32_t va[4][4];
    MakeVt(va, reinterpret_cast<const bf16*>(st + kStU), p, warp, lane);
    ScaleS(s, reinterpret_cast<const float*>(st + kStE), t4);
    float* pq = p + 32;  // O^T = P_QG + Vt^T A^T
#pragma unroll
    for (int np = 0; np < 4; ++np) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk > np) break;  // A lower triangular
        uint32_t ba[4];
        Ldmatrix4(ba, st + kItemA + ((2 * np + (mi >> 1)) * 8 + 2 * kk + (mi & 1)) * 128 + mr);
        Mma16816(*reinterpret_cast<float(*)[4]>(pq + 8 * np), va[kk], ba[0], ba[1]);
        Mma16816(*reinterpret_cast<float(*)[4]>(pq + 8 * np + 4), va[kk], ba[2], ba[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int dp = 0; dp < 8; ++dp) {
        uint32_t bk[4];
        Ldmatrix4Trans(bk, st + kItemKH + ((2 * dp + (mi >> 1)) * 8 + 2 * kk + (mi & 1)) * 128 + mr);
        Mma16816(*reinterpret_cast<float(*)[4]>(s + 8 * dp), va[kk], bk[0], bk[1]);
        Mma16816(*reinterpret_cast<float(*)[4]>(s + 8 * dp + 4), va[kk], bk[2], bk[3]);
      }
    }
    const int64_t tok0 = ch.tok_cb + static_cast<int64_t>(k) * kC;
    const int nr = ch.tok_end - tok0 < kC ? static_cast<int>(ch.tok_end - tok0) : kC;
    StoreO(*reinterpret_cast<float(*)[32]>(pq), sO, a.o + (tok0 * H + h) * kV + vw,
           static_cast<int64_t>(H) * kV, nr, lane);
  }
  StoreS(s, ch.s_out, vw, g8, t4);
}

}  // namespace

// Shared memory a state CTA asks for when it must have its SM to itself: more than an SM
// (228 KB) minus an intra CTA (109,312 B) minus the 1 KB reserved per CTA, twice.
constexpr int kWgAloneSmem = 126 * 1024;
static_assert(kWgAloneSmem >= kWgSmem, "the alone variant only pads");

cudaError_t StateAttributes(cudaFuncAttributes* attr, int* dynamic_smem, int* threads) {
  *threads = kStateThreads;
  *dynamic_smem = kWgSmem;
  return cudaFuncGetAttributes(attr, KdaChunkStateWgmmaKernel<true>);  // the streamed variant
}

cudaError_t LaunchState(const TcArgs& a, bool wgmma, bool alone, cudaStream_t stream) {
  static bool attr_wg = false, attr_mma = false;  // idempotent; racing threads set the same value
  cudaError_t err = cudaSuccess;
  if (wgmma && !attr_wg) {
    err = cudaFuncSetAttribute(KdaChunkStateWgmmaKernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kWgAloneSmem);
    if (err == cudaSuccess) {
      err = cudaFuncSetAttribute(KdaChunkStateWgmmaKernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 kWgSmem);
    }
    if (err != cudaSuccess) return err;
    attr_wg = true;
  }
  if (!wgmma && !attr_mma) {
    err = cudaFuncSetAttribute(KdaChunkStateMmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaSmem);
    if (err != cudaSuccess) return err;
    attr_mma = true;
  }
  const dim3 grid(kV / kSliceV, a.H, a.N);
  if (wgmma && a.ready != nullptr) {
    KdaChunkStateWgmmaKernel<true><<<grid, kStateThreads, kWgSmem, stream>>>(a);
  } else if (wgmma) {
    KdaChunkStateWgmmaKernel<false><<<grid, kStateThreads, alone ? kWgAloneSmem : kWgSmem, stream>>>(a);
  } else {
    KdaChunkStateMmaKernel<<<grid, kStateThreads, kMmaSmem, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace kl::cuda::internal::tc
