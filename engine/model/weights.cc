#include "engine/model/weights.h"

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

class Loader {
 public:
  Loader(const TensorSource& source, Backend* backend) : source_(source), backend_(backend) {}

  absl::Status Get(const std::string& name, int64_t rows, int64_t cols, Weight* out) {
    ASSIGN_OR_RETURN(HostTensor t, source_(name, rows, cols));
    if (t.rows * t.cols != rows * cols) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has ", t.rows * t.cols,
                                                     " elements, expected ", rows * cols));
    }
    t.rows = rows;
    t.cols = cols;
    ASSIGN_OR_RETURN(*out, backend_->UploadWeight(t));
    return absl::OkStatus();
  }

 private:
  const TensorSource& source_;
  Backend* backend_;
};

absl::Status LoadKda(const ModelConfig& c, const std::string& p, Loader& ld, KdaLayerWeights* w) {
  const int64_t D = c.hidden_size, KD = c.KdaDim(), K = c.kda_head_dim, H = c.kda_num_heads;
  const int64_t W = c.short_conv_kernel_size;
  RETURN_IF_ERROR(ld.Get(p + "q_proj.weight", KD, D, &w->q));
  RETURN_IF_ERROR(ld.Get(p + "k_proj.weight", KD, D, &w->k));
  RETURN_IF_ERROR(ld.Get(p + "v_proj.weight", KD, D, &w->v));
  RETURN_IF_ERROR(ld.Get(p + "q_conv1d.weight", KD, W, &w->conv_q));
  RETURN_IF_ERROR(ld.Get(p + "k_conv1d.weight", KD, W, &w->conv_k));
  RETURN_IF_ERROR(ld.Get(p + "v_conv1d.weight", KD, W, &w->conv_v));
  RETURN_IF_ERROR(ld.Get(p + "A_log", 1, H, &w->a_log));
  RETURN_IF_ERROR(ld.Get(p + "dt_bias", 1, KD, &w->dt_bias));
  RETURN_IF_ERROR(ld.Get(p + "f_a_proj.weight", K, D, &w->f_a));
  RETURN_IF_ERROR(ld.Get(p + "f_b_proj.weight", KD, K, &w->f_b));
  RETURN_IF_ERROR(ld.Get(p + "b_proj.weight", H, D, &w->b));
  RETURN_IF_ERROR(ld.Get(p + "g_a_proj.weight", K, D, &w->g_a));
  RETURN_IF_ERROR(ld.Get(p + "g_b_proj.weight", KD, K, &w->g_b));
  RETURN_IF_ERROR(ld.Get(p + "o_norm.weight", 1, K, &w->o_norm));
  return ld.Get(p + "o_proj.weight", D, KD, &w->o);
}

absl::Status LoadMla(const ModelConfig& c, const std::string& p, Loader& ld, MlaLayerWeights* w) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads;
  RETURN_IF_ERROR(ld.Get(p + "q_proj.weight", H * c.MlaQHeadDim(), D, &w->q));
  RETURN_IF_ERROR(ld.Get(p + "kv_a_proj_with_mqa.weight", c.MlaLatentDim(), D, &w->kv_a));
  RETURN_IF_ERROR(ld.Get(p + "kv_a_layernorm.weight", 1, c.kv_lora_rank, &w->kv_a_norm));
  RETURN_IF_ERROR(ld.Get(p + "kv_b_proj.weight", H * (c.qk_nope_head_dim + c.v_head_dim),
                         c.kv_lora_rank, &w->kv_b));
  return ld.Get(p + "o_proj.weight", D, H * c.v_head_dim, &w->o);
}

absl::Status LoadFfn(const ModelConfig& c, int64_t layer, Loader& ld, FfnWeights* w) {
  const int64_t D = c.hidden_size;
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  if (!c.IsMoe(layer)) {
    w->moe = false;
    const int64_t I = c.intermediate_size;
    RETURN_IF_ERROR(ld.Get(p + "mlp.gate_proj.weight", I, D, &w->gate));
    RETURN_IF_ERROR(ld.Get(p + "mlp.up_proj.weight", I, D, &w->up));
    return ld.Get(p + "mlp.down_proj.weight", D, I, &w->down);
  }
  w->moe = true;
  const std::string m = p + "block_sparse_moe.";
  const int64_t E = c.num_experts, I = c.moe_intermediate_size;
  RETURN_IF_ERROR(ld.Get(m + "gate.weight", E, D, &w->router));
  RETURN_IF_ERROR(ld.Get(m + "gate.e_score_correction_bias", 1, E, &w->correction_bias));
  w->w1.resize(E);
  w->w2.resize(E);
  w->w3.resize(E);
  for (int64_t e = 0; e < E; ++e) {
    const std::string x = absl::StrCat(m, "experts.", e, ".");
    RETURN_IF_ERROR(ld.Get(x + "w1.weight", I, D, &w->w1[e]));
    RETURN_IF_ERROR(ld.Get(x + "w3.weight", I, D, &w->w3[e]));
    RETURN_IF_ERROR(ld.Get(x + "w2.weight", D, I, &w->w2[e]));
  }
  if (c.num_shared_experts > 0) {
    const int64_t SI = c.moe_intermediate_size * c.num_shared_experts;
    RETURN_IF_ERROR(ld.Get(m + "shared_experts.gate_proj.weight", SI, D, &w->gate));
    RETURN_IF_ERROR(ld.Get(m + "shared_experts.up_proj.weight", SI, D, &w->up));
    RETURN_IF_ERROR(ld.Get(m + "shared_experts.down_proj.weight", D, SI, &w->down));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& c, const TensorSource& source,
                                         Backend* backend) {
  Loader ld(source, backend);
  ModelWeights w;
  const int64_t D = c.hidden_size;
  RETURN_IF_ERROR(ld.Get("model.embed_tokens.weight", c.vocab_size, D, &w.embed));
  RETURN_IF_ERROR(ld.Get("model.norm.weight", 1, D, &w.final_norm));
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    RETURN_IF_ERROR(ld.Get("lm_head.weight", c.vocab_size, D, &w.lm_head));
  }
  w.layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& L = w.layers[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    RETURN_IF_ERROR(ld.Get(p + "input_layernorm.weight", 1, D, &L.input_norm));
    RETURN_IF_ERROR(ld.Get(p + "post_attention_layernorm.weight", 1, D, &L.post_norm));
    if (c.IsKda(i)) {
      RETURN_IF_ERROR(LoadKda(c, p + "self_attn.", ld, &L.kda));
    } else {
      RETURN_IF_ERROR(LoadMla(c, p + "self_attn.", ld, &L.mla));
    }
    RETURN_IF_ERROR(LoadFfn(c, i, ld, &L.ffn));
  }
  return w;
}

}  // namespace kl
