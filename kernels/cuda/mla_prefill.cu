// MLA prefill attention, naive form (per-head k / v materialised by the caller):
// causal varlen flash attention with a prefix, exact fp32 (FFMA + libm expf, no
// tensor cores). Design:
//  - one CTA (128 threads) per (32-query tile of one sequence, head); the tile list
//    is implicit: CTA x walks q_cu_seqlens (device) to find its (sequence, tile), the
//    grid being sized by the host upper bound ceil(num_q / 32) + N. Within a sequence
//    the last (longest) tiles get the lowest CTA ids so they start first.
//  - thread t owns query row r = t / 4 of the tile and, within it, kv columns
//    j + 4 i (i < 8) of each 32-row kv tile for the scores, and value columns
//    16 i + 4 j .. + 3 for the output accumulator (registers);
//  - per kv tile: K and V tiles (zero-padded) in shared memory, scores from 16-byte
//    shared loads, online softmax in registers (row max / sum over the 4 lanes of a
//    row by shuffles), P through shared memory to the P.V product.
// Shared row strides are chosen so the 16-byte loads of a quarter warp hit distinct
// banks (qk stride in 16-byte units odd).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/mla.h"

namespace kl::cuda {
namespace {

constexpr int kBq = 32;       // query rows per CTA
constexpr int kBk = 32;       // kv rows per tile
constexpr int kThreads = 128;
constexpr int kLdP = kBk + 4;  // P row stride (floats): 4 r + j distinct banks
constexpr int kMaxDim = 256;

struct PrefillGeom {
  int dq, dv;    // true dims
  int dq4;       // dq rounded up to 4 (zero padded)
  int ldq;       // q / k row stride in floats: 4 * odd
  int ldv;       // v row stride: dv rounded up to 16 (zero padded)
};

inline PrefillGeom MakeGeom(int dq, int dv) {
  PrefillGeom g;
  g.dq = dq;
  g.dv = dv;
  g.dq4 = (dq + 3) / 4 * 4;
  g.ldq = 4 * ((g.dq4 / 4) | 1);
  g.ldv = (dv + 15) / 16 * 16;
  return g;
}

inline size_t SmemBytes(const PrefillGeom& g) {
  return sizeof(float) * (2 * kBq * g.ldq + kBk * g.ldv + kBq * kLdP);
}

struct PrefillArgs {
  const float *q, *k, *v;
  const int64_t *q_cu, *kv_cu;
  float* out;
  int64_t num_seqs;
  int H;
  PrefillGeom g;
  float scale;
};

// Zero-padded copy of `rows` rows (of `dim` floats, global row stride `gstride`) into
// a [kB][ld] shared tile; rows >= valid are zeros.
__device__ __forceinline__ void LoadTile(float* s, int ld, int dim_pad, const float* g,
                                         int64_t gstride, int dim, int valid, int tid) {
  for (int idx = tid; idx < kBk * dim_pad; idx += kThreads) {
    const int r = idx / dim_pad, d = idx - r * dim_pad;
    s[r * ld + d] = (r < valid && d < dim) ? g[r * gstride + d] : 0.0f;
  }
}

// kVq: 16-byte value-column groups per thread (4 * kVq * 4 >= ldv).
template <int kVq>
__global__ void __launch_bounds__(kThreads) MlaPrefillKernel(const PrefillArgs a) {
  extern __shared__ float4 smem4[];
  float* sQ = reinterpret_cast<float*>(smem4);
  float* sK = sQ + kBq * a.g.ldq;
  float* sV = sK + kBk * a.g.ldq;
  float* sP = sV + kBk * a.g.ldv;
  __shared__ int64_t s_info[4];  // seq, tile, q_start, kv_start

  const int tid = threadIdx.x, r = tid / 4, j = tid % 4;
  const int h = blockIdx.y, H = a.H;
  const PrefillGeom g = a.g;

  if (tid == 0) {  // which (sequence, tile) this CTA is
    int64_t acc = 0, seq = -1, tile = 0;
    for (int64_t n = 0; n < a.num_seqs; ++n) {
      const int64_t qlen = a.q_cu[n + 1] - a.q_cu[n];
      const int64_t tiles = qlen > 0 ? (qlen + kBq - 1) / kBq : 0;
      if (static_cast<int64_t>(blockIdx.x) < acc + tiles) {
        seq = n;
        tile = tiles - 1 - (blockIdx.x - acc);  // longest tiles first
        break;
      }
      acc += tiles;
    }
    s_info[0] = seq;
    s_info[1] = tile;
  }
  __syncthreads();
  const int64_t n = s_info[0];
  if (n < 0) return;  // beyond the real tile count (the grid is an upper bound)
  const int64_t q_start = a.q_cu[n], q_len = a.q_cu[n + 1] - q_start;
  const int64_t kv_start = a.kv_cu[n], kv_len = a.kv_cu[n + 1] - kv_start;
  const int64_t q0 = s_info[1] * kBq;
  const int q_rows = static_cast<int>(q_len - q0 < kBq ? q_len - q0 : kBq);
  // Absolute position of this thread's query row (-1: not a real row; sees nothing).
  const int64_t pos = r < q_rows ? kv_len - q_len + q0 + r : -1;
  // Highest position in the tile: kv rows [0, hi) are needed.
  const int64_t hi_pos = kv_len - q_len + q0 + q_rows - 1;
  const int64_t kv_hi = hi_pos + 1 < kv_len ? hi_pos + 1 : kv_len;

  const int64_t row_q = static_cast<int64_t>(H) * g.dq, row_v = static_cast<int64_t>(H) * g.dv;
  LoadTile(sQ, g.ldq, g.dq4, a.q + (q_start + q0) * row_q + h * g.dq, row_q, g.dq, q_rows, tid);

  float acc[kVq][4];
#pragma unroll
  for (int i = 0; i < kVq; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int nq4 = g.dq4 / 4;

  for (int64_t kt = 0; kt < kv_hi; kt += kBk) {
    const int kv_rows = static_cast<int>(kv_hi - kt < kBk ? kv_hi - kt : kBk);
    __syncthreads();  // previous tile's K / V / P reads are done
    LoadTile(sK, g.ldq, g.dq4, a.k + (kv_start + kt) * row_q + h * g.dq, row_q, g.dq, kv_rows, tid);
    LoadTile(sV, g.ldv, g.ldv, a.v + (kv_start + kt) * row_v + h * g.dv, row_v, g.dv, kv_rows, tid);
    __syncthreads();

    float s[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i] = 0.0f;
    const float4* q4 = reinterpret_cast<const float4*>(sQ + r * g.ldq);
    for (int d = 0; d < nq4; ++d) {
      const float4 qv = q4[d];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float4 kv = reinterpret_cast<const float4*>(sK + (j + 4 * i) * g.ldq)[d];
        s[i] = fmaf(qv.x, kv.x, s[i]);
        s[i] = fmaf(qv.y, kv.y, s[i]);
        s[i] = fmaf(qv.z, kv.z, s[i]);
        s[i] = fmaf(qv.w, kv.w, s[i]);
      }
    }
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t c = kt + j + 4 * i;
      s[i] = (c <= pos && j + 4 * i < kv_rows) ? s[i] * a.scale : -INFINITY;
      mx = fmaxf(mx, s[i]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    // m_new == -inf: nothing visible yet; p = 0 keeps acc and l at 0.
    const float alpha = m_new == -INFINITY ? 1.0f : expf(m - m_new);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float p = s[i] == -INFINITY ? 0.0f : expf(s[i] - m_new);
      sP[r * kLdP + j + 4 * i] = p;
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    l = l * alpha + sum;
    m = m_new;
    __syncwarp();  // row r's P is written by the 4 lanes of this warp that own row r

#pragma unroll
    for (int i = 0; i < kVq; ++i) {
      acc[i][0] *= alpha; acc[i][1] *= alpha; acc[i][2] *= alpha; acc[i][3] *= alpha;
    }
    for (int c = 0; c < kv_rows; ++c) {
      const float p = sP[r * kLdP + c];
      const float4* v4 = reinterpret_cast<const float4*>(sV + c * g.ldv);
#pragma unroll
      for (int i = 0; i < kVq; ++i) {
        if (16 * i < g.ldv) {
          const float4 vv = v4[4 * i + j];
          acc[i][0] = fmaf(p, vv.x, acc[i][0]);
          acc[i][1] = fmaf(p, vv.y, acc[i][1]);
          acc[i][2] = fmaf(p, vv.z, acc[i][2]);
          acc[i][3] = fmaf(p, vv.w, acc[i][3]);
        }
      }
    }
  }

  if (r >= q_rows) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no visible key: zeros
  float* o = a.out + (q_start + q0 + r) * row_v + h * g.dv;
#pragma unroll
  for (int i = 0; i < kVq; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = 16 * i + 4 * j + e;
      if (col < g.dv) o[col] = acc[i][e] * inv;
    }
  }
}

template <int kVq>
cudaError_t Launch(const PrefillArgs& a, int64_t num_q, cudaStream_t stream) {
  static bool attr_set = false;  // idempotent; racing threads set the same value
  if (!attr_set) {
    const cudaError_t err =
        cudaFuncSetAttribute(MlaPrefillKernel<kVq>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(SmemBytes(MakeGeom(kMaxDim, kMaxDim))));
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  const dim3 grid(static_cast<unsigned>((num_q + kBq - 1) / kBq + a.num_seqs),
                  static_cast<unsigned>(a.H));
  MlaPrefillKernel<kVq><<<grid, kThreads, SmemBytes(a.g), stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

absl::Status MlaPrefillAttention(const MlaPrefillParams& p, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_q < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("MlaPrefillAttention: num_seqs=", p.num_seqs, " num_q=", p.num_q));
  }
  if (p.num_seqs == 0 || p.num_q == 0) return absl::OkStatus();
  if (p.num_heads < 1 || p.num_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("MlaPrefillAttention: num_heads=", p.num_heads));
  }
  if (p.qk_dim < 1 || p.qk_dim > kMaxDim || p.v_dim < 1 || p.v_dim > kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MlaPrefillAttention: qk_dim / v_dim must be in [1, 256]: ", p.qk_dim, " / ", p.v_dim));
  }
  if (p.num_q / kBq + p.num_seqs >= INT32_MAX) {
    return absl::InvalidArgumentError("MlaPrefillAttention: too many query tiles");
  }
  if (!p.q || !p.k || !p.v || !p.q_cu_seqlens || !p.kv_cu_seqlens || !p.out) {
    return absl::InvalidArgumentError("MlaPrefillAttention: null tensor pointer");
  }
  PrefillArgs a{p.q, p.k, p.v, p.q_cu_seqlens, p.kv_cu_seqlens, p.out, p.num_seqs,
                static_cast<int>(p.num_heads),
                MakeGeom(static_cast<int>(p.qk_dim), static_cast<int>(p.v_dim)),
                p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(p.qk_dim))};
  cudaError_t err;
  if (a.g.ldv <= 64) {
    err = Launch<4>(a, p.num_q, stream);
  } else if (a.g.ldv <= 128) {
    err = Launch<8>(a, p.num_q, stream);
  } else {
    err = Launch<16>(a, p.num_q, stream);
  }
  return CudaStatus(err, "MlaPrefillAttention launch");
}

}  // namespace kl::cuda
