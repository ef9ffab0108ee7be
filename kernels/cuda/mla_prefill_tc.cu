// MLA prefill attention on bf16 tensor cores (mma.sync m16n8k16, fp32 accumulate):
// the same causal varlen attention with a prefix as mla_prefill.cu, for the head
// shapes of real configs (qk 192 / v 128, and 96 / 64). Inputs stay fp32 in global
// memory (what the backend holds) and are rounded to bf16 on their way into
// registers / shared memory; softmax and the output accumulate in fp32.
//
// Design (FlashAttention-2 style):
//  - one CTA (4 warps) per (64-query tile of one sequence, head); CTA x walks
//    q_cu_seqlens to find its (sequence, tile) — the grid is sized by the host upper
//    bound ceil(num_q / 64) + N and surplus CTAs exit;
//  - each warp owns 16 query rows: their Q fragments (A operands) live in registers
//    for the whole kernel;
//  - per 64-row kv tile: K (row-major) and V (transposed, so the P·V B operand is one
//    32-bit load) in shared memory as bf16; S = Q·Kᵀ in registers, causal mask, online
//    softmax in the base-2 domain, P re-packed from the S accumulators as the A operand
//    of P·V (no shared-memory round trip);
//  - tiles wholly above the diagonal are never loaded.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/mla.h"

namespace kl::cuda {
namespace {

constexpr int kBq = 64;  // query rows per CTA (16 per warp)
constexpr int kBk = 64;  // kv rows per tile
constexpr int kThreads = 128;
constexpr int kPad = 8;  // bf16 elements of row padding in shared memory (16 bytes)

struct TcArgs {
  const float *q, *k, *v;
  const int64_t *q_cu, *kv_cu;
  float* out;
  int64_t num_seqs;
  int H;
  float scale_log2;  // softmax scale * log2(e)
};

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int QK, int VD>
__global__ void __launch_bounds__(kThreads) MlaPrefillTcKernel(const TcArgs a) {
  static_assert(QK % 16 == 0 && VD % 16 == 0, "dims must be multiples of 16");
  constexpr int kLdK = QK + kPad, kLdV = kBk + kPad;
  __shared__ __align__(16) __nv_bfloat16 sK[kBk * kLdK];
  __shared__ __align__(16) __nv_bfloat16 sVt[VD * kLdV];

  // (sequence, q tile) of this CTA.
  int64_t x = blockIdx.x, seq = -1, tile = 0;
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t qlen = a.q_cu[s + 1] - a.q_cu[s];
    const int64_t tiles = (qlen + kBq - 1) / kBq;
    if (x < tiles) {
      seq = s;
      tile = tiles - 1 - x;  // the longest (last) tiles start first
      break;
    }
    x -= tiles;
  }
  if (seq < 0) return;
  const int h = blockIdx.y, H = a.H;
  const int64_t q_begin = a.q_cu[seq], q_len = a.q_cu[seq + 1] - q_begin;
  const int64_t kv_begin = a.kv_cu[seq], kv_len = a.kv_cu[seq + 1] - kv_begin;
  const int64_t offset = kv_len - q_len;  // absolute position of query row 0
  const int64_t q0 = tile * kBq;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two query rows

  // Q fragments (rows r0 / r1 of this warp's 16), bf16, for every 16-wide k step.
  uint32_t qa[QK / 16][4];
  {
    const float* q_r0 = a.q + ((q_begin + r0) * H + h) * QK;
    const float* q_r1 = a.q + ((q_begin + r1) * H + h) * QK;
    const bool v0 = r0 < q_len, v1 = r1 < q_len;
#pragma unroll
    for (int kk = 0; kk < QK / 16; ++kk) {
      const int c = kk * 16 + t4 * 2;
      const float2 z = make_float2(0.0f, 0.0f);
      const float2 x00 = v0 ? *reinterpret_cast<const float2*>(q_r0 + c) : z;
      const float2 x10 = v1 ? *reinterpret_cast<const float2*>(q_r1 + c) : z;
      const float2 x01 = v0 ? *reinterpret_cast<const float2*>(q_r0 + c + 8) : z;
      const float2 x11 = v1 ? *reinterpret_cast<const float2*>(q_r1 + c + 8) : z;
      qa[kk][0] = PackBf16(x00.x, x00.y);
      qa[kk][1] = PackBf16(x10.x, x10.y);
      qa[kk][2] = PackBf16(x01.x, x01.y);
      qa[kk][3] = PackBf16(x11.x, x11.y);
    }
  }

  float o[VD / 8][4];
#pragma unroll
  for (int i = 0; i < VD / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  const int64_t pos0 = offset + r0, pos1 = offset + r1;  // absolute positions
  // Last kv row any query of this CTA may see.
  const int64_t last_row = offset + (q0 + kBq < q_len ? q0 + kBq : q_len) - 1;
  const int64_t n_tiles = last_row / kBk + 1;

  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t j0 = t * kBk;
    const int64_t valid = kv_len - j0 < kBk ? kv_len - j0 : kBk;
    __syncthreads();  // the previous tile's readers are done
    // K tile [kBk][QK] and V tile transposed [VD][kBk], bf16, zero beyond kv_len.
    for (int idx = tid; idx < kBk * (QK / 2); idx += kThreads) {
      const int r = idx / (QK / 2), c = (idx - r * (QK / 2)) * 2;
      float2 val = make_float2(0.0f, 0.0f);
      if (r < valid) {
        val = *reinterpret_cast<const float2*>(a.k + ((kv_begin + j0 + r) * H + h) * QK + c);
      }
      *reinterpret_cast<uint32_t*>(&sK[r * kLdK + c]) = PackBf16(val.x, val.y);
    }
    for (int idx = tid; idx < kBk * VD; idx += kThreads) {
      const int r = idx / VD, d = idx - r * VD;
      const float val = r < valid ? a.v[((kv_begin + j0 + r) * H + h) * VD + d] : 0.0f;
      sVt[d * kLdV + r] = __float2bfloat16_rn(val);
    }
    __syncthreads();

    // S = Q·Kᵀ for this warp's 16 rows x 64 kv columns.
    float s[kBk / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      const __nv_bfloat16* krow = sK + (nt * 8 + g) * kLdK + t4 * 2;
#pragma unroll
      for (int kk = 0; kk < QK / 16; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kk * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kk * 16 + 8);
        Mma(s[nt], qa[kk], b0, b1);
      }
    }
    // Causal mask + scale (base 2), row maxima.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + nt * 8 + t4 * 2 + (e & 1);
        const int64_t pos = e < 2 ? pos0 : pos1;
        const float v = (j < kv_len && j <= pos) ? s[nt][e] * a.scale_log2 : -INFINITY;
        s[nt][e] = v;
        if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // Rows that have seen no key yet keep m = -inf: nothing to rescale, p = 0.
    const float al0 = mn0 == -INFINITY ? 1.0f : exp2f(m0 - mn0);
    const float al1 = mn1 == -INFINITY ? 1.0f : exp2f(m1 - mn1);
    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float mref = e < 2 ? mn0 : mn1;
        const float p = s[nt][e] == -INFINITY ? 0.0f : exp2f(s[nt][e] - mref);
        s[nt][e] = p;
        if (e < 2) rs0 += p; else rs1 += p;
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      rs0 += __shfl_xor_sync(0xffffffffu, rs0, off);
      rs1 += __shfl_xor_sync(0xffffffffu, rs1, off);
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
    m0 = mn0;
    m1 = mn1;
#pragma unroll
    for (int vt = 0; vt < VD / 8; ++vt) {
      o[vt][0] *= al0;
      o[vt][1] *= al0;
      o[vt][2] *= al1;
      o[vt][3] *= al1;
    }
    // O += P·V: the S accumulators of n-tiles 2k, 2k+1 are the A fragment of k step k.
#pragma unroll
    for (int kk = 0; kk < kBk / 16; ++kk) {
      const uint32_t pa[4] = {PackBf16(s[2 * kk][0], s[2 * kk][1]),
                              PackBf16(s[2 * kk][2], s[2 * kk][3]),
                              PackBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              PackBf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int vt = 0; vt < VD / 8; ++vt) {
        const __nv_bfloat16* vrow = sVt + (vt * 8 + g) * kLdV + kk * 16 + t4 * 2;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(vrow);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(vrow + 8);
        Mma(o[vt], pa, b0, b1);
      }
    }
  }

  const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  if (r0 < q_len) {
    float* out = a.out + ((q_begin + r0) * H + h) * VD + t4 * 2;
#pragma unroll
    for (int vt = 0; vt < VD / 8; ++vt) {
      *reinterpret_cast<float2*>(out + vt * 8) = make_float2(o[vt][0] * inv0, o[vt][1] * inv0);
    }
  }
  if (r1 < q_len) {
    float* out = a.out + ((q_begin + r1) * H + h) * VD + t4 * 2;
#pragma unroll
    for (int vt = 0; vt < VD / 8; ++vt) {
      *reinterpret_cast<float2*>(out + vt * 8) = make_float2(o[vt][2] * inv1, o[vt][3] * inv1);
    }
  }
}

template <int QK, int VD>
cudaError_t Launch(const MlaPrefillParams& p, float scale, cudaStream_t stream) {
  TcArgs a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.q_cu = p.q_cu_seqlens;
  a.kv_cu = p.kv_cu_seqlens;
  a.out = p.out;
  a.num_seqs = p.num_seqs;
  a.H = static_cast<int>(p.num_heads);
  a.scale_log2 = scale * 1.4426950408889634f;
  const int64_t ctas = (p.num_q + kBq - 1) / kBq + p.num_seqs;
  MlaPrefillTcKernel<QK, VD><<<dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(p.num_heads)),
                               kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool MlaPrefillUsesTensorCores(const MlaPrefillParams& p) {
  return (p.qk_dim == 192 && p.v_dim == 128) || (p.qk_dim == 96 && p.v_dim == 64);
}

absl::Status MlaPrefillAttentionBf16(const MlaPrefillParams& p, cudaStream_t stream) {
  if (!MlaPrefillUsesTensorCores(p)) {
    return absl::InvalidArgumentError(absl::StrCat("MlaPrefillAttentionBf16: no tensor-core path for qk ",
                                                   p.qk_dim, " / v ", p.v_dim));
  }
  if (p.num_seqs < 0 || p.num_q < 0 || p.num_heads < 1 || p.num_heads > 65535) {
    return absl::InvalidArgumentError("MlaPrefillAttentionBf16: bad shape");
  }
  if (p.num_seqs == 0 || p.num_q == 0) return absl::OkStatus();
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.q_cu_seqlens == nullptr ||
      p.kv_cu_seqlens == nullptr || p.out == nullptr) {
    return absl::InvalidArgumentError("MlaPrefillAttentionBf16: null tensor pointer");
  }
  const int64_t ctas = (p.num_q + kBq - 1) / kBq + p.num_seqs;
  if (ctas > 0x7fffffff) return absl::InvalidArgumentError("MlaPrefillAttentionBf16: too many tiles");
  const float scale =
      p.scale != 0.0f ? p.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.qk_dim)));
  const cudaError_t err = p.qk_dim == 192 ? Launch<192, 128>(p, scale, stream)
                                          : Launch<96, 64>(p, scale, stream);
  return CudaStatus(err, "MlaPrefillAttentionBf16 launch");
}

}  // namespace kl::cuda
