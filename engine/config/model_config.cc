// config.json <-> ModelConfig: parsing (nlohmann-json, no exceptions), validation
// and serialisation in the Hugging Face layout. Presets and parameter accounting
// live in model_presets.cc.
#include "engine/config/model_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

using Json = nlohmann::json;

// Any single dimension above this is rejected as implausible; it also keeps every
// product in ParameterCount / tensor sizes far from int64 overflow.
constexpr int64_t kMaxDim = int64_t{1} << 24;

absl::Status Invalid(const std::string& msg) { return absl::InvalidArgumentError(msg); }

std::string TypeName(const Json& j) { return j.type_name(); }

// Typed field readers. `path` is the dotted name used in messages. A missing key
// keeps the default unless `required`; null counts as missing.
absl::Status ReadInt(const Json& obj, const char* key, const std::string& path, bool required,
                     int64_t* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    if (required) return Invalid(absl::StrCat(path, " is missing (required)"));
    return absl::OkStatus();
  }
  if (it->is_number_integer()) {  // covers signed and unsigned
    if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      return Invalid(absl::StrCat(path, " is out of range"));
    }
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }
  return Invalid(absl::StrCat(path, " must be an integer, got ", TypeName(*it), " ", it->dump()));
}

absl::Status ReadDouble(const Json& obj, const char* key, const std::string& path, double* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) {
    return Invalid(absl::StrCat(path, " must be a number, got ", TypeName(*it), " ", it->dump()));
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status ReadBool(const Json& obj, const char* key, const std::string& path, bool* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return Invalid(absl::StrCat(path, " must be true or false, got ", it->dump()));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadString(const Json& obj, const char* key, const std::string& path, bool required,
                        std::string* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    if (required) return Invalid(absl::StrCat(path, " is missing (required)"));
    return absl::OkStatus();
  }
  if (!it->is_string()) {
    return Invalid(absl::StrCat(path, " must be a string, got ", TypeName(*it), " ", it->dump()));
  }
  *out = it->get<std::string>();
  return absl::OkStatus();
}

// Special token ids: an integer, null (-> -1), or a list of integers (HF allows a
// list for eos_token_id; the first entry is used).
absl::Status ReadTokenId(const Json& obj, const char* key, int64_t* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  const Json* v = &*it;
  if (v->is_array()) {
    if (v->empty()) return Invalid(absl::StrCat(key, " is an empty list"));
    v = &(*v)[0];
  }
  if (!v->is_number_integer()) {
    return Invalid(absl::StrCat(key, " must be an integer token id, got ", it->dump()));
  }
  *out = v->get<int64_t>();
  return absl::OkStatus();
}

// Reads a 1-based layer list of linear_attn_config into `layers` (0-based).
absl::Status ReadLayerList(const Json& lac, const char* key, int64_t num_layers,
                           std::vector<int64_t>* layers) {
  const std::string path = absl::StrCat("linear_attn_config.", key);
  auto it = lac.find(key);
  if (it == lac.end() || it->is_null()) {
    return Invalid(absl::StrCat(path, " is missing (required)"));
  }
  if (!it->is_array()) return Invalid(absl::StrCat(path, " must be a list of 1-based layer numbers"));
  std::set<int64_t> seen;
  for (const Json& e : *it) {
    if (!e.is_number_integer()) {
      return Invalid(absl::StrCat(path, " must hold integers, got ", e.dump()));
    }
    const int64_t layer = e.get<int64_t>();
    if (layer < 1) {
      return Invalid(absl::StrCat(path, " lists layer ", layer, " but layer numbers are 1-based"));
    }
    if (layer > num_layers) {
      return Invalid(absl::StrCat(path, " lists layer ", layer, " but num_hidden_layers is ",
                                  num_layers));
    }
    if (!seen.insert(layer).second) {
      return Invalid(absl::StrCat(path, " lists layer ", layer, " twice"));
    }
    layers->push_back(layer - 1);
  }
  return absl::OkStatus();
}

// kda_layers and full_attn_layers must partition 1..N exactly.
absl::Status ParseLayerKinds(const Json& lac, int64_t num_layers, ModelConfig* c) {
  std::vector<int64_t> kda, mla;
  RETURN_IF_ERROR(ReadLayerList(lac, "kda_layers", num_layers, &kda));
  RETURN_IF_ERROR(ReadLayerList(lac, "full_attn_layers", num_layers, &mla));
  std::vector<int> count(num_layers, 0);
  c->layer_kinds.assign(num_layers, LayerKind::kKda);
  for (int64_t l : kda) ++count[l];
  for (int64_t l : mla) {
    if (count[l] != 0) {
      return Invalid(absl::StrCat("linear_attn_config: layer ", l + 1,
                                  " is in both kda_layers and full_attn_layers"));
    }
    ++count[l];
    c->layer_kinds[l] = LayerKind::kMla;
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    if (count[l] == 0) {
      return Invalid(absl::StrCat("linear_attn_config: layer ", l + 1,
                                  " (1-based) is in neither kda_layers nor full_attn_layers"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseLinearAttnConfig(const Json& root, ModelConfig* c) {
  auto it = root.find("linear_attn_config");
  if (it == root.end() || it->is_null()) {
    return Invalid("linear_attn_config is missing (required for kimi_linear)");
  }
  if (!it->is_object()) return Invalid("linear_attn_config must be an object");
  const Json& lac = *it;
  RETURN_IF_ERROR(ReadInt(lac, "num_heads", "linear_attn_config.num_heads", true, &c->kda_num_heads));
  RETURN_IF_ERROR(ReadInt(lac, "head_dim", "linear_attn_config.head_dim", true, &c->kda_head_dim));
  RETURN_IF_ERROR(ReadInt(lac, "short_conv_kernel_size", "linear_attn_config.short_conv_kernel_size",
                          false, &c->short_conv_kernel_size));
  // Later Kimi models (K3) use a lower-bounded sigmoid gate; the 48B model uses the
  // plain softplus gate (spec §1.1 / §3.3), which is the only one implemented.
  auto lb = lac.find("gate_lower_bound");
  if (lb != lac.end() && !lb->is_null()) {
    return Invalid("linear_attn_config.gate_lower_bound is set but only the plain softplus KDA "
                   "gate (no lower bound, as in Kimi-Linear-48B) is supported");
  }
  bool full_rank_gate = false;
  RETURN_IF_ERROR(ReadBool(lac, "use_full_rank_gate", "linear_attn_config.use_full_rank_gate",
                           &full_rank_gate));
  if (full_rank_gate) {
    return Invalid("linear_attn_config.use_full_rank_gate is true but only the low-rank "
                   "f_a/f_b gate of Kimi-Linear-48B is supported");
  }
  return ParseLayerKinds(lac, c->num_hidden_layers, c);
}

absl::Status ParseRoot(const Json& root, ModelConfig* c) {
  if (!root.is_object()) return Invalid("top level must be a JSON object");
  RETURN_IF_ERROR(ReadString(root, "model_type", "model_type", true, &c->model_type));
  if (c->model_type != "kimi_linear") {
    return Invalid(absl::StrCat("model_type is \"", c->model_type, "\" but must be \"kimi_linear\""));
  }
  RETURN_IF_ERROR(ReadInt(root, "hidden_size", "hidden_size", true, &c->hidden_size));
  RETURN_IF_ERROR(ReadInt(root, "num_hidden_layers", "num_hidden_layers", true, &c->num_hidden_layers));
  if (c->num_hidden_layers <= 0 || c->num_hidden_layers > 4096) {
    return Invalid(absl::StrCat("num_hidden_layers must be in [1, 4096], got ", c->num_hidden_layers));
  }
  RETURN_IF_ERROR(ReadInt(root, "vocab_size", "vocab_size", true, &c->vocab_size));
  RETURN_IF_ERROR(ReadBool(root, "tie_word_embeddings", "tie_word_embeddings", &c->tie_word_embeddings));
  RETURN_IF_ERROR(ReadDouble(root, "rms_norm_eps", "rms_norm_eps", &c->rms_norm_eps));
  // transformers >= 4.56 writes "dtype"; older files "torch_dtype".
  RETURN_IF_ERROR(ReadString(root, "torch_dtype", "torch_dtype", false, &c->torch_dtype));
  RETURN_IF_ERROR(ReadString(root, "dtype", "dtype", false, &c->torch_dtype));
  RETURN_IF_ERROR(ReadTokenId(root, "bos_token_id", &c->bos_token_id));
  RETURN_IF_ERROR(ReadTokenId(root, "eos_token_id", &c->eos_token_id));
  RETURN_IF_ERROR(ReadTokenId(root, "pad_token_id", &c->pad_token_id));
  RETURN_IF_ERROR(ReadInt(root, "model_max_length", "model_max_length", false, &c->model_max_length));

  std::string act = "silu";
  RETURN_IF_ERROR(ReadString(root, "hidden_act", "hidden_act", false, &act));
  if (act != "silu") {
    return Invalid(absl::StrCat("hidden_act is \"", act, "\" but only \"silu\" (SwiGLU) is supported"));
  }
  RETURN_IF_ERROR(ReadInt(root, "intermediate_size", "intermediate_size", true, &c->intermediate_size));
  RETURN_IF_ERROR(ReadInt(root, "first_k_dense_replace", "first_k_dense_replace", false,
                          &c->first_k_dense_replace));
  RETURN_IF_ERROR(ReadInt(root, "moe_layer_freq", "moe_layer_freq", false, &c->moe_layer_freq));
  RETURN_IF_ERROR(ReadInt(root, "num_experts", "num_experts", false, &c->num_experts));
  RETURN_IF_ERROR(ReadInt(root, "num_experts_per_token", "num_experts_per_token", false,
                          &c->num_experts_per_token));
  RETURN_IF_ERROR(ReadInt(root, "num_shared_experts", "num_shared_experts", false,
                          &c->num_shared_experts));
  RETURN_IF_ERROR(ReadInt(root, "moe_intermediate_size", "moe_intermediate_size", false,
                          &c->moe_intermediate_size));
  RETURN_IF_ERROR(ReadBool(root, "moe_renormalize", "moe_renormalize", &c->moe_renormalize));
  RETURN_IF_ERROR(ReadDouble(root, "routed_scaling_factor", "routed_scaling_factor",
                             &c->routed_scaling_factor));
  RETURN_IF_ERROR(ReadInt(root, "num_expert_group", "num_expert_group", false, &c->num_expert_group));
  RETURN_IF_ERROR(ReadInt(root, "topk_group", "topk_group", false, &c->topk_group));
  std::string router_act = "sigmoid";
  RETURN_IF_ERROR(ReadString(root, "moe_router_activation_func", "moe_router_activation_func", false,
                             &router_act));
  if (router_act != "sigmoid") {
    return Invalid(absl::StrCat("moe_router_activation_func is \"", router_act,
                                "\" but only \"sigmoid\" routing is supported"));
  }

  RETURN_IF_ERROR(ReadInt(root, "num_attention_heads", "num_attention_heads", true,
                          &c->num_attention_heads));
  auto q_lora = root.find("q_lora_rank");
  if (q_lora != root.end() && !q_lora->is_null()) {
    return Invalid(absl::StrCat("q_lora_rank is ", q_lora->dump(),
                                " but only q_lora_rank null (a plain MLA q_proj, as in "
                                "Kimi-Linear-48B) is supported"));
  }
  RETURN_IF_ERROR(ReadInt(root, "kv_lora_rank", "kv_lora_rank", true, &c->kv_lora_rank));
  RETURN_IF_ERROR(ReadInt(root, "qk_nope_head_dim", "qk_nope_head_dim", true, &c->qk_nope_head_dim));
  RETURN_IF_ERROR(ReadInt(root, "qk_rope_head_dim", "qk_rope_head_dim", true, &c->qk_rope_head_dim));
  RETURN_IF_ERROR(ReadInt(root, "v_head_dim", "v_head_dim", true, &c->v_head_dim));
  RETURN_IF_ERROR(ReadBool(root, "mla_use_nope", "mla_use_nope", &c->mla_use_nope));
  // Not an HF field: written only when it differs from the HF default (spec §6).
  RETURN_IF_ERROR(ReadDouble(root, "mla_kv_norm_eps", "mla_kv_norm_eps", &c->mla_kv_norm_eps));
  return ParseLinearAttnConfig(root, c);
}

absl::Status CheckDim(const char* field, int64_t v, int64_t min = 1) {
  if (v < min || v > kMaxDim) {
    return Invalid(absl::StrCat(field, " must be in [", min, ", ", kMaxDim, "], got ", v));
  }
  return absl::OkStatus();
}

absl::Status CheckEps(const char* field, double v) {
  if (!(v > 0) || !std::isfinite(v) || v > 1) {
    return Invalid(absl::StrCat(field, " must be in (0, 1], got ", v));
  }
  return absl::OkStatus();
}

absl::Status CheckTokenId(const char* field, int64_t id, int64_t vocab) {
  if (id == -1) return absl::OkStatus();  // absent
  if (id < 0 || id >= vocab) {
    return Invalid(absl::StrCat(field, " is ", id, " but vocab_size is ", vocab));
  }
  return absl::OkStatus();
}

absl::Status ValidateGlobal(const ModelConfig& c) {
  if (c.model_type != "kimi_linear") {
    return Invalid(absl::StrCat("model_type is \"", c.model_type, "\" but must be \"kimi_linear\""));
  }
  RETURN_IF_ERROR(CheckDim("hidden_size", c.hidden_size));
  RETURN_IF_ERROR(CheckDim("num_hidden_layers", c.num_hidden_layers));
  RETURN_IF_ERROR(CheckDim("vocab_size", c.vocab_size));
  RETURN_IF_ERROR(CheckEps("rms_norm_eps", c.rms_norm_eps));
  RETURN_IF_ERROR(CheckEps("mla_kv_norm_eps", c.mla_kv_norm_eps));
  if (c.torch_dtype != "bfloat16" && c.torch_dtype != "float16" && c.torch_dtype != "float32") {
    return Invalid(absl::StrCat("dtype is \"", c.torch_dtype,
                                "\" but must be bfloat16, float16 or float32"));
  }
  RETURN_IF_ERROR(CheckTokenId("bos_token_id", c.bos_token_id, c.vocab_size));
  RETURN_IF_ERROR(CheckTokenId("eos_token_id", c.eos_token_id, c.vocab_size));
  RETURN_IF_ERROR(CheckTokenId("pad_token_id", c.pad_token_id, c.vocab_size));
  if (c.model_max_length <= 0) {
    return Invalid(absl::StrCat("model_max_length must be positive, got ", c.model_max_length));
  }
  if (static_cast<int64_t>(c.layer_kinds.size()) != c.num_hidden_layers) {
    return Invalid(absl::StrCat("linear_attn_config: layer kinds cover ", c.layer_kinds.size(),
                                " layers but num_hidden_layers is ", c.num_hidden_layers));
  }
  return absl::OkStatus();
}

absl::Status ValidateFfn(const ModelConfig& c) {
  if (c.first_k_dense_replace < 0 || c.first_k_dense_replace > c.num_hidden_layers) {
    return Invalid(absl::StrCat("first_k_dense_replace is ", c.first_k_dense_replace,
                                " but must be in [0, num_hidden_layers = ", c.num_hidden_layers, "]"));
  }
  RETURN_IF_ERROR(CheckDim("moe_layer_freq", c.moe_layer_freq));
  RETURN_IF_ERROR(CheckDim("num_experts", c.num_experts, 0));
  bool any_dense = false;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) any_dense |= !c.IsMoe(l);
  if (any_dense) RETURN_IF_ERROR(CheckDim("intermediate_size", c.intermediate_size));
  if (c.num_experts == 0) return absl::OkStatus();  // all layers dense; MoE fields unused
  if (c.num_experts_per_token < 1 || c.num_experts_per_token > c.num_experts) {
    return Invalid(absl::StrCat("num_experts_per_token is ", c.num_experts_per_token,
                                " but must be in [1, num_experts = ", c.num_experts, "]"));
  }
  RETURN_IF_ERROR(CheckDim("moe_intermediate_size", c.moe_intermediate_size));
  RETURN_IF_ERROR(CheckDim("num_shared_experts", c.num_shared_experts, 0));
  if (!(c.routed_scaling_factor > 0) || !std::isfinite(c.routed_scaling_factor)) {
    return Invalid(absl::StrCat("routed_scaling_factor must be positive and finite, got ",
                                c.routed_scaling_factor));
  }
  if (c.num_expert_group < 1 || c.num_experts % c.num_expert_group != 0) {
    return Invalid(absl::StrCat("num_expert_group is ", c.num_expert_group,
                                " but must be >= 1 and divide num_experts = ", c.num_experts));
  }
  if (c.topk_group < 1 || c.topk_group > c.num_expert_group) {
    return Invalid(absl::StrCat("topk_group is ", c.topk_group,
                                " but must be in [1, num_expert_group = ", c.num_expert_group, "]"));
  }
  const int64_t selectable = c.topk_group * (c.num_experts / c.num_expert_group);
  if (c.num_experts_per_token > selectable) {
    return Invalid(absl::StrCat("num_experts_per_token is ", c.num_experts_per_token, " but topk_group ",
                                c.topk_group, " of num_expert_group ", c.num_expert_group,
                                " leaves only ", selectable, " selectable experts"));
  }
  return absl::OkStatus();
}

absl::Status ValidateMixers(const ModelConfig& c) {
  if (c.NumMlaLayers() > 0) {
    RETURN_IF_ERROR(CheckDim("num_attention_heads", c.num_attention_heads));
    RETURN_IF_ERROR(CheckDim("kv_lora_rank", c.kv_lora_rank));
    RETURN_IF_ERROR(CheckDim("qk_nope_head_dim", c.qk_nope_head_dim));
    RETURN_IF_ERROR(CheckDim("qk_rope_head_dim", c.qk_rope_head_dim));
    RETURN_IF_ERROR(CheckDim("v_head_dim", c.v_head_dim));
    if (!c.mla_use_nope) {
      return Invalid("mla_use_nope is false but only NoPE MLA (mla_use_nope true, as in "
                     "Kimi-Linear-48B) is implemented; rotary MLA is not");
    }
  }
  if (c.NumKdaLayers() > 0) {
    RETURN_IF_ERROR(CheckDim("linear_attn_config.num_heads", c.kda_num_heads));
    RETURN_IF_ERROR(CheckDim("linear_attn_config.head_dim", c.kda_head_dim));
    if (c.short_conv_kernel_size < 1 || c.short_conv_kernel_size > 64) {
      return Invalid(absl::StrCat("linear_attn_config.short_conv_kernel_size must be in [1, 64], got ",
                                  c.short_conv_kernel_size));
    }
    RETURN_IF_ERROR(CheckDim("linear_attn_config.num_heads * head_dim", c.KdaDim()));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseWithSource(const std::string& json_text, const std::string& source) {
  auto with_source = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(source, ": ", s.message()));
  };
  Json root = Json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return with_source(Invalid("not valid JSON"));
  ModelConfig c;
  if (absl::Status s = ParseRoot(root, &c); !s.ok()) return with_source(s);
  if (absl::Status s = c.Validate(); !s.ok()) {
    // Validate() prefixes "config.json: "; re-prefix with the real source.
    std::string msg(s.message());
    constexpr absl::string_view kPrefix = "config.json: ";
    if (absl::string_view(msg).substr(0, kPrefix.size()) == kPrefix) msg.erase(0, kPrefix.size());
    return absl::Status(s.code(), absl::StrCat(source, ": ", msg));
  }
  return c;
}

Json LayerList(const ModelConfig& c, LayerKind kind) {
  Json list = Json::array();
  for (size_t l = 0; l < c.layer_kinds.size(); ++l) {
    if (c.layer_kinds[l] == kind) list.push_back(static_cast<int64_t>(l + 1));
  }
  return list;
}

Json TokenIdJson(int64_t id) { return id < 0 ? Json(nullptr) : Json(id); }

}  // namespace

int64_t ModelConfig::NumKdaLayers() const {
  return std::count(layer_kinds.begin(), layer_kinds.end(), LayerKind::kKda);
}

int64_t ModelConfig::NumMlaLayers() const {
  return std::count(layer_kinds.begin(), layer_kinds.end(), LayerKind::kMla);
}

absl::Status ModelConfig::Validate() const {
  absl::Status s = ValidateGlobal(*this);
  if (s.ok()) s = ValidateFfn(*this);
  if (s.ok()) s = ValidateMixers(*this);
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("config.json: ", s.message()));
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text) {
  return ParseWithSource(json_text, "config.json");
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open model config ", path));
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading model config ", path));
  return ParseWithSource(buf.str(), path);
}

std::string ModelConfigToJson(const ModelConfig& c) {
  Json j;
  j["architectures"] = Json::array({"KimiLinearForCausalLM"});
  j["auto_map"] = {{"AutoConfig", "configuration_kimi.KimiLinearConfig"},
                   {"AutoModel", "modeling_kimi.KimiLinearModel"},
                   {"AutoModelForCausalLM", "modeling_kimi.KimiLinearForCausalLM"}};
  j["model_type"] = c.model_type;
  j["dtype"] = c.torch_dtype;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["vocab_size"] = c.vocab_size;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["hidden_act"] = "silu";
  j["initializer_range"] = 0.02;
  j["bos_token_id"] = TokenIdJson(c.bos_token_id);
  j["eos_token_id"] = TokenIdJson(c.eos_token_id);
  j["pad_token_id"] = TokenIdJson(c.pad_token_id);
  j["model_max_length"] = c.model_max_length;
  j["use_cache"] = true;
  j["num_nextn_predict_layers"] = 0;

  j["intermediate_size"] = c.intermediate_size;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["moe_layer_freq"] = c.moe_layer_freq;
  j["num_experts"] = c.num_experts;
  j["num_experts_per_token"] = c.num_experts_per_token;
  j["num_shared_experts"] = c.num_shared_experts;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["moe_renormalize"] = c.moe_renormalize;
  j["moe_router_activation_func"] = "sigmoid";
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["use_grouped_topk"] = true;
  j["num_expert_group"] = c.num_expert_group;
  j["topk_group"] = c.topk_group;

  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_attention_heads;
  if (c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0) {
    j["head_dim"] = c.hidden_size / c.num_attention_heads;  // informational; unused
  }
  j["q_lora_rank"] = nullptr;
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["mla_use_nope"] = c.mla_use_nope;
  j["rope_theta"] = 10000.0;
  j["rope_scaling"] = nullptr;
  if (c.mla_kv_norm_eps != 1e-6) j["mla_kv_norm_eps"] = c.mla_kv_norm_eps;

  j["linear_attn_config"] = {{"num_heads", c.kda_num_heads},
                             {"head_dim", c.kda_head_dim},
                             {"short_conv_kernel_size", c.short_conv_kernel_size},
                             {"kda_layers", LayerList(c, LayerKind::kKda)},
                             {"full_attn_layers", LayerList(c, LayerKind::kMla)}};
  return j.dump(2) + "\n";
}

}  // namespace kl
