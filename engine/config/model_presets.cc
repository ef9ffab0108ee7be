// Built-in configurations (48B, tiny demo, ~100M benchmark), parameter accounting
// (spec §1.1) and the state fingerprint.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/config/model_config.h"

namespace kl {
namespace {

// Layer kinds from a 1-based list of full-attention (MLA) layers.
std::vector<LayerKind> KindsWithMlaAt(int64_t num_layers, const std::vector<int64_t>& mla_1based) {
  std::vector<LayerKind> kinds(num_layers, LayerKind::kKda);
  for (int64_t l : mla_1based) kinds[l - 1] = LayerKind::kMla;
  return kinds;
}

// Kimi's special ids sit in the 256 reserved slots after the BPE ranks:
// bos = first special, eos = bos + 2 (<|im_end|>), pad = last id.
void SetKimiSpecialIds(ModelConfig* c) {
  c->bos_token_id = c->vocab_size - 256;
  c->eos_token_id = c->vocab_size - 254;
  c->pad_token_id = c->vocab_size - 1;
}

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001b3ull;

uint64_t Fnv1a64(const std::string& s) {
  uint64_t h = kFnvOffset;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= kFnvPrime;
  }
  return h;
}

int64_t KdaLayerParams(const ModelConfig& c) {
  const int64_t d = c.hidden_size, h = c.kda_num_heads, k = c.kda_head_dim, dim = c.KdaDim();
  return 3 * dim * d                    // q/k/v_proj
         + 3 * dim * c.short_conv_kernel_size  // q/k/v_conv1d
         + h + dim                      // A_log, dt_bias
         + 2 * (k * d + dim * k)        // f_a/f_b, g_a/g_b (rank = head_dim)
         + h * d                        // b_proj
         + k                            // o_norm
         + d * dim;                     // o_proj
}

int64_t MlaLayerParams(const ModelConfig& c) {
  const int64_t d = c.hidden_size, h = c.num_attention_heads, r = c.kv_lora_rank;
  return h * c.MlaQHeadDim() * d                       // q_proj
         + c.MlaLatentDim() * d                        // kv_a_proj_with_mqa
         + r                                           // kv_a_layernorm
         + h * (c.qk_nope_head_dim + c.v_head_dim) * r  // kv_b_proj
         + d * h * c.v_head_dim;                       // o_proj
}

int64_t FfnLayerParams(const ModelConfig& c, int64_t layer) {
  const int64_t d = c.hidden_size;
  if (!c.IsMoe(layer)) return 3 * d * c.intermediate_size;
  const int64_t e = c.num_experts, im = c.moe_intermediate_size;
  return e * d + e                                  // router weight + e_score_correction_bias
         + 3 * d * im * c.num_shared_experts        // shared experts (one fused MLP)
         + e * 3 * d * im;                          // routed experts
}

}  // namespace

ModelConfig Kimi48BConfig() {
  ModelConfig c;
  c.hidden_size = 2304;
  c.num_hidden_layers = 27;
  c.vocab_size = 163840;
  c.tie_word_embeddings = false;
  c.rms_norm_eps = 1e-5;
  c.torch_dtype = "bfloat16";
  c.bos_token_id = 163584;
  c.eos_token_id = 163586;
  c.pad_token_id = 163839;
  c.model_max_length = 1048576;
  c.intermediate_size = 9216;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.num_experts = 256;
  c.num_experts_per_token = 8;
  c.num_shared_experts = 1;
  c.moe_intermediate_size = 1024;
  c.moe_renormalize = true;
  c.routed_scaling_factor = 2.446;
  c.num_expert_group = 1;
  c.topk_group = 1;
  c.num_attention_heads = 32;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.mla_use_nope = true;
  c.mla_kv_norm_eps = 1e-6;
  c.kda_num_heads = 32;
  c.kda_head_dim = 128;
  c.short_conv_kernel_size = 4;
  c.layer_kinds = KindsWithMlaAt(27, {4, 8, 12, 16, 20, 24, 27});
  return c;
}

ModelConfig TinyConfig() {
  ModelConfig c;
  c.hidden_size = 256;
  c.num_hidden_layers = 4;
  c.vocab_size = 4096;
  c.tie_word_embeddings = false;
  c.rms_norm_eps = 1e-5;
  SetKimiSpecialIds(&c);
  c.model_max_length = 1048576;
  c.intermediate_size = 512;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.num_experts = 8;
  c.num_experts_per_token = 2;
  c.num_shared_experts = 1;
  c.moe_intermediate_size = 128;
  c.moe_renormalize = true;
  c.routed_scaling_factor = 2.446;
  c.num_attention_heads = 4;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.kda_num_heads = 4;
  c.kda_head_dim = 64;
  c.short_conv_kernel_size = 4;
  c.layer_kinds = KindsWithMlaAt(4, {4});
  return c;
}

ModelConfig Small100MConfig() {
  ModelConfig c;
  c.hidden_size = 768;
  c.num_hidden_layers = 8;
  c.vocab_size = 32000;
  c.tie_word_embeddings = false;
  c.rms_norm_eps = 1e-5;
  SetKimiSpecialIds(&c);
  c.model_max_length = 1048576;
  c.intermediate_size = 2048;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.num_experts = 8;
  c.num_experts_per_token = 2;
  c.num_shared_experts = 1;
  c.moe_intermediate_size = 256;
  c.moe_renormalize = true;
  c.routed_scaling_factor = 2.446;
  c.num_attention_heads = 6;
  c.kv_lora_rank = 256;
  c.qk_nope_head_dim = 64;
  c.qk_rope_head_dim = 32;
  c.v_head_dim = 64;
  c.kda_num_heads = 6;
  c.kda_head_dim = 128;
  c.short_conv_kernel_size = 4;
  c.layer_kinds = KindsWithMlaAt(8, {4, 8});
  return c;
}

int64_t ParameterCount(const ModelConfig& c) {
  const int64_t d = c.hidden_size;
  int64_t n = c.vocab_size * d;                 // embed_tokens
  if (!c.tie_word_embeddings) n += c.vocab_size * d;  // lm_head
  n += (2 * c.num_hidden_layers + 1) * d;       // input/post-attention norms + final norm
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    n += c.IsKda(l) ? KdaLayerParams(c) : MlaLayerParams(c);
    n += FfnLayerParams(c, l);
  }
  return n;
}

uint64_t StateFingerprint(const ModelConfig& c) {
  std::string kinds;
  for (LayerKind k : c.layer_kinds) kinds += (k == LayerKind::kKda ? 'K' : 'M');
  // Version tag first: bump it if the state layout itself changes.
  const std::string text = absl::StrCat(
      "kl-state-v1;layers=", kinds, ";hidden=", c.hidden_size, ";kda_heads=", c.kda_num_heads,
      ";kda_head_dim=", c.kda_head_dim, ";conv=", c.short_conv_kernel_size,
      ";kv_lora_rank=", c.kv_lora_rank, ";qk_rope_head_dim=", c.qk_rope_head_dim);
  return Fnv1a64(text);
}

}  // namespace kl
