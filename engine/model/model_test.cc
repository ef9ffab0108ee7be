// Model-level tests of the CPU engine: an independent fp64 reference of the whole
// forward pass (spec §3, §6, §7 written as plain loops), plus the invariants of
// kda_test_vectors.md §6 that hold at model level (3, 10, 11, 12-in-process, 13).
#include "engine/model/model.h"

#include <cmath>
#include <map>
#include <string>

#include "gtest/gtest.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/random_source.h"

namespace kl {
namespace {

// fp32 engine vs fp64 reference, relative to the logits' scale.
constexpr double kRefTol = 2e-4;
// fp32 engine vs itself through a different but equivalent path.
constexpr double kPathTol = 2e-5;

ModelConfig MicroConfig() {
  ModelConfig c;
  c.hidden_size = 32;
  c.num_hidden_layers = 4;
  c.vocab_size = 64;
  c.bos_token_id = 0;
  c.eos_token_id = 2;
  c.pad_token_id = 63;
  c.intermediate_size = 48;
  c.first_k_dense_replace = 1;
  c.num_experts = 4;
  c.num_experts_per_token = 2;
  c.num_shared_experts = 1;
  c.moe_intermediate_size = 16;
  c.routed_scaling_factor = 2.446;
  c.num_attention_heads = 2;
  c.kv_lora_rank = 8;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 3;
  c.v_head_dim = 4;
  c.kda_num_heads = 2;
  c.kda_head_dim = 8;
  c.short_conv_kernel_size = 4;
  c.layer_kinds = {LayerKind::kKda, LayerKind::kKda, LayerKind::kKda, LayerKind::kMla};
  return c;
}

// ---------------------------------------------------------------- fp64 reference
// Holds the same random weights (as doubles) and runs the model token by token.
class RefModel {
 public:
  RefModel(const ModelConfig& c, uint64_t seed, bool biased) : c_(c), biased_(biased) {
    src_ = RandomTensorSource(seed);
  }
  const std::vector<double>& Param(const std::string& name, int64_t rows, int64_t cols) {
    auto it = w_.find(name);
    if (it != w_.end()) return it->second;
    HostTensor t = src_(name, rows, cols).value();
    const float* f = static_cast<const float*>(t.data);
    return w_[name] = std::vector<double>(f, f + rows * cols);
  }
  // y = W x for W [rows][cols]
  std::vector<double> Lin(const std::string& name, int64_t rows, int64_t cols,
                          const std::vector<double>& x) {
    const auto& w = Param(name, rows, cols);
    std::vector<double> y(rows, 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) y[r] += w[r * cols + k] * x[k];
    return y;
  }
  std::vector<double> Rms(const std::string& name, const std::vector<double>& x, double eps) {
    const auto& w = Param(name, 1, x.size());
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = w[i] * x[i] * inv;
    return y;
  }
  static double Sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static double Silu(double x) { return x * Sig(x); }

  // Logits for every token of `tokens`, run from an empty state.
  std::vector<std::vector<double>> Run(const std::vector<int32_t>& tokens) {
    const int64_t D = c_.hidden_size, T = tokens.size();
    std::vector<std::vector<double>> x(T);
    const auto& emb = Param("model.embed_tokens.weight", c_.vocab_size, D);
    for (int64_t t = 0; t < T; ++t) x[t].assign(emb.begin() + tokens[t] * D, emb.begin() + (tokens[t] + 1) * D);
    for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      std::vector<std::vector<double>> h(T);
      for (int64_t t = 0; t < T; ++t) h[t] = Rms(p + "input_layernorm.weight", x[t], c_.rms_norm_eps);
      auto a = c_.IsKda(l) ? Kda(p + "self_attn.", h) : Mla(p + "self_attn.", h);
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < D; ++i) x[t][i] += a[t][i];
        auto hh = Rms(p + "post_attention_layernorm.weight", x[t], c_.rms_norm_eps);
        auto f = Ffn(l, hh);
        for (int64_t i = 0; i < D; ++i) x[t][i] += f[i];
      }
    }
    std::vector<std::vector<double>> logits(T);
    for (int64_t t = 0; t < T; ++t) {
      logits[t] = Lin("lm_head.weight", c_.vocab_size, D, Rms("model.norm.weight", x[t], c_.rms_norm_eps));
    }
    return logits;
  }

 private:
  // KDA layer (spec §3), token by token with the recurrence of §3.6.
  std::vector<std::vector<double>> Kda(const std::string& p, const std::vector<std::vector<double>>& h) {
    const int64_t D = c_.hidden_size, H = c_.kda_num_heads, K = c_.kda_head_dim, KD = H * K;
    const int64_t CW = c_.short_conv_kernel_size, T = h.size();
    std::vector<std::vector<double>> qt(T), kt(T), vt(T), out(T);
    for (int64_t t = 0; t < T; ++t) {
      qt[t] = Lin(p + "q_proj.weight", KD, D, h[t]);
      kt[t] = Lin(p + "k_proj.weight", KD, D, h[t]);
      vt[t] = Lin(p + "v_proj.weight", KD, D, h[t]);
    }
    auto conv = [&](const std::string& name, const std::vector<std::vector<double>>& xs, int64_t t) {
      const auto& w = Param(p + name, KD, CW);
      std::vector<double> y(KD);
      for (int64_t ch = 0; ch < KD; ++ch) {
        double u = 0;
        for (int64_t j = 0; j < CW; ++j) {
          const int64_t src = t - (CW - 1) + j;
          if (src >= 0) u += w[ch * CW + j] * xs[src][ch];
        }
        y[ch] = Silu(u);
      }
      return y;
    };
    const auto& a_log = Param(p + "A_log", 1, H);
    const auto& dt_bias = Param(p + "dt_bias", 1, KD);
    std::vector<double> S(H * K * K, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      auto q = conv("q_conv1d.weight", qt, t), k = conv("k_conv1d.weight", kt, t), v = conv("v_conv1d.weight", vt, t);
      auto f = Lin(p + "f_b_proj.weight", KD, K, Lin(p + "f_a_proj.weight", K, D, h[t]));
      auto b = Lin(p + "b_proj.weight", H, D, h[t]);
      auto z = Lin(p + "g_b_proj.weight", KD, K, Lin(p + "g_a_proj.weight", K, D, h[t]));
      std::vector<double> o(KD);
      for (int64_t hh = 0; hh < H; ++hh) {
        double nq = 0, nk = 0;
        for (int64_t d = 0; d < K; ++d) { nq += q[hh * K + d] * q[hh * K + d]; nk += k[hh * K + d] * k[hh * K + d]; }
        nq = 1.0 / std::sqrt(nq + 1e-6) / std::sqrt(static_cast<double>(K));
        nk = 1.0 / std::sqrt(nk + 1e-6);
        const double beta = Sig(b[hh]);
        double* s = &S[hh * K * K];
        for (int64_t d = 0; d < K; ++d) {
          const double y = f[hh * K + d] + dt_bias[hh * K + d];
          const double sp = y > 20 ? y : std::log1p(std::exp(y));
          const double g = -std::exp(a_log[hh]) * sp;
          for (int64_t e = 0; e < K; ++e) s[d * K + e] *= std::exp(g);
        }
        for (int64_t e = 0; e < K; ++e) {
          double r = 0;
          for (int64_t d = 0; d < K; ++d) r += s[d * K + e] * k[hh * K + d] * nk;
          const double u = beta * (v[hh * K + e] - r);
          for (int64_t d = 0; d < K; ++d) s[d * K + e] += k[hh * K + d] * nk * u;
        }
        for (int64_t e = 0; e < K; ++e) {
          double acc = 0;
          for (int64_t d = 0; d < K; ++d) acc += s[d * K + e] * q[hh * K + d] * nq;
          o[hh * K + e] = acc;
        }
        // Gated per-head RMSNorm (§3.7).
        const auto& wn = Param(p + "o_norm.weight", 1, K);
        double ss = 0;
        for (int64_t e = 0; e < K; ++e) ss += o[hh * K + e] * o[hh * K + e];
        const double inv = 1.0 / std::sqrt(ss / K + c_.rms_norm_eps);
        for (int64_t e = 0; e < K; ++e) o[hh * K + e] = o[hh * K + e] * inv * wn[e] * Sig(z[hh * K + e]);
      }
      out[t] = Lin(p + "o_proj.weight", D, KD, o);
    }
    return out;
  }

  // MLA layer (spec §6), naive form with materialised per-head keys and values.
  std::vector<std::vector<double>> Mla(const std::string& p, const std::vector<std::vector<double>>& h) {
    const int64_t D = c_.hidden_size, H = c_.num_attention_heads, R = c_.kv_lora_rank;
    const int64_t nope = c_.qk_nope_head_dim, rope = c_.qk_rope_head_dim, vd = c_.v_head_dim;
    const int64_t T = h.size();
    std::vector<std::vector<double>> q(T), kn(T), vv(T), kpe(T), out(T);
    for (int64_t t = 0; t < T; ++t) {
      q[t] = Lin(p + "q_proj.weight", H * (nope + rope), D, h[t]);
      auto kv = Lin(p + "kv_a_proj_with_mqa.weight", R + rope, D, h[t]);
      std::vector<double> craw(kv.begin(), kv.begin() + R);
      kpe[t].assign(kv.begin() + R, kv.end());
      const auto& wn = Param(p + "kv_a_layernorm.weight", 1, R);
      double ss = 0;
      for (double v : craw) ss += v * v;
      const double inv = 1.0 / std::sqrt(ss / R + c_.mla_kv_norm_eps);
      for (int64_t i = 0; i < R; ++i) craw[i] = craw[i] * inv * wn[i];
      auto kvb = Lin(p + "kv_b_proj.weight", H * (nope + vd), R, craw);
      kn[t].resize(H * nope);
      vv[t].resize(H * vd);
      for (int64_t hh = 0; hh < H; ++hh) {
        for (int64_t i = 0; i < nope; ++i) kn[t][hh * nope + i] = kvb[hh * (nope + vd) + i];
        for (int64_t i = 0; i < vd; ++i) vv[t][hh * vd + i] = kvb[hh * (nope + vd) + nope + i];
      }
    }
    const double scale = 1.0 / std::sqrt(static_cast<double>(nope + rope));
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> o(H * vd, 0.0);
      for (int64_t hh = 0; hh < H; ++hh) {
        std::vector<double> sc(t + 1);
        double mx = -1e300;
        for (int64_t tau = 0; tau <= t; ++tau) {
          double s = 0;
          for (int64_t i = 0; i < nope; ++i) s += q[t][hh * (nope + rope) + i] * kn[tau][hh * nope + i];
          for (int64_t i = 0; i < rope; ++i) s += q[t][hh * (nope + rope) + nope + i] * kpe[tau][i];
          sc[tau] = s * scale;
          mx = std::max(mx, sc[tau]);
        }
        double z = 0;
        for (auto& s : sc) z += (s = std::exp(s - mx));
        for (int64_t tau = 0; tau <= t; ++tau)
          for (int64_t i = 0; i < vd; ++i) o[hh * vd + i] += sc[tau] / z * vv[tau][hh * vd + i];
      }
      out[t] = Lin(p + "o_proj.weight", D, H * vd, o);
    }
    return out;
  }

  std::vector<double> Swiglu(const std::string& g, const std::string& u, const std::string& d,
                             int64_t inter, const std::vector<double>& x) {
    const int64_t D = c_.hidden_size;
    auto a = Lin(g, inter, D, x), b = Lin(u, inter, D, x);
    for (int64_t i = 0; i < inter; ++i) a[i] = Silu(a[i]) * b[i];
    return Lin(d, D, inter, a);
  }

  // FFN (spec §7): dense on layer 0, else MoE + shared expert.
  std::vector<double> Ffn(int64_t l, const std::vector<double>& x) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    if (!c_.IsMoe(l)) {
      return Swiglu(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight",
                    c_.intermediate_size, x);
    }
    const std::string m = p + "block_sparse_moe.";
    const int64_t E = c_.num_experts, D = c_.hidden_size;
    auto logits = Lin(m + "gate.weight", E, D, x);
    const auto& bias = Param(m + "gate.e_score_correction_bias", 1, E);
    std::vector<std::pair<double, int64_t>> sel;
    for (int64_t e = 0; e < E; ++e) sel.push_back({Sig(logits[e]) + bias[e], e});
    std::stable_sort(sel.begin(), sel.end(), [](auto& a, auto& b) { return a.first > b.first; });
    double sum = 0;
    std::vector<double> w(c_.num_experts_per_token);
    for (int64_t j = 0; j < c_.num_experts_per_token; ++j) {
      w[j] = biased_ ? sel[j].first : Sig(logits[sel[j].second]);
      sum += w[j];
    }
    auto y = Swiglu(m + "shared_experts.gate_proj.weight", m + "shared_experts.up_proj.weight",
                    m + "shared_experts.down_proj.weight", c_.moe_intermediate_size, x);
    for (int64_t j = 0; j < c_.num_experts_per_token; ++j) {
      const std::string e = m + "experts." + std::to_string(sel[j].second) + ".";
      auto ye = Swiglu(e + "w1.weight", e + "w3.weight", e + "w2.weight", c_.moe_intermediate_size, x);
      const double wj = w[j] / (sum + 1e-20) * c_.routed_scaling_factor;
      for (int64_t i = 0; i < D; ++i) y[i] += wj * ye[i];
    }
    return y;
  }

  ModelConfig c_;
  bool biased_;
  TensorSource src_;
  std::map<std::string, std::vector<double>> w_;
};

// ---------------------------------------------------------------- helpers
std::vector<int32_t> Tokens(int64_t n, uint64_t seed, int64_t vocab) {
  std::vector<int32_t> t(n);
  uint64_t s = seed;
  for (auto& x : t) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<int32_t>((s >> 33) % vocab);
  }
  return t;
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  EXPECT_EQ(a.size(), b.size());
  return num / std::max(den, 1e-30);
}

struct Engine {
  explicit Engine(const ModelConfig& c, CpuBackendOptions bo = {}, ModelOptions mo = {},
                  uint64_t seed = 11)
      : backend(bo) {
    model = Model::Create(c, RandomTensorSource(seed), &backend, mo).value();
  }
  // Logits of every token, fed in pieces of the given sizes (each piece one Forward).
  std::vector<float> Run(const std::vector<int32_t>& toks, const std::vector<int64_t>& pieces,
                         SequenceState* state_out = nullptr) {
    SequenceState st = model->NewState();
    std::vector<float> all;
    int64_t at = 0;
    for (int64_t n : pieces) {
      ForwardItem it{&st, absl::MakeConstSpan(toks.data() + at, n), true};
      ForwardOutput out;
      EXPECT_TRUE(model->Forward(absl::MakeSpan(&it, 1), &out).ok());
      all.insert(all.end(), out.logits[0].begin(), out.logits[0].end());
      at += n;
    }
    if (state_out) *state_out = st;
    return all;
  }
  CpuBackend backend;
  std::unique_ptr<Model> model;
};

// ---------------------------------------------------------------- tests
TEST(Model, MatchesFp64ReferenceAcrossChunkBoundaries) {
  const ModelConfig c = MicroConfig();
  RefModel ref(c, 11, /*biased=*/false);
  // Chunk 16 so that T = 40 crosses chunk boundaries; MLA prefill takes the naive path.
  ModelOptions mo;
  mo.kda_chunk = 16;
  CpuBackendOptions bo;
  bo.kda_recurrent_max_tokens = 1;
  Engine eng(c, bo, mo);
  const auto toks = Tokens(40, 5, c.vocab_size);
  auto got = eng.Run(toks, {40});
  auto want = ref.Run(toks);
  std::vector<float> wantf;
  for (auto& row : want) wantf.insert(wantf.end(), row.begin(), row.end());
  EXPECT_LT(MaxRelDiff(got, wantf), kRefTol);
  // And token by token (recurrent KDA, absorbed MLA).
  auto stepped = eng.Run(toks, std::vector<int64_t>(40, 1));
  EXPECT_LT(MaxRelDiff(stepped, wantf), kRefTol);
}

TEST(Model, HfParityMoeConventionDiffersAndMatchesReference) {
  const ModelConfig c = MicroConfig();
  ModelOptions mo;
  mo.moe_convention = MoeWeightConvention::kBiased;
  Engine biased(c, {}, mo), unbiased(c);
  RefModel ref(c, 11, /*biased=*/true);
  const auto toks = Tokens(9, 6, c.vocab_size);
  auto got = biased.Run(toks, {9});
  std::vector<float> wantf;
  for (auto& row : ref.Run(toks)) wantf.insert(wantf.end(), row.begin(), row.end());
  EXPECT_LT(MaxRelDiff(got, wantf), kRefTol);
  EXPECT_GT(MaxRelDiff(unbiased.Run(toks, {9}), got), 1e-3);  // the switch matters
}

TEST(Model, PrefillThenDecodeEqualsOneShotPrefill) {
  const ModelConfig c = MicroConfig();
  Engine eng(c);
  const auto toks = Tokens(150, 7, c.vocab_size);
  const auto one_shot = eng.Run(toks, {150});
  // prefill(T) then decode one token at a time, for several T.
  for (int64_t T : {1, 3, 63, 64, 65, 130}) {
    std::vector<int64_t> pieces = {T};
    for (int64_t i = T; i < 150; ++i) pieces.push_back(1);
    EXPECT_LT(MaxRelDiff(eng.Run(toks, pieces), one_shot), kPathTol) << "T=" << T;
  }
}

TEST(Model, SplitPrefillAtEveryKindOfBoundary) {
  const ModelConfig c = MicroConfig();
  Engine eng(c);
  const auto toks = Tokens(200, 8, c.vocab_size);
  const auto one_shot = eng.Run(toks, {200});
  for (std::vector<int64_t> pieces :
       {std::vector<int64_t>{1, 199}, {30, 170}, {64, 136}, {63, 1, 136}, {65, 64, 71},
        {128, 72}, {100, 0, 100}}) {
    EXPECT_LT(MaxRelDiff(eng.Run(toks, pieces), one_shot), kPathTol) << pieces[0];
  }
}

TEST(Model, ChunkAndRecurrentPathsAgree) {
  const ModelConfig c = MicroConfig();
  CpuBackendOptions rec;
  rec.kda_recurrent_max_tokens = 1 << 30;
  rec.mla_naive_min_rows = 1 << 30;  // absorbed MLA everywhere
  CpuBackendOptions chk;
  chk.kda_recurrent_max_tokens = 0;
  chk.mla_naive_min_rows = 1;  // naive MLA everywhere
  Engine a(c, rec), b(c, chk);
  const auto toks = Tokens(130, 9, c.vocab_size);
  EXPECT_LT(MaxRelDiff(a.Run(toks, {130}), b.Run(toks, {130})), kPathTol);
}

TEST(Model, BatchedSequencesAreIndependent) {
  const ModelConfig c = MicroConfig();
  Engine eng(c);
  const std::vector<std::vector<int32_t>> seqs = {Tokens(5, 1, 64), Tokens(70, 2, 64), {},
                                                  Tokens(1, 3, 64), Tokens(33, 4, 64)};
  std::vector<SequenceState> states(seqs.size(), eng.model->NewState());
  std::vector<ForwardItem> items;
  for (size_t i = 0; i < seqs.size(); ++i) items.push_back({&states[i], seqs[i], true});
  ForwardOutput out;
  ASSERT_TRUE(eng.model->Forward(absl::MakeSpan(items), &out).ok());
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].empty()) {
      EXPECT_TRUE(out.logits[i].empty());
      EXPECT_EQ(states[i].num_tokens, 0);
      continue;
    }
    EXPECT_LT(MaxRelDiff(out.logits[i], eng.Run(seqs[i], {static_cast<int64_t>(seqs[i].size())})),
              kPathTol) << i;
  }
  // Mixed batch: one sequence decodes while another prefills.
  const auto d0 = Tokens(1, 20, 64), p3 = Tokens(40, 21, 64);
  std::vector<ForwardItem> mixed = {{&states[0], d0, true}, {&states[3], p3, true}};
  ASSERT_TRUE(eng.model->Forward(absl::MakeSpan(mixed), &out).ok());
  auto t0 = seqs[0];
  auto extra = Tokens(1, 20, 64);
  t0.insert(t0.end(), extra.begin(), extra.end());
  auto alone = eng.Run(t0, {6});
  std::vector<float> last(alone.end() - c.vocab_size, alone.end());
  EXPECT_LT(MaxRelDiff(out.logits[0], last), kPathTol);
}

TEST(Model, BadInputIsRejectedBeforeStateChanges) {
  const ModelConfig c = MicroConfig();
  Engine eng(c);
  SequenceState st = eng.model->NewState();
  std::vector<int32_t> bad = {1, 2, 64};
  ForwardItem it{&st, bad, false};
  ForwardOutput out;
  absl::Status s = eng.model->Forward(absl::MakeSpan(&it, 1), &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("token id 64"), std::string::npos) << s.message();
  EXPECT_EQ(st.num_tokens, 0);
  for (float v : st.kda[0].recurrent) ASSERT_EQ(v, 0.0f);
  SequenceState wrong;  // no layers
  const auto two = Tokens(2, 1, 64);
  ForwardItem it2{&wrong, two, false};
  EXPECT_EQ(eng.model->Forward(absl::MakeSpan(&it2, 1), &out).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Model, LayerDoneCallbackReportsEveryLayerInOrderWithItsStateFinal) {
  const ModelConfig c = MicroConfig();
  Engine eng(c);
  const auto toks = Tokens(20, 12, 64);
  SequenceState st = eng.model->NewState();
  ForwardItem it{&st, toks, false};
  ForwardOutput out;
  std::vector<int64_t> seen;
  std::vector<float> kda0_at_callback;
  ASSERT_TRUE(eng.model->Forward(absl::MakeSpan(&it, 1), &out, [&](int64_t layer) {
    seen.push_back(layer);
    if (layer == 0) kda0_at_callback = st.kda[0].recurrent;
  }).ok());
  EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(kda0_at_callback, st.kda[0].recurrent);  // layer 0's state was already final
}

TEST(Model, CausalityChangingATokenLeavesEarlierLogits) {
  const ModelConfig c = MicroConfig();
  Engine eng(c);
  auto a = Tokens(50, 10, 64);
  auto b = a;
  b[30] = (b[30] + 1) % 64;
  auto la = eng.Run(a, {50}), lb = eng.Run(b, {50});
  for (int64_t i = 0; i < 30 * 64; ++i) ASSERT_EQ(la[i], lb[i]) << i;
  double diff = 0;
  for (int64_t i = 30 * 64; i < 50 * 64; ++i) diff = std::max(diff, std::fabs(la[i] - lb[i]) * 1.0);
  EXPECT_GT(diff, 1e-4);
}

// Vector D of kda_test_vectors.md §5 and a tie.
TEST(MoeRoute, VectorDBothConventionsAndTies) {
  const float logits[] = {0, 1, -1, 2};
  const float bias[] = {0.5f, 0, 0.3f, -1.0f};
  MoeParams p;
  p.num_experts = 4;
  p.top_k = 2;
  p.routed_scaling_factor = 2.446;
  int32_t idx[2];
  float w[2];
  MoeRoute(logits, bias, p, idx, w);
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 1);
  EXPECT_NEAR(w[0], 0.993453943809, 1e-6);
  EXPECT_NEAR(w[1], 1.452546056191, 1e-6);
  p.biased_weights = true;
  MoeRoute(logits, bias, p, idx, w);
  EXPECT_NEAR(w[0], 1.413008219477, 1e-6);
  EXPECT_NEAR(w[1], 1.032991780523, 1e-6);
  // Tie between experts 1 and 3 for the second slot: the lower id wins.
  const float tl[] = {3, 0, -2, 0};
  const float zb[] = {0, 0, 0, 0};
  p.biased_weights = false;
  MoeRoute(tl, zb, p, idx, w);
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 1);
}

}  // namespace
}  // namespace kl
