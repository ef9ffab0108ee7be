// ModelConfig: the validated, typed form of a Kimi-Linear config.json
// (model_type "kimi_linear"). Parsed once, then passed by const reference.
// Layer indices here are 0-based; the file's linear_attn_config lists are 1-based.
#ifndef KL_ENGINE_CONFIG_MODEL_CONFIG_H_
#define KL_ENGINE_CONFIG_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kl {

enum class LayerKind : uint8_t { kKda = 0, kMla = 1 };

// How MoE routing weights are formed (spec §7 [DISCREPANCY]).
enum class MoeWeightConvention : uint8_t {
  kUnbiased = 0,  // vLLM: weights from sigmoid scores p (default)
  kBiased = 1,    // HF modeling_kimi.py parity: weights from p + correction bias
};

struct ModelConfig {
  // --- global
  std::string model_type = "kimi_linear";
  int64_t hidden_size = 0;          // D
  int64_t num_hidden_layers = 0;
  int64_t vocab_size = 0;
  bool tie_word_embeddings = false;
  double rms_norm_eps = 1e-5;       // decoder norms and KDA o_norm
  std::string torch_dtype = "bfloat16";
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  int64_t pad_token_id = -1;
  int64_t model_max_length = 1 << 20;

  // --- FFN
  int64_t intermediate_size = 0;        // dense MLP
  int64_t first_k_dense_replace = 1;    // layers [0, k) dense, rest MoE
  int64_t moe_layer_freq = 1;
  int64_t num_experts = 0;              // E (0 = no MoE: all dense)
  int64_t num_experts_per_token = 0;    // top-k
  int64_t num_shared_experts = 0;
  int64_t moe_intermediate_size = 0;
  bool moe_renormalize = true;
  double routed_scaling_factor = 1.0;
  int64_t num_expert_group = 1;
  int64_t topk_group = 1;

  // --- MLA
  int64_t num_attention_heads = 0;  // MLA heads
  int64_t kv_lora_rank = 0;         // latent width (512)
  int64_t qk_nope_head_dim = 0;     // 128
  int64_t qk_rope_head_dim = 0;     // 64 (never rotated: NoPE)
  int64_t v_head_dim = 0;           // 128
  bool mla_use_nope = true;
  double mla_kv_norm_eps = 1e-6;    // kv_a_layernorm eps (spec §6: HF default 1e-6)

  // --- KDA (linear_attn_config)
  int64_t kda_num_heads = 0;        // H
  int64_t kda_head_dim = 0;         // K = V
  int64_t short_conv_kernel_size = 4;  // W

  // layer_kinds[i] for i in [0, num_hidden_layers)
  std::vector<LayerKind> layer_kinds;

  // --- derived helpers
  bool IsKda(int64_t layer) const { return layer_kinds[layer] == LayerKind::kKda; }
  bool IsMoe(int64_t layer) const {
    return num_experts > 0 && layer >= first_k_dense_replace &&
           (layer - first_k_dense_replace) % moe_layer_freq == 0;
  }
  int64_t NumKdaLayers() const;
  int64_t NumMlaLayers() const;
  int64_t KdaDim() const { return kda_num_heads * kda_head_dim; }        // 4096
  int64_t MlaQHeadDim() const { return qk_nope_head_dim + qk_rope_head_dim; }  // 192
  int64_t MlaLatentDim() const { return kv_lora_rank + qk_rope_head_dim; }     // 576
  // Bytes of one KDA layer's recurrent state (fp32 [H][K][V]).
  int64_t KdaStateElems() const { return kda_num_heads * kda_head_dim * kda_head_dim; }
  // Elements of one conv tail (one of q/k/v): [W-1][KdaDim] (time-major).
  int64_t ConvTailElems() const { return KdaDim() * (short_conv_kernel_size - 1); }

  // Checks every field and cross-field constraint; the error names the field.
  absl::Status Validate() const;
};

// Parses config.json text. Layer kinds come from linear_attn_config
// (kda_layers / full_attn_layers, 1-based). Returns INVALID_ARGUMENT naming the
// offending field on any inconsistency.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);

// Serialises back to a Hugging Face style config.json (used by the checkpoint maker).
std::string ModelConfigToJson(const ModelConfig& c);

// The full Kimi-Linear-48B-A3B shape (spec §1.1).
ModelConfig Kimi48BConfig();
// The embedded demo model: 4 layers (3 KDA + 1 MLA), hidden 256, small MoE.
ModelConfig TinyConfig();
// About 100M parameters (109,999,708), for CPU benchmarks.
ModelConfig Small100MConfig();

// Number of parameters (tensor elements) of a checkpoint for `c`, counted as in
// spec §1.1: embedding, lm_head (unless tied), decoder norms, every mixer tensor
// (incl. A_log, dt_bias, conv, o_norm, kv_a_layernorm), dense MLPs, routers
// (weight + e_score_correction_bias), shared and routed experts.
// Kimi48BConfig() gives exactly 49,122,681,728. `c` must be valid.
int64_t ParameterCount(const ModelConfig& c);

// Stable 64-bit FNV-1a hash of a canonical text of the fields that determine the
// shape of the per-sequence state (layer kinds, hidden size, KDA heads, head dim,
// conv width, kv_lora_rank, qk_rope_head_dim). Two configs with equal fingerprints
// can exchange state bundles; the value never changes across builds or platforms.
uint64_t StateFingerprint(const ModelConfig& c);

}  // namespace kl

#endif  // KL_ENGINE_CONFIG_MODEL_CONFIG_H_
