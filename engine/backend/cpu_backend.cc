#include "engine/backend/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/sampling/sampler.h"
#include "kernels/common/parallel.h"
#include "kernels/common/status_macros.h"
#include "kernels/cpu/kda.h"

namespace kl {
namespace {

inline float Sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// C[m][n] = alpha * A[m][k] · B + beta * C, B given as [n][k] (transposed) or [k][n].
void Sgemm(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
}

// Causal softmax over each row r of scores [n][ld]: only columns < limit(r) count;
// the rest are set to 0.
void CausalSoftmaxRows(float* scores, int64_t n, int64_t ld, int64_t first_limit) {
  ParallelFor(n, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* row = scores + r * ld;
      const int64_t lim = first_limit + r;
      float mx = -INFINITY;
      for (int64_t j = 0; j < lim; ++j) mx = std::max(mx, row[j]);
      double sum = 0;
      for (int64_t j = 0; j < lim; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t j = 0; j < lim; ++j) row[j] *= inv;
      for (int64_t j = lim; j < ld; ++j) row[j] = 0.0f;
    }
  });
}

}  // namespace

CpuBackend::CpuBackend(CpuBackendOptions options) : options_(options) {}

bool CpuBackend::Supports(Op) const { return true; }

absl::StatusOr<Weight> CpuBackend::UploadWeight(const HostTensor& t) {
  if (t.rows < 0 || t.cols < 0 || (t.rows * t.cols > 0 && t.data == nullptr && !t.synthetic)) {
    return absl::InvalidArgumentError("UploadWeight: bad host tensor");
  }
  const int64_t n = t.rows * t.cols;
  std::vector<float> data(static_cast<size_t>(n));
  if (t.synthetic) {
    ParallelFor(n, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) data[i] = SyntheticValue(t, i);
    });
  } else if (n > 0) {
    const size_t esz = DTypeSize(t.dtype);
    const char* src = static_cast<const char*>(t.data);
    bool ok = true;
    ParallelFor(n, 1 << 16, [&](int64_t b, int64_t e) {
      if (!ToF32(t.dtype, src + b * esz, data.data() + b, static_cast<size_t>(e - b))) ok = false;
    });
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("UploadWeight: unsupported dtype ", std::string(DTypeName(t.dtype))));
    }
  }
  std::lock_guard<std::mutex> l(mu_);
  weights_.push_back(std::move(data));
  weight_bytes_ += n * 4;
  Weight w;
  w.dtype = DType::kF32;
  w.data = weights_.back().data();
  w.rows = t.rows;
  w.cols = t.cols;
  return w;
}

int64_t CpuBackend::weight_bytes() const {
  std::lock_guard<std::mutex> l(mu_);
  return weight_bytes_;
}

absl::StatusOr<Buffer> CpuBackend::Alloc(int64_t elems) {
  if (elems < 0) return absl::InvalidArgumentError("Alloc: negative size");
  auto owner = std::shared_ptr<float>(new float[std::max<int64_t>(elems, 1)],
                                      std::default_delete<float[]>());
  float* p = owner.get();
  return Buffer(p, elems, std::move(owner));
}

absl::Status CpuBackend::Upload(const float* host, int64_t elems, float* dst) {
  if (elems > 0) std::memcpy(dst, host, elems * sizeof(float));
  return absl::OkStatus();
}

absl::Status CpuBackend::Download(const float* src, int64_t elems, float* host) {
  if (elems > 0) std::memcpy(host, src, elems * sizeof(float));
  return absl::OkStatus();
}

absl::Status CpuBackend::Linear(const float* x, int64_t rows, const Weight& w, float* y) {
  const auto t0 = linear_stats_on_ ? std::chrono::steady_clock::now()
                                   : std::chrono::steady_clock::time_point();
  Sgemm(/*trans_b=*/true, rows, w.rows, w.cols, 1.0f, x, w.cols, static_cast<const float*>(w.data),
        w.cols, 0.0f, y, w.rows);
  if (linear_stats_on_) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> l(mu_);
    linear_stats_.seconds += s;
    linear_stats_.flops += 2.0 * rows * w.rows * w.cols;
  }
  return absl::OkStatus();
}

CpuBackend::LinearStats CpuBackend::linear_stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return linear_stats_;
}

void CpuBackend::ResetLinearStats() {
  std::lock_guard<std::mutex> l(mu_);
  linear_stats_ = {};
}

absl::Status CpuBackend::RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t stride,
                                 const Weight& w, double eps, float* y) {
  if (w.rows * w.cols != dim) {
    return absl::InvalidArgumentError(absl::StrCat("RmsNorm: weight has ", w.rows * w.cols,
                                                   " elements, expected ", dim));
  }
  const float* wt = static_cast<const float*>(w.data);
  ParallelFor(rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* xr = x + r * stride;
      float* yr = y + r * stride;
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
      for (int64_t i = 0; i < dim; ++i) yr[i] = wt[i] * (xr[i] * inv);
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::Embedding(const int32_t* ids, int64_t n, const Weight& table, float* y) {
  const float* t = static_cast<const float*>(table.data);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", ids[i], " out of range [0, ", table.rows, ")"));
    }
  }
  ParallelFor(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      std::memcpy(y + i * table.cols, t + static_cast<int64_t>(ids[i]) * table.cols,
                  table.cols * sizeof(float));
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::Add(const float* x, int64_t n, float* y) {
  ParallelFor(n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] += x[i];
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::SwiGlu(const float* gate, const float* up, int64_t rows, int64_t inter,
                                float* out) {
  const int64_t n = rows * inter;
  ParallelFor(n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = gate[i] * Sigmoidf(gate[i]) * up[i];
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::KdaMix(float* q, float* k, float* v, float* f, float* b,
                                const std::vector<SeqSlice>& seqs,
                                const std::vector<KdaStateRef>& states, const KdaOpWeights& w,
                                int64_t heads, int64_t head_dim, int64_t conv_width, int64_t chunk,
                                float* o) {
  if (seqs.size() != states.size()) return absl::InvalidArgumentError("KdaMix: seqs != states");
  const int64_t dim = heads * head_dim;
  int64_t rows = 0;
  for (const auto& s : seqs) rows = std::max(rows, s.row_begin + s.rows);
  // Short conv + SiLU per sequence, with its carried tails. Outputs go to scratch
  // (the conv reads earlier inputs of the same buffer).
  std::vector<float> cq(rows * dim), ck(rows * dim), cv(rows * dim);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqSlice& s = seqs[i];
    const int64_t off = s.row_begin * dim;
    cpu::ShortConvSilu(q + off, static_cast<const float*>(w.conv_q->data), s.rows, dim, conv_width,
                       states[i].conv_q, cq.data() + off);
    cpu::ShortConvSilu(k + off, static_cast<const float*>(w.conv_k->data), s.rows, dim, conv_width,
                       states[i].conv_k, ck.data() + off);
    cpu::ShortConvSilu(v + off, static_cast<const float*>(w.conv_v->data), s.rows, dim, conv_width,
                       states[i].conv_v, cv.data() + off);
  }
  std::vector<float> g(rows * dim), beta(rows * heads);
  cpu::KdaGate(f, static_cast<const float*>(w.a_log->data),
               static_cast<const float*>(w.dt_bias->data), rows, heads, head_dim, g.data());
  cpu::Sigmoid(b, rows * heads, beta.data());
  cpu::L2NormScaleRows(cq.data(), rows * heads, head_dim,
                       static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim))));
  cpu::L2NormScaleRows(ck.data(), rows * heads, head_dim, 1.0f);
  // Varlen over the batch: cu_seqlens follow each slice (slices are packed in order).
  std::vector<int64_t> cu(seqs.size() + 1, 0);
  std::vector<float*> st(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].row_begin != cu[i]) {
      return absl::InvalidArgumentError("KdaMix: sequences must be packed contiguously in order");
    }
    cu[i + 1] = cu[i] + seqs[i].rows;
    st[i] = states[i].recurrent;
  }
  cpu::KdaVarlen(cq.data(), ck.data(), cv.data(), g.data(), beta.data(), cu.data(),
                 static_cast<int64_t>(seqs.size()), heads, head_dim, head_dim, chunk,
                 options_.kda_recurrent_max_tokens, st.data(), o);
  return absl::OkStatus();
}

absl::Status CpuBackend::GatedRmsNorm(const float* o, const float* z, int64_t rows, int64_t heads,
                                      int64_t dim, const Weight& w, double eps, float* y) {
  const float* wt = static_cast<const float*>(w.data);
  ParallelFor(rows * heads, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* orow = o + r * dim;
      const float* zrow = z + r * dim;
      float* yrow = y + r * dim;
      double ss = 0;
      for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(orow[j]) * orow[j];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
      for (int64_t j = 0; j < dim; ++j) yrow[j] = orow[j] * inv * wt[j] * Sigmoidf(zrow[j]);
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::MlaAttention(const float* q, const float* latent,
                                      const std::vector<SeqSlice>& seqs,
                                      const std::vector<MlaCacheRef>& caches, const MlaDims& d,
                                      const Weight& kv_b, float* out) {
  if (seqs.size() != caches.size()) return absl::InvalidArgumentError("MlaAttention: size");
  const int64_t lat = d.kv_lora_rank + d.qk_rope;
  const int64_t qdim = d.heads * (d.qk_nope + d.qk_rope);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqSlice& s = seqs[i];
    if (s.rows == 0) continue;
    std::memcpy(caches[i].rows + s.pos * lat, latent + s.row_begin * lat,
                s.rows * lat * sizeof(float));
    const float* qs = q + s.row_begin * qdim;
    float* os = out + s.row_begin * d.heads * d.v_head;
    if (s.rows >= options_.mla_naive_min_rows) {
      RETURN_IF_ERROR(MlaOneSeqNaive(qs, s, caches[i].rows, d, kv_b, os));
    } else {
      RETURN_IF_ERROR(MlaOneSeqAbsorbed(qs, s, caches[i].rows, d, kv_b, os));
    }
  }
  return absl::OkStatus();
}

// Absorbed form (spec §6 decode): per head, q̂ = W_UKᵀ q_nope is scored against the
// cached latent rows [c; k_pe] directly; the output is W_UV Σ p c.
absl::Status CpuBackend::MlaOneSeqAbsorbed(const float* q, const SeqSlice& s, const float* cache,
                                           const MlaDims& d, const Weight& kv_b, float* out) {
  const int64_t n = s.rows, L = s.pos + s.rows;
  const int64_t lat = d.kv_lora_rank + d.qk_rope, qh = d.qk_nope + d.qk_rope;
  const int64_t qdim = d.heads * qh, kvh = d.qk_nope + d.v_head;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(qh)));
  const float* wkv = static_cast<const float*>(kv_b.data);
  std::vector<float> qcat(n * lat), scores(n * L), obar(n * d.kv_lora_rank);
  for (int64_t h = 0; h < d.heads; ++h) {
    const float* w_uk = wkv + h * kvh * d.kv_lora_rank;          // [nope][kv_lora]
    const float* w_uv = w_uk + d.qk_nope * d.kv_lora_rank;       // [v][kv_lora]
    // q̂ [n][kv_lora] = q_nope [n][nope] · W_UK
    Sgemm(false, n, d.kv_lora_rank, d.qk_nope, 1.0f, q + h * qh, qdim, w_uk, d.kv_lora_rank, 0.0f,
          qcat.data(), lat);
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(qcat.data() + t * lat + d.kv_lora_rank, q + t * qdim + h * qh + d.qk_nope,
                  d.qk_rope * sizeof(float));
    }
    Sgemm(true, n, L, lat, scale, qcat.data(), lat, cache, lat, 0.0f, scores.data(), L);
    CausalSoftmaxRows(scores.data(), n, L, s.pos + 1);
    Sgemm(false, n, d.kv_lora_rank, L, 1.0f, scores.data(), L, cache, lat, 0.0f, obar.data(),
          d.kv_lora_rank);
    Sgemm(true, n, d.v_head, d.kv_lora_rank, 1.0f, obar.data(), d.kv_lora_rank, w_uv,
          d.kv_lora_rank, 0.0f, out + h * d.v_head, d.heads * d.v_head);
  }
  return absl::OkStatus();
}

// Naive form (spec §6 prefill (a)): materialise k_nope and v per head from the
// cached latents, then causal attention with qk dim nope+rope and v dim v_head.
absl::Status CpuBackend::MlaOneSeqNaive(const float* q, const SeqSlice& s, const float* cache,
                                        const MlaDims& d, const Weight& kv_b, float* out) {
  const int64_t n = s.rows, L = s.pos + s.rows;
  const int64_t lat = d.kv_lora_rank + d.qk_rope, qh = d.qk_nope + d.qk_rope;
  const int64_t qdim = d.heads * qh, kvh = d.qk_nope + d.v_head, kvdim = d.heads * kvh;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(qh)));
  std::vector<float> kv(L * kvdim), keys(L * qh), scores(n * L);
  // kv [L][H*(nope+v)] = c [L][kv_lora] · kv_bᵀ
  Sgemm(true, L, kvdim, d.kv_lora_rank, 1.0f, cache, lat, static_cast<const float*>(kv_b.data),
        d.kv_lora_rank, 0.0f, kv.data(), kvdim);
  for (int64_t h = 0; h < d.heads; ++h) {
    ParallelFor(L, 64, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        std::memcpy(keys.data() + t * qh, kv.data() + t * kvdim + h * kvh, d.qk_nope * 4);
        std::memcpy(keys.data() + t * qh + d.qk_nope, cache + t * lat + d.kv_lora_rank,
                    d.qk_rope * 4);
      }
    });
    Sgemm(true, n, L, qh, scale, q + h * qh, qdim, keys.data(), qh, 0.0f, scores.data(), L);
    CausalSoftmaxRows(scores.data(), n, L, s.pos + 1);
    Sgemm(false, n, d.v_head, L, 1.0f, scores.data(), L, kv.data() + h * kvh + d.qk_nope, kvdim,
          0.0f, out + h * d.v_head, d.heads * d.v_head);
  }
  return absl::OkStatus();
}

void MoeRoute(const float* logits, const float* bias, const MoeParams& p, int32_t* idx,
              float* weights) {
  const int64_t E = p.num_experts;
  std::vector<float> score(E), sel(E);
  for (int64_t e = 0; e < E; ++e) {
    score[e] = Sigmoidf(logits[e]);
    sel[e] = score[e] + (bias ? bias[e] : 0.0f);
  }
  std::vector<char> taken(E, 0);
  double sum = 0;
  for (int64_t j = 0; j < p.top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {  // strict '>' scanning upward: ties go to the lower id
      if (!taken[e] && (best < 0 || sel[e] > sel[best])) best = e;
    }
    taken[best] = 1;
    idx[j] = static_cast<int32_t>(best);
    weights[j] = p.biased_weights ? sel[best] : score[best];
    sum += weights[j];
  }
  const double norm = p.renormalize ? 1.0 / (sum + 1e-20) : 1.0;
  for (int64_t j = 0; j < p.top_k; ++j) {
    weights[j] = static_cast<float>(weights[j] * norm * p.routed_scaling_factor);
  }
}

absl::Status CpuBackend::Moe(const float* x, int64_t rows, int64_t dim, const MoeParams& p,
                             const MoeOpWeights& w, float* y) {
  const int64_t E = p.num_experts, K = p.top_k;
  std::vector<float> logits(rows * E);
  RETURN_IF_ERROR(Linear(x, rows, *w.router, logits.data()));
  std::vector<int32_t> idx(rows * K);
  std::vector<float> wts(rows * K);
  const float* bias = w.correction_bias ? static_cast<const float*>(w.correction_bias->data)
                                        : nullptr;
  ParallelFor(rows, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      MoeRoute(logits.data() + r * E, bias, p, idx.data() + r * K, wts.data() + r * K);
    }
  });
  // Group (row, weight) pairs by expert; experts run in id order so every row's
  // sum has a fixed order (deterministic results, whatever the batch).
  std::vector<std::vector<std::pair<int64_t, float>>> by_expert(E);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < K; ++j) by_expert[idx[r * K + j]].push_back({r, wts[r * K + j]});
  }
  std::vector<float> routed;
  float* const out = y;
  if (p.accumulate) {  // the routed sum on its own, then one add (MoeParams::accumulate)
    routed.assign(rows * dim, 0.0f);
    y = routed.data();
  } else {
    std::fill(y, y + rows * dim, 0.0f);
  }
  const int64_t inter = (*w.w1)[0].rows;
  std::vector<float> xe, g, u, ye;
  for (int64_t e = 0; e < E; ++e) {
    const auto& list = by_expert[e];
    const int64_t m = static_cast<int64_t>(list.size());
    if (m == 0) continue;
    xe.resize(m * dim);
    g.resize(m * inter);
    u.resize(m * inter);
    ye.resize(m * dim);
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(xe.data() + i * dim, x + list[i].first * dim, dim * sizeof(float));
    }
    RETURN_IF_ERROR(Linear(xe.data(), m, (*w.w1)[e], g.data()));
    RETURN_IF_ERROR(Linear(xe.data(), m, (*w.w3)[e], u.data()));
    RETURN_IF_ERROR(SwiGlu(g.data(), u.data(), m, inter, g.data()));
    RETURN_IF_ERROR(Linear(g.data(), m, (*w.w2)[e], ye.data()));
    for (int64_t i = 0; i < m; ++i) {
      float* yr = y + list[i].first * dim;
      const float* src = ye.data() + i * dim;
      const float wt = list[i].second;
      for (int64_t c = 0; c < dim; ++c) yr[c] += wt * src[c];
    }
  }
  if (p.accumulate) {
    for (int64_t i = 0; i < rows * dim; ++i) out[i] += routed[i];
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SampleTokens(const float* logits, int64_t rows, int64_t vocab,
                                      absl::Span<const TokenSampling> params,
                                      int32_t* host_tokens) {
  if (!options_.backend_sampling) {
    return Backend::SampleTokens(logits, rows, vocab, params, host_tokens);
  }
  if (static_cast<int64_t>(params.size()) != rows || rows < 0) {
    return absl::InvalidArgumentError("SampleTokens: one parameter set per row");
  }
  for (int64_t r = 0; r < rows; ++r) {
    host_tokens[r] = Sampler(params[r]).Sample(logits + r * vocab, vocab);
  }
  return absl::OkStatus();
}

}  // namespace kl
