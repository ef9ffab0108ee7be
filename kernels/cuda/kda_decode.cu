// KDA decode kernels: the fused recurrent step over a slot pool and the
// one-token short conv. Design (README.md):
//  - grid (V / 32 value slices, H, N), block = K threads (K / 32 warps); a slice is
//    contiguous in the pool (kda_state_layout.h), rows of 32 floats;
//  - thread (warp w, lane = 8 * kg + vq) owns the 8 state rows d = 32 w + kg + 4 i
//    (i < 8) of the 4 columns 32 * slice + 4 vq .. + 3: 32 fp32 registers, read
//    with 16-byte loads issued before anything else, written once at the end;
//  - per token: the gate, norms and beta are computed once per block into shared
//    memory; the two reductions over K (S^T k and S^T q) are a 2-step shuffle
//    within the warp plus one shared-memory exchange across warps (3 barriers).
#include <cuda_bf16.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kda_decode.h"
#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/kda_state_layout.h"
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda {
namespace {

using namespace kl::cuda::dev;  // NOLINT

constexpr int kSliceV = 32;    // value columns per block
constexpr int kRowsPerThread = 8;

struct DecodeArgs {
  const void *q, *k, *v, *f, *b;
  const float *a_log, *dt_bias;
  const int64_t* cu_seqlens;
  const int32_t* slots;
  float* state_pool;
  void* o;
  int32_t num_heads, num_slots;
  float scale;
};

template <class T, int K, int V>
__global__ void __launch_bounds__(K) KdaDecodeKernel(const DecodeArgs a) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  constexpr int kWarps = K / 32;
  static_assert(K % 32 == 0 && V % kSliceV == 0, "K, V multiples of 32");
  static_assert(KdaStateSliceWidth(V) == kSliceV, "a block owns one slice of the pool layout");
  constexpr bool kAccurate = sizeof(T) == 4;  // fp32 activations: libm-accurate math

  __shared__ float s_q[K], s_k[K], s_alpha[K];
  __shared__ float s_ssq[kWarps][2];
  __shared__ float4 s_red_r[kWarps][8], s_red_o[kWarps][8];
  __shared__ float s_beta;

  const int H = a.num_heads;
  const int h = blockIdx.y;
  const int64_t n = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int kg = lane >> 3, vq = lane & 7;
  const int col = blockIdx.x * kSliceV + vq * 4;

  int64_t t_begin = n, t_end = n + 1;
  if (a.cu_seqlens != nullptr) {
    t_begin = a.cu_seqlens[n];
    t_end = a.cu_seqlens[n + 1];
  }
  if (t_end <= t_begin) return;  // empty sequence: state untouched
  const int32_t slot = a.slots[n];
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* f = static_cast<const T*>(a.f);
  const T* b = static_cast<const T*>(a.b);
  T* o = static_cast<T*>(a.o);

  if (slot < 0 || slot >= a.num_slots) {  // padding row: zeros out, no state traffic
    if (warp == 0 && kg == 0) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        Store4(o + (t * H + h) * V + col, make_float4(0.f, 0.f, 0.f, 0.f));
      }
    }
    return;
  }

  // State rows first: 8 independent 16-byte loads in flight per thread. The block's
  // slice is contiguous in the pool (kda_state_layout.h): row d at d * kSliceV.
  float* st = a.state_pool + (static_cast<int64_t>(slot) * H + h) * K * V +
              KdaStateOffset(0, blockIdx.x * kSliceV, K, V) + vq * 4;
  float4 s[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    s[i] = *reinterpret_cast<const float4*>(st + (warp * 32 + kg + 4 * i) * kSliceV);
  }

  const float neg_rate = -(kAccurate ? expf(a.a_log[h]) : __expf(a.a_log[h]));
  const float dt_bias = a.dt_bias[h * K + tid];
  const float scale = a.scale;

  for (int64_t t = t_begin; t < t_end; ++t) {
    // ---- per-token scalars: gate, raw q / k, sums of squares, beta ----
    {
      const int64_t base = (t * H + h) * K + tid;
      const float qv = ToF32(q[base]), kv = ToF32(k[base]);
      const float g = neg_rate * Softplus<kAccurate>(ToF32(f[base]) + dt_bias);
      s_q[tid] = qv;
      s_k[tid] = kv;
      s_alpha[tid] = kAccurate ? expf(g) : __expf(g);
      const float sq = WarpSum(qv * qv), sk = WarpSum(kv * kv);
      if (lane == 0) {
        s_ssq[warp][0] = sq;
        s_ssq[warp][1] = sk;
      }
      if (tid == 0) s_beta = Sigmoid<kAccurate>(ToF32(b[t * H + h]));
    }
    __syncthreads();
    float sq = 0.f, sk = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sq += s_ssq[w][0];
      sk += s_ssq[w][1];
    }
    const float inv_q = (kAccurate ? 1.0f / sqrtf(sq + 1e-6f) : rsqrtf(sq + 1e-6f)) * scale;
    const float inv_k = kAccurate ? 1.0f / sqrtf(sk + 1e-6f) : rsqrtf(sk + 1e-6f);

    // ---- decay, then r = S^T k (partial over this thread's rows) ----
    float kk[kRowsPerThread];
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int d = warp * 32 + kg + 4 * i;
      const float al = s_alpha[d];
      kk[i] = s_k[d] * inv_k;
      s[i].x *= al; s[i].y *= al; s[i].z *= al; s[i].w *= al;
      r.x += kk[i] * s[i].x; r.y += kk[i] * s[i].y; r.z += kk[i] * s[i].z; r.w += kk[i] * s[i].w;
    }
#pragma unroll
    for (int off = 8; off <= 16; off <<= 1) {
      r.x += __shfl_xor_sync(0xffffffffu, r.x, off);
      r.y += __shfl_xor_sync(0xffffffffu, r.y, off);
      r.z += __shfl_xor_sync(0xffffffffu, r.z, off);
      r.w += __shfl_xor_sync(0xffffffffu, r.w, off);
    }
    if (kg == 0) s_red_r[warp][vq] = r;
    __syncthreads();
    r = s_red_r[0][vq];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 x = s_red_r[w][vq];
      r.x += x.x; r.y += x.y; r.z += x.z; r.w += x.w;
    }
    // ---- u = beta (v - r); S += k u^T; o = S^T q ----
    const float4 vv = Load4(v + (t * H + h) * V + col);
    const float beta = s_beta;
    const float4 u = make_float4(beta * (vv.x - r.x), beta * (vv.y - r.y), beta * (vv.z - r.z),
                                 beta * (vv.w - r.w));
    float4 op = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float qd = s_q[warp * 32 + kg + 4 * i] * inv_q;
      s[i].x += kk[i] * u.x; s[i].y += kk[i] * u.y; s[i].z += kk[i] * u.z; s[i].w += kk[i] * u.w;
      op.x += qd * s[i].x; op.y += qd * s[i].y; op.z += qd * s[i].z; op.w += qd * s[i].w;
    }
#pragma unroll
    for (int off = 8; off <= 16; off <<= 1) {
      op.x += __shfl_xor_sync(0xffffffffu, op.x, off);
      op.y += __shfl_xor_sync(0xffffffffu, op.y, off);
      op.z += __shfl_xor_sync(0xffffffffu, op.z, off);
      op.w += __shfl_xor_sync(0xffffffffu, op.w, off);
    }
    if (kg == 0) s_red_o[warp][vq] = op;
    __syncthreads();
    if (warp == 0 && kg == 0) {
      float4 out = s_red_o[0][vq];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        const float4 x = s_red_o[w][vq];
        out.x += x.x; out.y += x.y; out.z += x.z; out.w += x.w;
      }
      Store4(o + (t * H + h) * V + col, out);
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    *reinterpret_cast<float4*>(st + (warp * 32 + kg + 4 * i) * kSliceV) = s[i];
  }
}

template <class T>
__global__ void __launch_bounds__(256) ShortConvDecodeKernel(const T* x, const T* w,
                                                             const int32_t* slots, T* tail_pool,
                                                             T* out, int64_t C, int W,
                                                             int32_t num_slots) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  constexpr bool kAccurate = sizeof(T) == 4;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = blockIdx.y;
  if (c >= C) return;
  const int32_t slot = slots[n];
  if (slot < 0 || slot >= num_slots) {
    out[n * C + c] = FromF32<T>(0.0f);
    return;
  }
  T* tail = tail_pool + static_cast<int64_t>(slot) * (W - 1) * C + c;
  float win[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < W - 1) win[j] = ToF32(tail[j * C]);
    else if (j == W - 1) win[j] = ToF32(x[n * C + c]);
  }
  float u = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < W) u += ToF32(w[c * W + j]) * win[j];
  }
  out[n * C + c] = FromF32<T>(u * Sigmoid<kAccurate>(u));
#pragma unroll
  for (int j = 0; j < 7; ++j) {
    if (j < W - 1) tail[j * C] = FromF32<T>(win[j + 1]);
  }
}

bool Aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <class T, int K, int V>
cudaError_t LaunchDecode(const KdaDecodeParams& p, cudaStream_t stream) {
  DecodeArgs a{p.q,       p.k,          p.v,     p.f,
               p.b,       p.a_log,      p.dt_bias, p.cu_seqlens,
               p.slots,   p.state_pool, p.o,     static_cast<int32_t>(p.num_heads),
               static_cast<int32_t>(p.num_slots),
               p.scale != 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(K))};
  const dim3 grid(V / kSliceV, static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.num_seqs));
  LaunchPdl(KdaDecodeKernel<T, K, V>, grid, K, 0, stream, a);
  return cudaGetLastError();
}

template <class T>
cudaError_t DispatchDecode(const KdaDecodeParams& p, cudaStream_t stream) {
  if (p.head_k == 128 && p.head_v == 128) return LaunchDecode<T, 128, 128>(p, stream);
  if (p.head_k == 128 && p.head_v == 64) return LaunchDecode<T, 128, 64>(p, stream);
  if (p.head_k == 64 && p.head_v == 128) return LaunchDecode<T, 64, 128>(p, stream);
  return LaunchDecode<T, 64, 64>(p, stream);
}

}  // namespace

absl::Status KdaRecurrentDecode(const KdaDecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_seqs > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("num_seqs out of [0, 65535]: ", p.num_seqs));
  }
  if (p.num_seqs == 0) return absl::OkStatus();
  if (p.num_heads < 1 || p.num_heads > 65535) return absl::InvalidArgumentError("num_heads");
  if ((p.head_k != 64 && p.head_k != 128) || (p.head_v != 64 && p.head_v != 128)) {
    return absl::InvalidArgumentError(
        absl::StrCat("head dims must be 64 or 128: K=", p.head_k, " V=", p.head_v));
  }
  if (p.act != DType::kF32 && p.act != DType::kBF16) {
    return absl::InvalidArgumentError("act dtype must be kF32 or kBF16");
  }
  if (p.cu_seqlens == nullptr && p.num_tokens != p.num_seqs) {
    return absl::InvalidArgumentError("num_tokens must equal num_seqs without cu_seqlens");
  }
  if (p.num_slots < 1 || p.num_slots > INT32_MAX) return absl::InvalidArgumentError("num_slots");
  if (!p.q || !p.k || !p.v || !p.f || !p.b || !p.a_log || !p.dt_bias || !p.slots ||
      !p.state_pool || !p.o) {
    return absl::InvalidArgumentError("null tensor pointer");
  }
  const int vec = p.act == DType::kF32 ? 16 : 8;
  if (!Aligned(p.v, vec) || !Aligned(p.o, vec) || !Aligned(p.state_pool, 16)) {
    return absl::InvalidArgumentError("v / o / state_pool misaligned");
  }
  const cudaError_t err = p.act == DType::kF32 ? DispatchDecode<float>(p, stream)
                                               : DispatchDecode<__nv_bfloat16>(p, stream);
  return CudaStatus(err, "KdaRecurrentDecode launch");
}

absl::Status ShortConvDecode(const ShortConvDecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_seqs > 65535) return absl::InvalidArgumentError("num_seqs");
  if (p.num_seqs == 0 || p.channels == 0) return absl::OkStatus();
  if (p.channels < 0 || p.width < 1 || p.width > 8) {
    return absl::InvalidArgumentError(absl::StrCat("channels / width (1..8): ", p.width));
  }
  if (p.act != DType::kF32 && p.act != DType::kBF16) {
    return absl::InvalidArgumentError("act dtype must be kF32 or kBF16");
  }
  if (p.num_slots < 1 || p.num_slots > INT32_MAX) return absl::InvalidArgumentError("num_slots");
  if (!p.x || !p.w || !p.slots || !p.out || (p.width > 1 && !p.tail_pool)) {
    return absl::InvalidArgumentError("null tensor pointer");
  }
  const dim3 grid(static_cast<unsigned>((p.channels + 255) / 256),
                  static_cast<unsigned>(p.num_seqs));
  const int W = static_cast<int>(p.width);
  const int32_t slots = static_cast<int32_t>(p.num_slots);
  if (p.act == DType::kF32) {
    LaunchPdl(ShortConvDecodeKernel<float>, grid, 256, 0, stream, static_cast<const float*>(p.x),
              static_cast<const float*>(p.w), p.slots, static_cast<float*>(p.tail_pool),
              static_cast<float*>(p.out), p.channels, W, slots);
  } else {
    LaunchPdl(ShortConvDecodeKernel<__nv_bfloat16>, grid, 256, 0, stream,
              static_cast<const __nv_bfloat16*>(p.x), static_cast<const __nv_bfloat16*>(p.w),
              p.slots, static_cast<__nv_bfloat16*>(p.tail_pool), static_cast<__nv_bfloat16*>(p.out),
              p.channels, W, slots);
  }
  return CudaStatus(cudaGetLastError(), "ShortConvDecode launch");
}

}  // namespace kl::cuda
