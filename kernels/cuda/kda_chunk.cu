// Chunked KDA prefill: the launcher (validation, algorithm choice) and the exact
// fp32 SIMT path. The tensor-core path is in kda_chunk_tc.cu.
//
// Exact path: grid (ceil(V / 32), H, N), 256 threads, one CTA walks the chunks of
// one (sequence, head, 32-column value slice) with the state slice [K][32] in
// shared memory. Per chunk (same algebra as the CPU oracle, kda_chunk.cc):
//   G = cumsum g (natural log, fp32), L2-normalised q, k;
//   Lm[r][j] = sum_d k_r k_j exp(G_r - G_j) (j < r), A[r][j] = sum_d q_r k_j exp(..) (j <= r)
//   R = V - (K o Gamma) S,  QS = (Q o Gamma) S
//   Vt: forward substitution Vt_r = beta_r (R_r - sum_{j<r} Lm[r][j] Vt_j)
//   O = QS + A Vt,  S = diag(exp G_last) S + (K o exp(G_last - G))^T Vt
// All math fp32 with libm-accurate exp; no tensor cores.
#include <cuda_bf16.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kda_chunk.h"
#include "kernels/cuda/kda_chunk_internal.h"
#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/kda_state_layout.h"

namespace kl::cuda {
namespace internal {
namespace {

using namespace kl::cuda::dev;  // NOLINT

constexpr int kC = kChunk;
constexpr int kKMax = 128;
constexpr int kSlice = 32;
constexpr int kThreads = 256;
constexpr int kLdK = kKMax + 1;   // row stride of the [64][K] tiles
constexpr int kLdS = kSlice + 1;  // row stride of the [*][32] tiles
constexpr int kLdC = kC + 1;      // row stride of the [64][64] tiles
// Shared memory (floats).
constexpr int kOffQ = 0;
constexpr int kOffK = kOffQ + kC * kLdK;
constexpr int kOffG = kOffK + kC * kLdK;
constexpr int kOffV = kOffG + kC * kLdK;
constexpr int kOffS = kOffV + kC * kLdS;
constexpr int kOffL = kOffS + kKMax * kLdS;
constexpr int kOffA = kOffL + kC * kLdC;
constexpr int kOffR = kOffA + kC * kLdC;
constexpr int kOffQS = kOffR + kC * kLdS;
constexpr int kOffBeta = kOffQS + kC * kLdS;
constexpr int kOffGn = kOffBeta + kC;
constexpr int kExactSmemBytes = (kOffGn + kKMax) * 4;  // 175,360

struct ExactArgs {
  const void *q, *k, *v, *f, *b;
  const float *a_log, *dt_bias;
  const int64_t* cu;
  const int32_t* slots;
  float* state_pool;
  void* o;
  int H, K, V, num_slots;
  float scale;
};

template <class T>
__global__ void __launch_bounds__(kThreads, 1) KdaChunkExactKernel(const ExactArgs a) {
  extern __shared__ float sm[];
  float *sQ = sm + kOffQ, *sK = sm + kOffK, *sG = sm + kOffG, *sV = sm + kOffV;
  float *sS = sm + kOffS, *sL = sm + kOffL, *sA = sm + kOffA, *sR = sm + kOffR;
  float *sQS = sm + kOffQS, *sBeta = sm + kOffBeta, *sGn = sm + kOffGn;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* f = static_cast<const T*>(a.f);
  const T* b = static_cast<const T*>(a.b);
  T* o = static_cast<T*>(a.o);
  const int H = a.H, K = a.K, V = a.V;
  const int h = blockIdx.y, n = blockIdx.z, v0 = blockIdx.x * kSlice;
  const int vn = min(kSlice, V - v0);
  const int64_t t_begin = a.cu[n], t_end = a.cu[n + 1];
  if (t_end <= t_begin) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int32_t slot = a.slots[n];
  const bool has_state = slot >= 0 && slot < a.num_slots;
  float* state = has_state ? a.state_pool + (static_cast<int64_t>(slot) * H + h) * K * V : nullptr;

  for (int i = tid; i < kKMax * kSlice; i += kThreads) {
    const int d = i / kSlice, c = i % kSlice;
    sS[d * kLdS + c] = (has_state && d < K && c < vn) ? state[KdaStateOffset(d, v0 + c, K, V)] : 0.0f;
  }
  const float neg_rate = -expf(a.a_log[h]);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kC) {
    const int nr = static_cast<int>(t_end - t0 < kC ? t_end - t0 : kC);
    // ---- load q, k, v; gate + cumsum; beta ----
    for (int i = tid; i < kC * K; i += kThreads) {
      const int r = i / K, d = i % K;
      const bool in = r < nr;
      sQ[r * kLdK + d] = in ? ToF32(q[((t0 + r) * H + h) * K + d]) : 0.0f;
      sK[r * kLdK + d] = in ? ToF32(k[((t0 + r) * H + h) * K + d]) : 0.0f;
    }
    for (int i = tid; i < kC * kSlice; i += kThreads) {
      const int r = i / kSlice, c = i % kSlice;
      sV[r * kLdS + c] = (r < nr && c < vn) ? ToF32(v[((t0 + r) * H + h) * V + v0 + c]) : 0.0f;
    }
    if (tid < K) {
      const float dtb = a.dt_bias[h * K + tid];
      float acc = 0.0f;
      for (int r = 0; r < kC; ++r) {
        if (r < nr) acc += neg_rate * Softplus<true>(ToF32(f[(t0 + r) * H * K + h * K + tid]) + dtb);
        sG[r * kLdK + tid] = acc;
      }
    }
    if (tid < kC) sBeta[tid] = tid < nr ? Sigmoid<true>(ToF32(b[(t0 + tid) * H + h])) : 0.0f;
    __syncthreads();
    // ---- L2 norms (warp per row) ----
    for (int r = warp; r < 2 * kC; r += kThreads / 32) {
      float* row = r < kC ? sQ + r * kLdK : sK + (r - kC) * kLdK;
      float ss = 0.0f;
      for (int d = lane; d < K; d += 32) ss += row[d] * row[d];
      ss = WarpSum(ss);
      const float inv = (1.0f / sqrtf(ss + 1e-6f)) * (r < kC ? a.scale : 1.0f);
      for (int d = lane; d < K; d += 32) row[d] *= inv;
    }
    __syncthreads();
    // ---- Lm, A over pairs j <= r < nr ----
    const int npairs = nr * (nr + 1) / 2;
    for (int p = tid; p < npairs; p += kThreads) {
      int r = static_cast<int>((sqrtf(8.0f * p + 1.0f) - 1.0f) * 0.5f);
      while ((r + 1) * (r + 2) / 2 <= p) ++r;
      while (r * (r + 1) / 2 > p) --r;
      const int j = p - r * (r + 1) / 2;
      const float *gr = sG + r * kLdK, *gj = sG + j * kLdK;
      const float *kr = sK + r * kLdK, *kj = sK + j * kLdK, *qr = sQ + r * kLdK;
      float sl = 0.0f, sa = 0.0f;
      for (int d = 0; d < K; ++d) {
        const float e = kj[d] * expf(gr[d] - gj[d]);
        sl += kr[d] * e;
        sa += qr[d] * e;
      }
      sL[r * kLdC + j] = sl;
      sA[r * kLdC + j] = sa;
    }
    if (tid < K) sGn[tid] = sG[(nr - 1) * kLdK + tid];
    __syncthreads();
    // ---- Q <- Q o Gamma, K <- K o Gamma, G <- K o exp(G_last - G) ----
    for (int i = tid; i < nr * K; i += kThreads) {
      const int r = i / K, d = i % K;
      const float gv = sG[r * kLdK + d], kv = sK[r * kLdK + d];
      const float gam = expf(gv);
      sQ[r * kLdK + d] *= gam;
      sK[r * kLdK + d] = kv * gam;
      sG[r * kLdK + d] = kv * expf(sGn[d] - gv);
    }
    __syncthreads();
    // ---- R = V - (K o Gamma) S, QS = (Q o Gamma) S ----
    for (int i = tid; i < nr * kSlice; i += kThreads) {
      const int r = i / kSlice, c = i % kSlice;
      float rk = 0.0f, rq = 0.0f;
      for (int d = 0; d < K; ++d) {
        const float sv = sS[d * kLdS + c];
        rk += sK[r * kLdK + d] * sv;
        rq += sQ[r * kLdK + d] * sv;
      }
      sR[r * kLdS + c] = sV[r * kLdS + c] - rk;
      sQS[r * kLdS + c] = rq;
    }
    __syncthreads();
    // ---- forward substitution (one warp, lane = column) ----
    if (warp == 0) {
      for (int r = 0; r < nr; ++r) {
        float x = sR[r * kLdS + lane];
        for (int j = 0; j < r; ++j) x -= sL[r * kLdC + j] * sR[j * kLdS + lane];
        sR[r * kLdS + lane] = sBeta[r] * x;
      }
    }
    __syncthreads();
    // ---- O = QS + A Vt; S = diag(exp G_last) S + Kh^T Vt ----
    for (int i = tid; i < nr * kSlice; i += kThreads) {
      const int r = i / kSlice, c = i % kSlice;
      float acc = sQS[r * kLdS + c];
      for (int j = 0; j <= r; ++j) acc += sA[r * kLdC + j] * sR[j * kLdS + c];
      if (c < vn) o[((t0 + r) * H + h) * V + v0 + c] = FromF32<T>(acc);
    }
    for (int i = tid; i < K * kSlice; i += kThreads) {
      const int d = i / kSlice, c = i % kSlice;
      float acc = expf(sGn[d]) * sS[d * kLdS + c];
      for (int j = 0; j < nr; ++j) acc += sG[j * kLdK + d] * sR[j * kLdS + c];
      sS[d * kLdS + c] = acc;
    }
    __syncthreads();
  }
  if (has_state) {
    for (int i = tid; i < K * kSlice; i += kThreads) {
      const int d = i / kSlice, c = i % kSlice;
      if (c < vn) state[KdaStateOffset(d, v0 + c, K, V)] = sS[d * kLdS + c];
    }
  }
}

template <class T>
cudaError_t LaunchExactT(const KdaChunkParams& p, cudaStream_t stream) {
  static bool attr_set = false;
  if (!attr_set) {
    const cudaError_t err = cudaFuncSetAttribute(
        KdaChunkExactKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kExactSmemBytes);
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  ExactArgs a{p.q,       p.k,          p.v,
              p.f,       p.b,          p.a_log,
              p.dt_bias, p.cu_seqlens, p.slots,
              p.state_pool, p.o,
              static_cast<int>(p.num_heads), static_cast<int>(p.head_k),
              static_cast<int>(p.head_v),    static_cast<int>(p.num_slots),
              p.scale != 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(p.head_k))};
  const dim3 grid(static_cast<unsigned>((p.head_v + kSlice - 1) / kSlice),
                  static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.num_seqs));
  KdaChunkExactKernel<T><<<grid, kThreads, kExactSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchChunkExact(const KdaChunkParams& p, cudaStream_t stream) {
  return p.act == DType::kF32 ? LaunchExactT<float>(p, stream)
                              : LaunchExactT<__nv_bfloat16>(p, stream);
}

}  // namespace internal

namespace {
// The tensor-core path is built for sm_90a only (wgmma, bulk async copies).
bool CurrentDeviceIsSm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return true;  // no device: decide on shapes alone
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    return true;
  }
  return major == 9 && minor == 0;
}
}  // namespace

KdaChunkAlgo KdaChunkResolveAlgo(const KdaChunkParams& p) {
  if (p.algo != KdaChunkAlgo::kAuto) return p.algo;
  return (p.act == DType::kBF16 && p.head_k == 128 && p.head_v == 128 && CurrentDeviceIsSm90())
             ? KdaChunkAlgo::kTensorCore
             : KdaChunkAlgo::kExact;
}

size_t KdaChunkWorkspaceBytes(const KdaChunkParams& p) {
  if (KdaChunkResolveAlgo(p) != KdaChunkAlgo::kTensorCore) return 0;
  return internal::TcWorkspaceBytes(p.num_tokens, p.num_seqs, p.num_heads);
}

absl::Status KdaChunkPrefill(const KdaChunkParams& p, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_seqs > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("num_seqs out of [0, 65535]: ", p.num_seqs));
  }
  if (p.num_seqs == 0) return absl::OkStatus();
  if (p.num_tokens < 0) return absl::InvalidArgumentError("num_tokens < 0");
  if (p.num_heads < 1 || p.num_heads > 65535) return absl::InvalidArgumentError("num_heads");
  if (p.head_k < 1 || p.head_k > internal::kKMax || p.head_v < 1) {
    return absl::InvalidArgumentError(absl::StrCat("head dims: K=", p.head_k, " (1..128) V=", p.head_v));
  }
  if (p.act != DType::kF32 && p.act != DType::kBF16) {
    return absl::InvalidArgumentError("act dtype must be kF32 or kBF16");
  }
  if (p.num_slots < 1 || p.num_slots > INT32_MAX) return absl::InvalidArgumentError("num_slots");
  if (!p.q || !p.k || !p.v || !p.f || !p.b || !p.a_log || !p.dt_bias || !p.cu_seqlens ||
      !p.slots || !p.state_pool || !p.o) {
    return absl::InvalidArgumentError("null tensor pointer");
  }
  const KdaChunkAlgo algo = KdaChunkResolveAlgo(p);
  if (algo == KdaChunkAlgo::kExact) {
    return CudaStatus(internal::LaunchChunkExact(p, stream), "KdaChunkPrefill (exact)");
  }
  if (p.act != DType::kBF16 || p.head_k != 128 || p.head_v != 128) {
    return absl::InvalidArgumentError("tensor-core path needs bf16 activations and K = V = 128");
  }
  if (internal::MaxChunks(p.num_tokens, p.num_seqs) > 65535) {
    return absl::InvalidArgumentError("too many chunks for one call (> 65535); split the batch");
  }
  const size_t need = KdaChunkWorkspaceBytes(p);
  if (workspace == nullptr || workspace_bytes < need) {
    return absl::InvalidArgumentError(absl::StrCat("workspace too small: ", workspace_bytes, " < ", need));
  }
  const auto aligned = [](const void* x, int n) { return reinterpret_cast<uintptr_t>(x) % n == 0; };
  if (!aligned(workspace, 256) || !aligned(p.q, 16) || !aligned(p.k, 16) || !aligned(p.v, 16) ||
      !aligned(p.f, 16) || !aligned(p.o, 16) || !aligned(p.dt_bias, 16)) {
    return absl::InvalidArgumentError("workspace / q / k / v / f / o / dt_bias not 16-byte aligned");
  }
  return CudaStatus(internal::LaunchChunkTc(p, workspace, stream, nullptr),
                    "KdaChunkPrefill (tensor core)");
}

}  // namespace kl::cuda
