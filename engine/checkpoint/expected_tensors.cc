// Tensor inventory of spec §2, generated from a ModelConfig.
#include "engine/checkpoint/expected_tensors.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace kl {
namespace {

class SpecList {
 public:
  explicit SpecList(std::vector<TensorSpec>* out) : out_(out) {}

  void Add(std::string name, std::vector<int64_t> shape, TensorKind kind = TensorKind::kLinear,
           std::vector<int64_t> alt_shape = {}) {
    TensorSpec s;
    s.name = std::move(name);
    s.shape = std::move(shape);
    s.alt_shape = std::move(alt_shape);
    s.kind = kind;
    s.fp32 = kind == TensorKind::kALog || kind == TensorKind::kDtBias ||
             kind == TensorKind::kScoreBias;
    out_->push_back(std::move(s));
  }

 private:
  std::vector<TensorSpec>* out_;
};

void AddKda(const ModelConfig& c, const std::string& p, SpecList* s) {
  const int64_t d = c.hidden_size, h = c.kda_num_heads, k = c.kda_head_dim, dim = c.KdaDim();
  const int64_t w = c.short_conv_kernel_size;
  s->Add(p + "q_proj.weight", {dim, d});
  s->Add(p + "k_proj.weight", {dim, d});
  s->Add(p + "v_proj.weight", {dim, d});
  s->Add(p + "q_conv1d.weight", {dim, 1, w}, TensorKind::kConv, {dim, w});
  s->Add(p + "k_conv1d.weight", {dim, 1, w}, TensorKind::kConv, {dim, w});
  s->Add(p + "v_conv1d.weight", {dim, 1, w}, TensorKind::kConv, {dim, w});
  s->Add(p + "A_log", {1, 1, h, 1}, TensorKind::kALog, {h});
  s->Add(p + "dt_bias", {dim}, TensorKind::kDtBias);
  s->Add(p + "f_a_proj.weight", {k, d});
  s->Add(p + "f_b_proj.weight", {dim, k});
  s->Add(p + "b_proj.weight", {h, d});
  s->Add(p + "g_a_proj.weight", {k, d});
  s->Add(p + "g_b_proj.weight", {dim, k});
  s->Add(p + "o_norm.weight", {k}, TensorKind::kNorm);
  s->Add(p + "o_proj.weight", {d, dim});
}

void AddMla(const ModelConfig& c, const std::string& p, SpecList* s) {
  const int64_t d = c.hidden_size, h = c.num_attention_heads, r = c.kv_lora_rank;
  s->Add(p + "q_proj.weight", {h * c.MlaQHeadDim(), d});
  s->Add(p + "kv_a_proj_with_mqa.weight", {c.MlaLatentDim(), d});
  s->Add(p + "kv_a_layernorm.weight", {r}, TensorKind::kNorm);
  s->Add(p + "kv_b_proj.weight", {h * (c.qk_nope_head_dim + c.v_head_dim), r});
  s->Add(p + "o_proj.weight", {d, h * c.v_head_dim});
}

// SwiGLU MLP with gate/up/down naming (dense MLP and shared experts).
void AddMlp(const std::string& p, int64_t d, int64_t inter, SpecList* s) {
  s->Add(p + "gate_proj.weight", {inter, d});
  s->Add(p + "up_proj.weight", {inter, d});
  s->Add(p + "down_proj.weight", {d, inter});
}

void AddMoe(const ModelConfig& c, const std::string& p, SpecList* s) {
  const int64_t d = c.hidden_size, e = c.num_experts, im = c.moe_intermediate_size;
  s->Add(p + "gate.weight", {e, d});
  s->Add(p + "gate.e_score_correction_bias", {e}, TensorKind::kScoreBias);
  for (int64_t x = 0; x < e; ++x) {
    const std::string ep = absl::StrCat(p, "experts.", x, ".");
    s->Add(ep + "w1.weight", {im, d});
    s->Add(ep + "w2.weight", {d, im});
    s->Add(ep + "w3.weight", {im, d});
  }
  if (c.num_shared_experts > 0) AddMlp(p + "shared_experts.", d, im * c.num_shared_experts, s);
}

}  // namespace

int64_t TensorSpec::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c) {
  std::vector<TensorSpec> out;
  SpecList s(&out);
  const int64_t d = c.hidden_size;
  s.Add("model.embed_tokens.weight", {c.vocab_size, d}, TensorKind::kEmbedding);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    s.Add(p + "input_layernorm.weight", {d}, TensorKind::kNorm);
    if (c.IsKda(l)) {
      AddKda(c, p + "self_attn.", &s);
    } else {
      AddMla(c, p + "self_attn.", &s);
    }
    s.Add(p + "post_attention_layernorm.weight", {d}, TensorKind::kNorm);
    if (c.IsMoe(l)) {
      AddMoe(c, p + "block_sparse_moe.", &s);
    } else {
      AddMlp(p + "mlp.", d, c.intermediate_size, &s);
    }
  }
  s.Add("model.norm.weight", {d}, TensorKind::kNorm);
  if (!c.tie_word_embeddings) s.Add("lm_head.weight", {c.vocab_size, d}, TensorKind::kLmHead);
  return out;
}

}  // namespace kl
