// Token-by-token KDA recurrence (decode path and fp32 oracle), spec §3.6 / §5.
//
// Every value column of the state evolves independently (r, u and o of column
// c only read column c), so a head is processed in column tiles of 32 floats:
// the K x 32 tile (16 KiB at K = 128) stays in L1 across a block of tokens and
// each token reads and writes it once per pass. Per token:
//   pass 1:  r = sum_d (alpha_d k_d) S[d][:]          (= (diag(alpha) S)^T k)
//            u = beta (v - r)
//   pass 2:  S[d][:] = alpha_d S[d][:] + k_d u;  o += q_d S[d][:]
#include <algorithm>
#include <cassert>
#include <cstdlib>
#include <memory>
#include <vector>

#include "kernels/common/parallel.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_internal.h"
#include "kernels/cpu/simd.h"

namespace kl::cpu {
namespace internal {
namespace {

using simd::F32x8;
using simd::Load;
using simd::Splat;
using simd::Store;

// Tokens whose decays are precomputed together (bounds the scratch to 2*64*K).
constexpr int64_t kTokenBlock = 64;

// Runs tokens [t0, t0 + nt) of one head on the column tile [c0, c0 + NV * width).
// alpha, alpha_k: [nt][K] per-token decays exp(g) and alpha * k.
template <class Vec, int NV>
void RecurrentTile(const HeadSlice& s, int64_t t0, int64_t nt, const float* alpha,
                   const float* alpha_k, int64_t c0) {
  constexpr int64_t kW = simd::Traits<Vec>::kWidth;
  const int64_t K = s.K, V = s.V;
  float* tile = s.state + c0;  // [K][V] with row stride V, columns [c0, c0 + NV*kW)
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i;
    const float* a = alpha + i * K;     // [K]
    const float* ak = alpha_k + i * K;  // [K]
    const float* kt = s.k + t * s.qk_stride;
    const float* qt = s.q + t * s.qk_stride;
    Vec r[NV] = {};
    for (int64_t d = 0; d < K; ++d) {
      const Vec c = Splat<Vec>(ak[d]);
      const float* row = tile + d * V;
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) r[n] += c * Load<Vec>(row + n * kW);
    }
    const float* vt = s.v + t * s.v_stride + c0;
    const Vec b = Splat<Vec>(s.beta[t * s.beta_stride]);
    Vec u[NV];
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) u[n] = b * (Load<Vec>(vt + n * kW) - r[n]);
    Vec out[NV] = {};
    for (int64_t d = 0; d < K; ++d) {
      const Vec ad = Splat<Vec>(a[d]), kd = Splat<Vec>(kt[d]), qd = Splat<Vec>(qt[d]);
      float* row = tile + d * V;
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) {
        const Vec x = ad * Load<Vec>(row + n * kW) + kd * u[n];
        Store<Vec>(row + n * kW, x);
        out[n] += qd * x;
      }
    }
    float* ot = s.o + t * s.v_stride + c0;
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) Store<Vec>(ot + n * kW, out[n]);
  }
}

}  // namespace

void RecurrentHead(const HeadSlice& s) {
  const int64_t K = s.K, V = s.V;
  const int64_t block = std::min(s.T, kTokenBlock);
  float* alpha = ThreadScratch(0, 2 * block * K);  // [block][K]
  float* alpha_k = alpha + block * K;              // [block][K]
  for (int64_t t0 = 0; t0 < s.T; t0 += kTokenBlock) {
    const int64_t nt = std::min(kTokenBlock, s.T - t0);
    for (int64_t i = 0; i < nt; ++i) {
      const float* gt = s.g + (t0 + i) * s.qk_stride;
      const float* kt = s.k + (t0 + i) * s.qk_stride;
      float* a = alpha + i * K;
      simd::MapArray(gt, K, a, [](auto x) { return simd::FlushBelow(simd::Exp(x), kDecayFlush); });
      for (int64_t d = 0; d < K; ++d) alpha_k[i * K + d] = a[d] * kt[d];
    }
    int64_t c = 0;
    for (; c + 32 <= V; c += 32) RecurrentTile<F32x8, 4>(s, t0, nt, alpha, alpha_k, c);
    for (; c + 8 <= V; c += 8) RecurrentTile<F32x8, 1>(s, t0, nt, alpha, alpha_k, c);
    for (; c < V; ++c) RecurrentTile<float, 1>(s, t0, nt, alpha, alpha_k, c);
  }
}

HeadSlice MakeHeadSlice(const float* q, const float* k, const float* v, const float* g,
                        const float* beta, float* o, float* state, int64_t t_begin, int64_t T,
                        int64_t H, int64_t K, int64_t V, int64_t h) {
  HeadSlice s;
  s.q = q + t_begin * H * K + h * K;
  s.k = k + t_begin * H * K + h * K;
  s.g = g + t_begin * H * K + h * K;
  s.v = v + t_begin * H * V + h * V;
  s.o = o + t_begin * H * V + h * V;
  s.beta = beta + t_begin * H + h;
  s.state = state + h * K * V;
  s.T = T;
  s.K = K;
  s.V = V;
  s.qk_stride = H * K;
  s.v_stride = H * V;
  s.beta_stride = H;
  return s;
}

float* ThreadScratch(int slot, size_t n) {
  assert(slot >= 0 && slot < kScratchSlots);
  struct Buffer {
    std::unique_ptr<float, decltype(&std::free)> data{nullptr, &std::free};
    size_t size = 0;
  };
  thread_local Buffer buffers[kScratchSlots];
  Buffer& b = buffers[slot];
  if (b.size < n) {
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    b.data.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    b.size = bytes / sizeof(float);
  }
  return b.data.get();
}

}  // namespace internal

void KdaRecurrent(const float* q, const float* k, const float* v, const float* g,
                  const float* beta, int64_t T, int64_t H, int64_t K, int64_t V, float* state,
                  float* o) {
  assert(T >= 0 && H >= 0 && K >= 1 && V >= 1);
  if (T == 0) return;
  ParallelFor(H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      internal::RecurrentHead(internal::MakeHeadSlice(q, k, v, g, beta, o, state, 0, T, H, K, V, h));
    }
  });
}

}  // namespace kl::cpu
