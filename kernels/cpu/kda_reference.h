// Obviously-correct, single-threaded references of kda_test_vectors.md §1
// (templated on the scalar type; the tests use double): the gate, q/k norm and
// short conv of the KDA layer, R1 (token-by-token recurrence) and R2 (the
// chunked algorithm of kimi_linear.md §4.1, exactly as written there: G cumsum,
// L, T = (I + L)^-1 by forward substitution, M, W, U, Vt, A_qk, O, state
// update). Same tensor layouts and contracts as kernels/cpu/kda.h.
#ifndef KL_KERNELS_CPU_KDA_REFERENCE_H_
#define KL_KERNELS_CPU_KDA_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kl::cpu::reference {

// softplus with the identity above 20 (spec §3.3).
template <class Real> Real Softplus(Real y) { return y > 20 ? y : std::log1p(std::exp(y)); }

template <class Real> Real Sigmoid(Real x) { return 1 / (1 + std::exp(-x)); }

// log(sigmoid(z)) = -softplus(-z), without overflow for large |z|.
template <class Real> Real LogSigmoid(Real z) {
  return z >= 0 ? -std::log1p(std::exp(-z)) : z - std::log1p(std::exp(z));
}

// g[t][h*K+d] = -exp(a_log[h]) * softplus(f + dt_bias).
template <class Real>
void Gate(const Real* f, const Real* a_log, const Real* dt_bias, int64_t T, int64_t H, int64_t K,
          Real* g) {
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < K; ++d) {
        const int64_t i = t * H * K + h * K + d;
        g[i] = -std::exp(a_log[h]) * Softplus(f[i] + dt_bias[h * K + d]);
      }
    }
  }
}

// Per row of K: x <- x / sqrt(sum x^2 + eps) * scale.
template <class Real>
void L2NormScale(Real* x, int64_t rows, int64_t K, Real scale, Real eps = Real(1e-6)) {
  for (int64_t r = 0; r < rows; ++r) {
    Real ss = 0;
    for (int64_t d = 0; d < K; ++d) ss += x[r * K + d] * x[r * K + d];
    const Real inv = 1 / std::sqrt(ss + eps);
    for (int64_t d = 0; d < K; ++d) x[r * K + d] = x[r * K + d] * inv * scale;
  }
}

// Causal depthwise conv + SiLU over the concatenation [tail; x] (tail [W-1][D],
// oldest first); tail <- last W-1 rows of that concatenation.
template <class Real>
void ShortConvSilu(const Real* x, const Real* w, int64_t T, int64_t D, int64_t W, Real* tail,
                   Real* out) {
  std::vector<Real> all((W - 1 + T) * D);  // [W-1+T][D]
  for (int64_t i = 0; i < (W - 1) * D; ++i) all[i] = tail[i];
  for (int64_t i = 0; i < T * D; ++i) all[(W - 1) * D + i] = x[i];
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < D; ++c) {
      Real u = 0;
      for (int64_t j = 0; j < W; ++j) u += w[c * W + j] * all[(t + j) * D + c];
      out[t * D + c] = u * Sigmoid(u);
    }
  }
  for (int64_t i = 0; i < (W - 1) * D; ++i) tail[i] = all[T * D + i];
}

// R1: per head, per token: S <- diag(exp g) S; r = S^T k; u = beta (v - r);
// S <- S + k u^T; o = S^T q. q, k already normalised (q scaled).
// q, k, g: [T][H][K]; v, o: [T][H][V]; beta: [T][H]; state: [H][K][V].
template <class Real>
void Recurrent(const Real* q, const Real* k, const Real* v, const Real* g, const Real* beta,
               int64_t T, int64_t H, int64_t K, int64_t V, Real* state, Real* o) {
  std::vector<Real> r(V), u(V);
  for (int64_t h = 0; h < H; ++h) {
    Real* S = state + h * K * V;
    for (int64_t t = 0; t < T; ++t) {
      const Real* qt = q + (t * H + h) * K;
      const Real* kt = k + (t * H + h) * K;
      const Real* gt = g + (t * H + h) * K;
      const Real* vt = v + (t * H + h) * V;
      const Real b = beta[t * H + h];
      for (int64_t d = 0; d < K; ++d) {
        const Real alpha = std::exp(gt[d]);
        for (int64_t c = 0; c < V; ++c) S[d * V + c] *= alpha;
      }
      for (int64_t c = 0; c < V; ++c) {
        r[c] = 0;
        for (int64_t d = 0; d < K; ++d) r[c] += S[d * V + c] * kt[d];
        u[c] = b * (vt[c] - r[c]);
      }
      for (int64_t d = 0; d < K; ++d) {
        for (int64_t c = 0; c < V; ++c) S[d * V + c] += kt[d] * u[c];
      }
      for (int64_t c = 0; c < V; ++c) {
        Real acc = 0;
        for (int64_t d = 0; d < K; ++d) acc += S[d * V + c] * qt[d];
        o[(t * H + h) * V + c] = acc;
      }
    }
  }
}

// R2: the chunked algorithm with chunk length C (kimi_linear.md §4.1 steps 1-8).
template <class Real>
void Chunked(const Real* q, const Real* k, const Real* v, const Real* g, const Real* beta,
             int64_t T, int64_t H, int64_t K, int64_t V, int64_t C, Real* state, Real* o) {
  for (int64_t h = 0; h < H; ++h) {
    Real* S = state + h * K * V;  // [K][V]
    for (int64_t t0 = 0; t0 < T; t0 += C) {
      const int64_t n = std::min(C, T - t0);
      auto Q = [&](int64_t r, int64_t d) { return q[((t0 + r) * H + h) * K + d]; };
      auto Kk = [&](int64_t r, int64_t d) { return k[((t0 + r) * H + h) * K + d]; };
      auto Vv = [&](int64_t r, int64_t c) { return v[((t0 + r) * H + h) * V + c]; };
      auto B = [&](int64_t r) { return beta[(t0 + r) * H + h]; };
      // 1. G = inclusive cumsum of g.
      std::vector<Real> G(n * K);
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t d = 0; d < K; ++d) {
          G[r * K + d] = g[((t0 + r) * H + h) * K + d] + (r > 0 ? G[(r - 1) * K + d] : 0);
        }
      }
      // 2. L[r][j] = beta_r sum_d k_r k_j exp(G_r - G_j), j < r.
      std::vector<Real> L(n * n, 0), Aqk(n * n, 0);
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j <= r; ++j) {
          Real l = 0, a = 0;
          for (int64_t d = 0; d < K; ++d) {
            const Real e = std::exp(G[r * K + d] - G[j * K + d]);
            l += Kk(r, d) * Kk(j, d) * e;
            a += Q(r, d) * Kk(j, d) * e;
          }
          if (j < r) L[r * n + j] = B(r) * l;
          Aqk[r * n + j] = a;  // 6. A_qk, j <= r.
        }
      }
      // 3. T = (I + L)^-1 by forward substitution; M = T diag(beta).
      std::vector<Real> Tm(n * n, 0), M(n * n, 0);
      for (int64_t r = 0; r < n; ++r) {
        Tm[r * n + r] = 1;
        for (int64_t j = 0; j < r; ++j) {
          Real acc = 0;
          for (int64_t m = j; m < r; ++m) acc += L[r * n + m] * Tm[m * n + j];
          Tm[r * n + j] = -acc;
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j < n; ++j) M[r * n + j] = Tm[r * n + j] * B(j);
      }
      // 4. W = M (K o exp G), U = M V.  5. Vt = U - W S.
      std::vector<Real> W(n * K, 0), U(n * V, 0), Vt(n * V, 0);
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t d = 0; d < K; ++d) W[r * K + d] += M[r * n + j] * Kk(j, d) * std::exp(G[j * K + d]);
          for (int64_t c = 0; c < V; ++c) U[r * V + c] += M[r * n + j] * Vv(j, c);
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t c = 0; c < V; ++c) {
          Real ws = 0;
          for (int64_t d = 0; d < K; ++d) ws += W[r * K + d] * S[d * V + c];
          Vt[r * V + c] = U[r * V + c] - ws;
        }
      }
      // 7. O = (Q o exp G) S + A_qk Vt.
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t c = 0; c < V; ++c) {
          Real acc = 0;
          for (int64_t d = 0; d < K; ++d) acc += Q(r, d) * std::exp(G[r * K + d]) * S[d * V + c];
          for (int64_t j = 0; j <= r; ++j) acc += Aqk[r * n + j] * Vt[j * V + c];
          o[((t0 + r) * H + h) * V + c] = acc;
        }
      }
      // 8. S <- diag(exp G_n) S + (K o exp(G_n - G))^T Vt.
      for (int64_t d = 0; d < K; ++d) {
        const Real gn = G[(n - 1) * K + d];
        for (int64_t c = 0; c < V; ++c) {
          Real acc = std::exp(gn) * S[d * V + c];
          for (int64_t j = 0; j < n; ++j) acc += Kk(j, d) * std::exp(gn - G[j * K + d]) * Vt[j * V + c];
          S[d * V + c] = acc;
        }
      }
    }
  }
}

}  // namespace kl::cpu::reference

#endif  // KL_KERNELS_CPU_KDA_REFERENCE_H_
