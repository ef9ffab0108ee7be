// Chunkwise KDA (prefill), spec §4.1, one (sequence, head) at a time.
//
// Per chunk of n tokens with incoming state S ([K][V]):
//   P(r, j)  = prod_{j < i <= r} alpha_i          (= exp(G_r - G_j), G the in-chunk
//   Gam_r    = prod_{i <= r} alpha_i                cumsum of g; Gam_r = exp(G_r))
//   A[r][j]  = sum_d q_r k_j P(r, j)   for j <= r     (intra-chunk q.k)
//   Lm[r][j] = sum_d k_r k_j P(r, j)   for j <  r     (L = diag(beta) Lm)
//   R        = V - (K o Gam) S
//   Vt       : forward substitution of (I + L) Vt = diag(beta) R, i.e.
//              Vt_r = beta_r (R_r - sum_{j<r} Lm[r][j] Vt_j)
//   O        = (Q o Gam) S + A Vt
//   S'       = diag(Gam_{n-1}) S + (K o P(n-1, .))^T Vt
// This is the spec's algorithm with the WY factors folded away: the spec's
// U - W S equals T diag(beta) (V - (K o Gam) S) with T = (I + L)^-1, and applying
// T by forward substitution to that one n x V matrix is cheaper than forming T,
// W and U (n^2 V / 2 instead of n^3 / 6 + n^2 (K + V) multiply-adds).
//
// Numerics (spec §4.2): the decays are never formed as exp(G) and exp(-G).
// Every factor is a product of per-step decays alpha = exp(g) in (0, 1] — the
// same numbers the recurrence multiplies by — accumulated along the chunk by a
// single forward sweep, so any gate magnitude (g = -1e3 included) gives 0, not
// Inf or NaN, and a strong per-step decay does not lose precision to the
// rounding of a large cumulative sum G (an fp32 G_r - G_j at |G| ~ 300 is off by
// ~1e-4, a product of fp32 alphas by ~n ulp). Factors below kDecayFlush are 0.
//
// K and V are padded to multiples of 8 internally (zeros in q, k, v and the
// state, ones in alpha), so every inner loop runs on whole 8-lane vectors.
#include <algorithm>
#include <cassert>
#include <cstring>

#include "kernels/common/parallel.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_internal.h"
#include "kernels/cpu/simd.h"

namespace kl::cpu {
namespace internal {
namespace {

using simd::F32x8;
using simd::kLanes;
using simd::Load;
using simd::Splat;
using simd::Store;

// c[i][:] = (row_scale ? row_scale[i] * c[i][:] : 0) + sum_p a[i][p] b[p][:] for a
// tile of MR rows and NV vectors of columns. a: row stride lda; b, c: ldb, ldc.
template <int MR, int NV>
inline void GemmTile(int64_t kdim, const float* a, int64_t lda, const float* b, int64_t ldb,
                     const float* row_scale, float* c, int64_t ldc) {
  F32x8 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) {
      acc[i][n] = row_scale ? Splat<F32x8>(row_scale[i]) * Load<F32x8>(c + i * ldc + n * kLanes)
                            : F32x8{};
    }
  }
  for (int64_t p = 0; p < kdim; ++p) {
    F32x8 bv[NV];
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) bv[n] = Load<F32x8>(b + p * ldb + n * kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const F32x8 av = Splat<F32x8>(a[i * lda + p]);
#pragma GCC unroll 8
      for (int n = 0; n < NV; ++n) acc[i][n] += av * bv[n];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) Store<F32x8>(c + i * ldc + n * kLanes, acc[i][n]);
  }
}

template <int MR>
inline void GemmRows(int64_t ncols, int64_t kdim, const float* a, int64_t lda, const float* b,
                     int64_t ldb, const float* row_scale, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= ncols; j += 2 * kLanes) {
    GemmTile<MR, 2>(kdim, a, lda, b + j, ldb, row_scale, c + j, ldc);
  }
  for (; j < ncols; j += kLanes) GemmTile<MR, 1>(kdim, a, lda, b + j, ldb, row_scale, c + j, ldc);
}

// c[m][ncols] = (row_scale ? diag(row_scale) c : 0) + a[m][kdim] * b[kdim][ncols];
// ncols must be a multiple of kLanes. `c` may not alias `a` or `b`.
void Gemm(int64_t m, int64_t ncols, int64_t kdim, const float* a, int64_t lda, const float* b,
          int64_t ldb, const float* row_scale, float* c, int64_t ldc) {
  assert(ncols % kLanes == 0);
  int64_t i = 0;
  auto scale_at = [&](int64_t row) { return row_scale ? row_scale + row : nullptr; };
  for (; i + 4 <= m; i += 4) {
    GemmRows<4>(ncols, kdim, a + i * lda, lda, b, ldb, scale_at(i), c + i * ldc, ldc);
  }
  for (; i < m; ++i) {
    GemmRows<1>(ncols, kdim, a + i * lda, lda, b, ldb, scale_at(i), c + i * ldc, ldc);
  }
}

// out[:ncols] = scale * (init[:] + kSign * sum_{j < nr} coef[j] rows[j][:]);
// ncols a multiple of kLanes, rows with stride ld. `out` may alias `init`.
template <int kSign, int NV>
inline void RowCombineTile(const float* init, const float* coef, int64_t nr, const float* rows,
                           int64_t ld, float scale, float* out) {
  F32x8 acc[NV];
#pragma GCC unroll 8
  for (int n = 0; n < NV; ++n) acc[n] = Load<F32x8>(init + n * kLanes);
  for (int64_t j = 0; j < nr; ++j) {
    const F32x8 cj = Splat<F32x8>(kSign * coef[j]);
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) acc[n] += cj * Load<F32x8>(rows + j * ld + n * kLanes);
  }
#pragma GCC unroll 8
  for (int n = 0; n < NV; ++n) Store<F32x8>(out + n * kLanes, acc[n] * scale);
}

template <int kSign>
void RowCombine(int64_t ncols, const float* init, const float* coef, int64_t nr,
                const float* rows, int64_t ld, float scale, float* out) {
  int64_t j = 0;
  for (; j + 4 * kLanes <= ncols; j += 4 * kLanes) {
    RowCombineTile<kSign, 4>(init + j, coef, nr, rows + j, ld, scale, out + j);
  }
  for (; j < ncols; j += kLanes) {
    RowCombineTile<kSign, 1>(init + j, coef, nr, rows + j, ld, scale, out + j);
  }
}

// Per-thread working set of ChunkHead for chunk capacity C and padded dims.
struct ChunkBuffers {
  float* q;      // [C][Kp] chunk queries
  float* k;      // [C][Kp] chunk keys
  float* alpha;  // [C][Kp] per-step decays exp(g), flushed
  float* decay;  // [C][Kp] row j: k_j o P(r, j) during the sweep, k_j o P(n-1, j) after
  float* x;      // [2C][Kp] rows [0, n): K o Gam, rows [n, 2n): Q o Gam
  float* kdec_t; // [Kp][C] (K o P(n-1, .))^T: keys decayed to the chunk end, transposed
  float* gamma;  // [Kp] Gam_r during the sweep; Gam_{n-1} = exp(G_n) after it
  float* v;      // [C][Vp] chunk values
  float* y;      // [2C][Vp] x S; rows [0, n) then become R = V - (K o Gam) S
  float* vt;     // [C][Vp] corrected values Vt
  float* orow;   // [Vp] one output row
  float* a;      // [C][C] A (lower triangle incl. diagonal used)
  float* lm;     // [C][C] Lm (strict lower triangle used)
  float* beta;   // [C]
  float* s;      // [Kp][Vp] padded state
};

ChunkBuffers AllocChunkBuffers(int64_t C, int64_t Kp, int64_t Vp) {
  // Every region starts on a 64-byte boundary (sizes rounded up to 16 floats).
  const int64_t sizes[] = {C * Kp, C * Kp, C * Kp, C * Kp, 2 * C * Kp, Kp * C, Kp, C * Vp,
                           2 * C * Vp, C * Vp, Vp, C * C, C * C, C, Kp * Vp};
  constexpr int kRegions = sizeof(sizes) / sizeof(sizes[0]);
  int64_t offsets[kRegions + 1] = {0};
  for (int i = 0; i < kRegions; ++i) offsets[i + 1] = offsets[i] + (sizes[i] + 15) / 16 * 16;
  float* base = ThreadScratch(1, static_cast<size_t>(offsets[kRegions]));
  float* p[kRegions];
  for (int i = 0; i < kRegions; ++i) p[i] = base + offsets[i];
  return ChunkBuffers{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                      p[8], p[9], p[10], p[11], p[12], p[13], p[14]};
}

// Copies chunk tokens [t0, t0 + n) of the head into padded buffers and computes
// alpha = exp(g) (flushed; padding lanes 1).
void GatherChunk(const HeadSlice& s, int64_t t0, int64_t n, int64_t Kp, int64_t Vp,
                 const ChunkBuffers& b) {
  const int64_t K = s.K, V = s.V;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = t0 + r;
    float* qr = b.q + r * Kp;
    float* kr = b.k + r * Kp;
    float* ar = b.alpha + r * Kp;
    float* vr = b.v + r * Vp;
    std::memcpy(qr, s.q + t * s.qk_stride, K * sizeof(float));
    std::memcpy(kr, s.k + t * s.qk_stride, K * sizeof(float));
    std::memcpy(vr, s.v + t * s.v_stride, V * sizeof(float));
    simd::MapArray(s.g + t * s.qk_stride, K, ar,
                   [](auto x) { return simd::FlushBelow(simd::Exp(x), kDecayFlush); });
    for (int64_t d = K; d < Kp; ++d) {
      qr[d] = 0.0f;
      kr[d] = 0.0f;
      ar[d] = 1.0f;
    }
    for (int64_t c = V; c < Vp; ++c) vr[c] = 0.0f;
    b.beta[r] = s.beta[t * s.beta_stride];
  }
}

// The forward sweep over the chunk: fills a, lm, x, gamma and kdec_t (see
// ChunkBuffers). Row j of `kdec` holds k_j o P(r, j) after step r: at step r
// every earlier row is multiplied by alpha_r (so it is a product of r - j
// factors, error <= (r - j) ulp) and row r starts as k_r. Then
// A[r][j] = q_r . kdec_j and Lm[r][j] = k_r . kdec_j, and after the last step
// kdec_j = k_j o P(n-1, j) are the keys decayed to the chunk end.
// Entries below kDecayFlush in magnitude are set to 0 (see kda_internal.h).
void Sweep(int64_t n, int64_t C, int64_t Kp, const ChunkBuffers& b) {
  const F32x8 one = Splat<F32x8>(1.0f);
  for (int64_t d = 0; d < Kp; d += kLanes) Store<F32x8>(b.gamma + d, one);
  for (int64_t r = 0; r < n; ++r) {
    const float* qr = b.q + r * Kp;
    const float* kr = b.k + r * Kp;
    const float* ar = b.alpha + r * Kp;
    float* kg = b.x + r * Kp;
    float* qg = b.x + (n + r) * Kp;
    for (int64_t d = 0; d < Kp; d += kLanes) {
      const F32x8 gam = simd::FlushBelow(Load<F32x8>(b.gamma + d) * Load<F32x8>(ar + d), kDecayFlush);
      Store<F32x8>(b.gamma + d, gam);
      Store<F32x8>(kg + d, Load<F32x8>(kr + d) * gam);
      Store<F32x8>(qg + d, Load<F32x8>(qr + d) * gam);
    }
    float* arow = b.a + r * C;
    float* lrow = b.lm + r * C;
    int64_t j = 0;
    for (; j + 2 <= r; j += 2) {  // two rows at a time: q_r, k_r, alpha_r loaded once
      float* p0 = b.decay + j * Kp;
      float* p1 = p0 + Kp;
      F32x8 a0{}, l0{}, a1{}, l1{};
      for (int64_t d = 0; d < Kp; d += kLanes) {
        const F32x8 alpha = Load<F32x8>(ar + d), q = Load<F32x8>(qr + d), k = Load<F32x8>(kr + d);
        const F32x8 x0 = simd::FlushAbsBelow(Load<F32x8>(p0 + d) * alpha, kDecayFlush);
        const F32x8 x1 = simd::FlushAbsBelow(Load<F32x8>(p1 + d) * alpha, kDecayFlush);
        Store<F32x8>(p0 + d, x0);
        Store<F32x8>(p1 + d, x1);
        a0 += q * x0;
        l0 += k * x0;
        a1 += q * x1;
        l1 += k * x1;
      }
      arow[j] = simd::ReduceAdd(a0);
      lrow[j] = simd::ReduceAdd(l0);
      arow[j + 1] = simd::ReduceAdd(a1);
      lrow[j + 1] = simd::ReduceAdd(l1);
    }
    for (; j < r; ++j) {
      float* pj = b.decay + j * Kp;
      F32x8 acc_a{}, acc_l{};
      for (int64_t d = 0; d < Kp; d += kLanes) {
        const F32x8 x = simd::FlushAbsBelow(Load<F32x8>(pj + d) * Load<F32x8>(ar + d), kDecayFlush);
        Store<F32x8>(pj + d, x);
        acc_a += Load<F32x8>(qr + d) * x;
        acc_l += Load<F32x8>(kr + d) * x;
      }
      arow[j] = simd::ReduceAdd(acc_a);
      lrow[j] = simd::ReduceAdd(acc_l);
    }
    float* pr = b.decay + r * Kp;
    F32x8 acc_a{};
    for (int64_t d = 0; d < Kp; d += kLanes) {
      const F32x8 k = Load<F32x8>(kr + d);
      Store<F32x8>(pr + d, k);
      acc_a += Load<F32x8>(qr + d) * k;
    }
    arow[r] = simd::ReduceAdd(acc_a);
  }
  // Keys decayed to the chunk end, transposed for the state-update GEMM.
  for (int64_t j = 0; j < n; ++j) {
    const float* pj = b.decay + j * Kp;
    for (int64_t d = 0; d < Kp; ++d) b.kdec_t[d * C + j] = pj[d];
  }
}

}  // namespace

void ChunkHead(const HeadSlice& s, int64_t chunk) {
  assert(chunk >= 1);
  if (s.T == 0) return;
  const int64_t K = s.K, V = s.V;
  const int64_t Kp = simd::RoundUpToLanes(K), Vp = simd::RoundUpToLanes(V);
  const int64_t C = std::min(chunk, s.T);
  const ChunkBuffers b = AllocChunkBuffers(C, Kp, Vp);
  // Padded copy of the state: padding rows / columns stay exactly 0.
  std::memset(b.s, 0, sizeof(float) * Kp * Vp);
  for (int64_t d = 0; d < K; ++d) std::memcpy(b.s + d * Vp, s.state + d * V, V * sizeof(float));

  for (int64_t t0 = 0; t0 < s.T; t0 += C) {
    const int64_t n = std::min(C, s.T - t0);
    GatherChunk(s, t0, n, Kp, Vp, b);
    Sweep(n, C, Kp, b);
    // [K o Gam; Q o Gam] S in one pass over the state.
    Gemm(2 * n, Vp, Kp, b.x, Kp, b.s, Vp, nullptr, b.y, Vp);
    for (int64_t r = 0; r < n; ++r) {
      float* yr = b.y + r * Vp;
      const float* vr = b.v + r * Vp;
      for (int64_t c = 0; c < Vp; c += kLanes) {
        Store<F32x8>(yr + c, Load<F32x8>(vr + c) - Load<F32x8>(yr + c));
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      // Vt_r = beta_r (R_r - sum_{j<r} Lm[r][j] Vt_j), then o_r = (Q o Gam)_r S + sum_{j<=r} A[r][j] Vt_j.
      RowCombine<-1>(Vp, b.y + r * Vp, b.lm + r * C, r, b.vt, Vp, b.beta[r], b.vt + r * Vp);
      RowCombine<+1>(Vp, b.y + (n + r) * Vp, b.a + r * C, r + 1, b.vt, Vp, 1.0f, b.orow);
      std::memcpy(s.o + (t0 + r) * s.v_stride, b.orow, V * sizeof(float));
    }
    // S' = diag(Gam_{n-1}) S + (K o P(n-1, .))^T Vt.
    Gemm(Kp, Vp, n, b.kdec_t, C, b.vt, Vp, b.gamma, b.s, Vp);
  }
  for (int64_t d = 0; d < K; ++d) std::memcpy(s.state + d * V, b.s + d * Vp, V * sizeof(float));
}

}  // namespace internal

void KdaChunkPrefill(const float* q, const float* k, const float* v, const float* g,
                     const float* beta, int64_t T, int64_t H, int64_t K, int64_t V, int64_t chunk,
                     float* state, float* o) {
  assert(T >= 0 && H >= 0 && K >= 1 && V >= 1 && chunk >= 1);
  if (T == 0) return;
  ParallelFor(H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      internal::ChunkHead(internal::MakeHeadSlice(q, k, v, g, beta, o, state, 0, T, H, K, V, h),
                          chunk);
    }
  });
}

}  // namespace kl::cpu
