// MLA absorbed decode over the paged latent cache (one new token per sequence, all H
// heads sharing each cache row: MQA with a (latent + rope)-d key and a latent-d value):
// the launcher (validation, split choice, workspace, kernel choice) and the mma.sync
// tensor-core kernel. The default kernel for a bf16 cache on sm_90 is the warp-specialised
// wgmma kernel (mla_decode_wg.cu: TMA ring + wgmma, ~96-101% of the D2D copy rate at
// 32K-128K x 64 on an H100); the SIMT and combine kernels are in mla_decode_simt.cu.
//
// Split-KV: grid (split, sequence); sequence n's rows [0, len) are cut into S ranges of
// ceil(ceil(len / S) / 64) * 64 rows, so every sequence spreads over all S CTAs whatever
// its length (read on the device). Each CTA reads its rows exactly once for all heads
// and leaves (unnormalised output, running max, running sum) per head in the workspace;
// the combine kernel merges the S partial softmax states (S == 1: the attention kernel
// writes the final output itself).
//
// mma.sync kernel (bf16 cache, latent in {64, 128, 256, 512}, rope % 16 == 0, H <= 32;
// serves the shapes the wgmma kernel does not take: rope not in {0, 64}, page_size not
// a multiple of 8, devices other than sm_90, or MlaDecodeParams::Kernel::kMmaSync),
// 256 threads, one CTA per SM (~192 KB shared at latent 512 + rope 64):
//  - 64-row cache tiles, double-buffered; warp 0 issues one bulk copy
//    (cp.async.bulk, completing on the stage's mbarrier) per row, zero-filling rows
//    past the range or on an unmapped page; tile t+1 is in flight while t is computed;
//  - q stays in registers: warp w holds the bf16 A fragments of head tile w % M
//    (M = ceil(H / 16)) for the k-steps [kq nk, (kq + 1) nk), kq = w / M, and computes
//    partial scores [16 heads][64 rows] over that k-range with mma.sync m16n8k16
//    (B = the cache rows by ldmatrix); the 8 / M partials meet in shared memory;
//  - online softmax in the exp2 domain by 16 / M threads per head row (state in
//    registers), P (bf16) and the rescale factor to shared memory;
//  - O += P V with V = the first latent columns of the same tile (ldmatrix.trans),
//    each warp owning latent / 8 output columns for all heads in registers.
// Measured (H100, mla_bench): ~64-71% of the D2D copy rate at batch 16-64 and 32K-128K
// context: the copy waits and the mma.sync work of one CTA per SM overlap only partly
// (with the compute skipped the copies alone reach ~78%, with the copies skipped the
// compute runs at ~130%), which is what the wgmma kernel's producer warp fixes.
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
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda {
namespace {

using namespace kl::cuda::dev;  // NOLINT
using namespace kl::cuda::mla;  // NOLINT

__device__ __forceinline__ void Ldmatrix2Trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(p)));
}

// ================================ tensor-core kernel ==================================
constexpr int kTcRows = 64;      // cache rows per tile
constexpr int kTcStages = 2;     // double buffer: tile t+1 in flight while tile t is computed
constexpr int kTcThreads = 256;  // 8 warps
constexpr int kTcMaxKs = 9;      // q k-steps (16 wide) per warp held in registers
constexpr int kLdS = 72;         // fp32 partial-score row stride: half-warp float2 stores conflict-free
constexpr int kLdP = 72;         // bf16 P row stride: 144 B (odd multiple of 16 B), ldmatrix conflict-free

struct TcLayout {
  int ld;  // bf16 row stride of the cache tiles: D + 8 (odd multiple of 16 B when D % 16 == 0)
  size_t kv, s, p, alpha, l, m, ok, bar, total;  // byte offsets
};

__host__ __device__ inline TcLayout MakeTcLayout(int D, int M) {
  TcLayout t;
  t.ld = D + 8;
  const size_t rows = 16 * M, splits = 8 / M;
  t.kv = 0;
  t.s = t.kv + static_cast<size_t>(kTcStages) * kTcRows * t.ld * 2;
  t.p = t.s + splits * rows * kLdS * 4;
  t.alpha = t.p + rows * kLdP * 2;
  t.l = t.alpha + rows * 4;
  t.m = t.l + rows * 4;
  t.ok = t.m + rows * 4;
  t.bar = (t.ok + kTcStages * kTcRows * 4 + 7) / 8 * 8;
  t.total = t.bar + kTcStages * 8;
  return t;
}

// Warp 0 issues tile `t` of the range into `dst_tile`: lane r owns rows r and r + 32
// (one block-table lookup each), copies each with one bulk copy (the copy engine, not
// the load/store units, so the bytes in flight per SM are not capped by them), or
// zeroes it (past the range / unmapped page: finite zeros, masked by ok[] anyway). The
// stage's mbarrier expects exactly the bytes of the valid rows.
__device__ __forceinline__ void TcIssueTile(const DecodeArgs& a, int64_t n, SplitRange rg, int t,
                                            __nv_bfloat16* dst_tile, int* ok, uint64_t* bar,
                                            int ld, int D, int lane) {
  int64_t phys[2];
  uint32_t nvalid = 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lane + 32 * i;
    const int64_t pos = rg.begin + static_cast<int64_t>(t) * kTcRows + r;
    phys[i] = pos < rg.end ? PhysRow32(a.c, n, static_cast<int>(pos)) : -1;
    ok[r] = phys[i] >= 0;
    if (phys[i] < 0) {
      __nv_bfloat16* dst = dst_tile + r * ld;
      for (int ch = 0; ch < D / 8; ++ch) *reinterpret_cast<uint4*>(dst + ch * 8) = make_uint4(0, 0, 0, 0);
    }
    nvalid += __popc(__ballot_sync(0xffffffffu, phys[i] >= 0));
  }
  const uint32_t row_bytes = static_cast<uint32_t>(D) * 2;
  // Orders this lane's generic accesses of the stage (and, after the CTA barrier the
  // caller passed, everyone's reads of it) before the async-proxy writes.
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncwarp();
  if (lane == 0) MbarExpectTx(bar, nvalid * row_bytes);
  __syncwarp();
  const __nv_bfloat16* pool = static_cast<const __nv_bfloat16*>(a.c.pool);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (phys[i] >= 0) BulkCopy(dst_tile + (lane + 32 * i) * ld, pool + phys[i] * D, row_bytes, bar);
  }
}

// M: 16-head tiles (H <= 16 M); NT: latent = 64 NT (8-column MMA tiles per warp in P.V).
// QK split: warp w owns head tile w % M and the k-steps [kq nk, (kq + 1) nk) with
// kq = w / M, nk = ceil(D / 16 / (8 / M)); its q fragments stay in registers for the
// whole range, so per tile only the cache tile is read from shared memory; the 8 / M
// partial score blocks are summed by the softmax threads.
template <int M, int NT>
__global__ void __launch_bounds__(kTcThreads, 1) MlaDecodeTcKernel(const DecodeArgs a) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kSplitK = 8 / M;
  const int D = a.dl + a.dr;
  const TcLayout L = MakeTcLayout(D, M);
  const int ld = L.ld;
  __nv_bfloat16* sKV = reinterpret_cast<__nv_bfloat16*>(smem + L.kv);
  float* sS = reinterpret_cast<float*>(smem + L.s);  // [kSplitK][16 M][kLdS] partial scores
  __nv_bfloat16* sP = reinterpret_cast<__nv_bfloat16*>(smem + L.p);
  float* sAlpha = reinterpret_cast<float*>(smem + L.alpha);
  float* sL = reinterpret_cast<float*>(smem + L.l);
  float* sM = reinterpret_cast<float*>(smem + L.m);
  int* sOk = reinterpret_cast<int*>(smem + L.ok);
  uint64_t* sBar = reinterpret_cast<uint64_t*>(smem + L.bar);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int s_idx = blockIdx.x, S = a.S, H = a.H;
  const int64_t n = blockIdx.y;
  const SplitRange rg = RangeOf(a.seq_lens[n], S, s_idx);
  const int ntiles = static_cast<int>((rg.end - rg.begin + kTcRows - 1) / kTcRows);
  const int tile_elems = kTcRows * ld;

  // Prologue: barriers, then tile 0 in flight.
  if (tid == 0) {
    for (int i = 0; i < kTcStages; ++i) MbarInit(&sBar[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (warp == 0 && ntiles > 0) TcIssueTile(a, n, rg, 0, sKV, sOk, &sBar[0], ld, D, lane);

  // q fragments (bf16) of this warp's head tile and k-range, straight from global.
  const int mw = warp % M, kq = warp / M;
  const int ksteps = D / 16, nk = (ksteps + kSplitK - 1) / kSplitK;
  const int k0 = kq * nk, kcount = max(0, min(nk, ksteps - k0));
  uint32_t qf[kTcMaxKs][4];
  {
    const int h0 = mw * 16 + g, h1 = h0 + 8;
    const float* q0 = a.q + (n * H + h0) * D + 2 * tq;
    const float* q1 = a.q + (n * H + h1) * D + 2 * tq;
#pragma unroll
    for (int i = 0; i < kTcMaxKs; ++i) {
      float2 x0 = make_float2(0.f, 0.f), x1 = x0, x2 = x0, x3 = x0;
      if (i < kcount && ntiles > 0) {
        const int k = (k0 + i) * 16;
        if (h0 < H) {
          x0 = *reinterpret_cast<const float2*>(q0 + k);
          x2 = *reinterpret_cast<const float2*>(q0 + k + 8);
        }
        if (h1 < H) {
          x1 = *reinterpret_cast<const float2*>(q1 + k);
          x3 = *reinterpret_cast<const float2*>(q1 + k + 8);
        }
      }
      qf[i][0] = PackBf16(x0.x, x0.y);
      qf[i][1] = PackBf16(x1.x, x1.y);
      qf[i][2] = PackBf16(x2.x, x2.y);
      qf[i][3] = PackBf16(x3.x, x3.y);
    }
  }

  // Softmax ownership: TPR threads per head row, CPT columns each (c = part + TPR i).
  constexpr int kTpr = 16 / M, kCpt = kTcRows / kTpr;
  const int srow = tid / kTpr, part = tid % kTpr;
  float m_run = -INFINITY, l_run = 0.0f;  // log2 domain
  const float sl2 = a.scale * kLog2e;

  float o[M][NT][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j) o[m][j][0] = o[m][j][1] = o[m][j][2] = o[m][j][3] = 0.0f;

  // Per tile t: wait for its bytes; barrier; issue tile t+1 (into tile t-1's stage);
  // scores; barrier; softmax; barrier; P.V.
  auto scores = [&](int stage) {  // partial scores over this warp's k-range: [16 heads][64 rows]
    const __nv_bfloat16* kv = sKV + stage * tile_elems;
    float acc[kTcRows / 8][4];
#pragma unroll
    for (int j = 0; j < kTcRows / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    // ldmatrix.x4: matrices (n-tile 2p + lane/16, k-half (lane/8) % 2), rows lane % 8.
    const __nv_bfloat16* kb = kv + ((lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8 + k0 * 16;
#pragma unroll
    for (int i = 0; i < kTcMaxKs; ++i) {
      if (i < kcount) {
#pragma unroll
        for (int pr = 0; pr < kTcRows / 16; ++pr) {  // n-tiles 2 pr, 2 pr + 1
          uint32_t b[4];
          Ldmatrix4(b, kb + pr * 16 * ld + i * 16);
          Mma16816(acc[2 * pr], qf[i], b[0], b[1]);
          Mma16816(acc[2 * pr + 1], qf[i], b[2], b[3]);
        }
      }
    }
    float* sp = sS + (kq * 16 * M + mw * 16 + g) * kLdS + 2 * tq;
#pragma unroll
    for (int j = 0; j < kTcRows / 8; ++j) {
      *reinterpret_cast<float2*>(sp + j * 8) = make_float2(acc[j][0], acc[j][1]);
      *reinterpret_cast<float2*>(sp + 8 * kLdS + j * 8) = make_float2(acc[j][2], acc[j][3]);
    }
  };
  auto softmax = [&](int stage) {  // online softmax (exp2 domain), P in bf16
    const int* ok = sOk + stage * kTcRows;
    float v[kCpt];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kCpt; ++i) {
      const int c = part + kTpr * i;
      float x = 0.0f;
#pragma unroll
      for (int k = 0; k < kSplitK; ++k) x += sS[(k * 16 * M + srow) * kLdS + c];
      v[i] = ok[c] ? x * sl2 : -INFINITY;
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
  };
  auto pv = [&](int stage) {  // O = diag(alpha) O + P V  (warp: latent columns [64 NT warp / 8 ...))
    const __nv_bfloat16* kv = sKV + stage * tile_elems;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float a0 = sAlpha[m * 16 + g], a1 = sAlpha[m * 16 + g + 8];
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
  };
  for (int t = 0; t < ntiles; ++t) {
    const int stage = t % kTcStages;
    MbarWait(&sBar[stage], (t / kTcStages) & 1);  // tile t's bytes have landed
    __syncthreads();  // tile t's zero rows / ok flags visible; every warp is past tile t-1
    if (warp == 0 && t + 1 < ntiles) {  // into tile t-1's stage, free now
      const int ns = (t + 1) % kTcStages;
      TcIssueTile(a, n, rg, t + 1, sKV + ns * tile_elems, sOk + ns * kTcRows, &sBar[ns], ld, D, lane);
    }
    scores(stage);
    __syncthreads();
    softmax(stage);
    __syncthreads();
    pv(stage);
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
      const int h = m * 16 + g + 8 * half;
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
        const int col = (warp * NT + j) * 8 + 2 * tq;
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


int TcHeadTiles(int64_t H) { return H <= 16 ? 1 : 2; }


template <int M, int NT>
cudaError_t LaunchTc(const DecodeArgs& a, int N, cudaStream_t stream) {
  const size_t smem = MakeTcLayout(a.dl + a.dr, M).total;
  static bool attr_set = false;  // idempotent; racing threads set the same value
  if (!attr_set) {
    const cudaError_t err = RaiseSmem(MlaDecodeTcKernel<M, NT>, DeviceSmemOptin());
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  LaunchPdl(MlaDecodeTcKernel<M, NT>, dim3(a.S, N), kTcThreads, smem, stream, a);
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

}  // namespace

namespace {
bool UsesWgmma(const MlaDecodeParams& p) {
  return p.kernel == MlaDecodeParams::Kernel::kAuto && MlaDecodeUsesTensorCores(p) &&
         DecodeWgSupported(p);
}
}  // namespace

const char* MlaDecodeKernelName(const MlaDecodeParams& p) {
  return UsesWgmma(p) ? "wgmma" : MlaDecodeUsesTensorCores(p) ? "mma" : "simt";
}

bool MlaDecodeUsesTensorCores(const MlaDecodeParams& p) {
  const MlaPagedCache& c = p.cache;
  if (c.dtype != DType::kBF16 || p.num_heads < 1 || p.num_heads > 32) return false;
  const int64_t dl = c.latent_dim;
  if (dl != 64 && dl != 128 && dl != 256 && dl != 512) return false;
  if (c.rope_dim < 0 || c.rope_dim % 16 != 0) return false;
  // q fragments in registers: at most kTcMaxKs 16-wide k-steps per warp.
  const int64_t ksteps = (dl + c.rope_dim) / 16, split_k = 8 / TcHeadTiles(p.num_heads);
  if ((ksteps + split_k - 1) / split_k > kTcMaxKs) return false;
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
  if (tc && UsesWgmma(p)) {
    err = LaunchDecodeWg(a, N, stream);
  } else if (tc) {
    err = TcHeadTiles(p.num_heads) == 1 ? LaunchTcM<1>(a, N, stream) : LaunchTcM<2>(a, N, stream);
  } else {
    err = LaunchDecodeSimt(a, N, p.cache.dtype == DType::kF32, stream);
  }
  if (err != cudaSuccess) return CudaStatus(err, "MlaDecodeAttention launch");
  if (S > 1) {
    return CudaStatus(LaunchDecodeCombine(a, N, stream), "MlaDecodeAttention combine launch");
  }
  return absl::OkStatus();
}

}  // namespace kl::cuda
