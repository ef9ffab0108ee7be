#include "engine/config/model_config.h"

#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gtest/gtest.h"

namespace kl {
namespace {

using Json = nlohmann::json;

// config.json of moonshotai/Kimi-Linear-48B-A3B-Instruct (spec §1.1), verbatim layout.
constexpr char kKimi48BConfigJson[] = R"json({
  "architectures": [
    "KimiLinearForCausalLM"
  ],
  "auto_map": {
    "AutoConfig": "configuration_kimi.KimiLinearConfig",
    "AutoModel": "modeling_kimi.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"
  },
  "bos_token_id": 163584,
  "dtype": "bfloat16",
  "eos_token_id": 163586,
  "first_k_dense_replace": 1,
  "head_dim": 72,
  "hidden_act": "silu",
  "hidden_size": 2304,
  "initializer_range": 0.02,
  "intermediate_size": 9216,
  "kv_lora_rank": 512,
  "linear_attn_config": {
    "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
    "head_dim": 128,
    "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
    "num_heads": 32,
    "short_conv_kernel_size": 4
  },
  "mla_use_nope": true,
  "model_max_length": 1048576,
  "model_type": "kimi_linear",
  "moe_intermediate_size": 1024,
  "moe_layer_freq": 1,
  "moe_renormalize": true,
  "moe_router_activation_func": "sigmoid",
  "num_attention_heads": 32,
  "num_expert_group": 1,
  "num_experts": 256,
  "num_experts_per_token": 8,
  "num_hidden_layers": 27,
  "num_key_value_heads": 32,
  "num_nextn_predict_layers": 0,
  "num_shared_experts": 1,
  "pad_token_id": 163839,
  "q_lora_rank": null,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "routed_scaling_factor": 2.446,
  "tie_word_embeddings": false,
  "topk_group": 1,
  "transformers_version": "4.56.2",
  "use_cache": true,
  "use_grouped_topk": true,
  "v_head_dim": 128,
  "vocab_size": 163840
}
)json";

// Field-by-field equality with a readable failure.
void ExpectSameConfig(const ModelConfig& a, const ModelConfig& b) {
#define KL_EXPECT_FIELD(f) EXPECT_EQ(a.f, b.f) << #f
  KL_EXPECT_FIELD(model_type);
  KL_EXPECT_FIELD(hidden_size);
  KL_EXPECT_FIELD(num_hidden_layers);
  KL_EXPECT_FIELD(vocab_size);
  KL_EXPECT_FIELD(tie_word_embeddings);
  KL_EXPECT_FIELD(rms_norm_eps);
  KL_EXPECT_FIELD(torch_dtype);
  KL_EXPECT_FIELD(bos_token_id);
  KL_EXPECT_FIELD(eos_token_id);
  KL_EXPECT_FIELD(pad_token_id);
  KL_EXPECT_FIELD(model_max_length);
  KL_EXPECT_FIELD(intermediate_size);
  KL_EXPECT_FIELD(first_k_dense_replace);
  KL_EXPECT_FIELD(moe_layer_freq);
  KL_EXPECT_FIELD(num_experts);
  KL_EXPECT_FIELD(num_experts_per_token);
  KL_EXPECT_FIELD(num_shared_experts);
  KL_EXPECT_FIELD(moe_intermediate_size);
  KL_EXPECT_FIELD(moe_renormalize);
  KL_EXPECT_FIELD(routed_scaling_factor);
  KL_EXPECT_FIELD(num_expert_group);
  KL_EXPECT_FIELD(topk_group);
  KL_EXPECT_FIELD(num_attention_heads);
  KL_EXPECT_FIELD(kv_lora_rank);
  KL_EXPECT_FIELD(qk_nope_head_dim);
  KL_EXPECT_FIELD(qk_rope_head_dim);
  KL_EXPECT_FIELD(v_head_dim);
  KL_EXPECT_FIELD(mla_use_nope);
  KL_EXPECT_FIELD(mla_kv_norm_eps);
  KL_EXPECT_FIELD(kda_num_heads);
  KL_EXPECT_FIELD(kda_head_dim);
  KL_EXPECT_FIELD(short_conv_kernel_size);
  KL_EXPECT_FIELD(layer_kinds);
#undef KL_EXPECT_FIELD
}

TEST(ModelConfig, ParsesReal48BConfig) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kKimi48BConfigJson);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectSameConfig(*c, Kimi48BConfig());
  EXPECT_EQ(c->KdaDim(), 4096);
  EXPECT_EQ(c->MlaQHeadDim(), 192);
  EXPECT_EQ(c->MlaLatentDim(), 576);
  EXPECT_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_EQ(c->mla_kv_norm_eps, 1e-6);
}

TEST(ModelConfig, LayerMapIsZeroBased) {
  const ModelConfig c = Kimi48BConfig();
  std::vector<int64_t> kda, mla;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) (c.IsKda(l) ? kda : mla).push_back(l);
  EXPECT_EQ(kda, (std::vector<int64_t>{0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21,
                                       22, 24, 25}));
  EXPECT_EQ(mla, (std::vector<int64_t>{3, 7, 11, 15, 19, 23, 26}));
  EXPECT_EQ(c.NumKdaLayers(), 20);
  EXPECT_EQ(c.NumMlaLayers(), 7);
  EXPECT_FALSE(c.IsMoe(0));
  for (int64_t l = 1; l < 27; ++l) EXPECT_TRUE(c.IsMoe(l)) << l;
}

TEST(ModelConfig, ParameterCountMatchesSpec) {
  EXPECT_EQ(ParameterCount(Kimi48BConfig()), 49122681728LL);
  ModelConfig tied = Kimi48BConfig();
  tied.tie_word_embeddings = true;
  EXPECT_EQ(ParameterCount(tied), 49122681728LL - 163840LL * 2304);
  const int64_t tiny = ParameterCount(TinyConfig());
  const int64_t small = ParameterCount(Small100MConfig());
  std::printf("ParameterCount: tiny %lld, small100m %lld\n", static_cast<long long>(tiny),
              static_cast<long long>(small));
  EXPECT_EQ(tiny, 6268196);
  EXPECT_EQ(small, 109999708);
  EXPECT_GT(small, 90'000'000);
  EXPECT_LT(small, 115'000'000);
}

TEST(ModelConfig, PresetsAreValidAndShaped) {
  for (const ModelConfig& c : {Kimi48BConfig(), TinyConfig(), Small100MConfig()}) {
    EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  }
  const ModelConfig tiny = TinyConfig();
  EXPECT_EQ(tiny.layer_kinds, (std::vector<LayerKind>{LayerKind::kKda, LayerKind::kKda,
                                                      LayerKind::kKda, LayerKind::kMla}));
  EXPECT_EQ(tiny.bos_token_id, 4096 - 256);
  EXPECT_EQ(tiny.eos_token_id, 4096 - 254);
  EXPECT_EQ(tiny.pad_token_id, 4095);
  const ModelConfig small = Small100MConfig();
  EXPECT_EQ(small.layer_kinds,
            (std::vector<LayerKind>{LayerKind::kKda, LayerKind::kKda, LayerKind::kKda,
                                    LayerKind::kMla, LayerKind::kKda, LayerKind::kKda,
                                    LayerKind::kKda, LayerKind::kMla}));
  // The 48B ids follow the same rule.
  const ModelConfig big = Kimi48BConfig();
  EXPECT_EQ(big.bos_token_id, big.vocab_size - 256);
  EXPECT_EQ(big.eos_token_id, big.vocab_size - 254);
}

TEST(ModelConfig, JsonRoundTrip) {
  ModelConfig odd = TinyConfig();
  odd.mla_kv_norm_eps = 1e-5;  // non-default: must be written
  odd.tie_word_embeddings = true;
  odd.pad_token_id = -1;       // absent: written as null
  odd.torch_dtype = "float32";
  for (const ModelConfig& c : {Kimi48BConfig(), TinyConfig(), Small100MConfig(), odd}) {
    const std::string text = ModelConfigToJson(c);
    absl::StatusOr<ModelConfig> back = ParseModelConfig(text);
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
    ExpectSameConfig(*back, c);
    EXPECT_EQ(ModelConfigToJson(*back), text);
  }
}

TEST(ModelConfig, ToJsonUsesHfFieldNames) {
  const Json j = Json::parse(ModelConfigToJson(Kimi48BConfig()));
  const Json real = Json::parse(kKimi48BConfigJson);
  // Every field the real file has is written with the same value (transformers_version aside).
  for (auto it = real.begin(); it != real.end(); ++it) {
    if (it.key() == "transformers_version") continue;
    ASSERT_TRUE(j.contains(it.key())) << it.key();
    EXPECT_EQ(j[it.key()], it.value()) << it.key();
  }
}

TEST(ModelConfig, AcceptsHfVariants) {
  Json j = Json::parse(kKimi48BConfigJson);
  j.erase("dtype");
  j["torch_dtype"] = "bfloat16";
  j["eos_token_id"] = Json::array({163586, 163585});  // HF allows a list
  j["bos_token_id"] = nullptr;
  absl::StatusOr<ModelConfig> c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->eos_token_id, 163586);
  EXPECT_EQ(c->bos_token_id, -1);
}

struct BadCase {
  const char* name;
  std::function<void(Json&)> mutate;
  const char* expected;  // substring of the message, after "config.json: "
};

TEST(ModelConfig, RejectsBadConfigsNamingTheField) {
  const std::vector<BadCase> cases = {
      {"model_type", [](Json& j) { j["model_type"] = "deepseek_v3"; }, "model_type is \"deepseek_v3\""},
      {"missing model_type", [](Json& j) { j.erase("model_type"); }, "model_type is missing"},
      {"kda layer past end", [](Json& j) { j["linear_attn_config"]["kda_layers"].push_back(28); },
       "linear_attn_config.kda_layers lists layer 28 but num_hidden_layers is 27"},
      {"layer 0", [](Json& j) { j["linear_attn_config"]["full_attn_layers"].push_back(0); },
       "linear_attn_config.full_attn_layers lists layer 0 but layer numbers are 1-based"},
      {"duplicate", [](Json& j) { j["linear_attn_config"]["kda_layers"].push_back(1); },
       "linear_attn_config.kda_layers lists layer 1 twice"},
      {"overlap", [](Json& j) { j["linear_attn_config"]["kda_layers"].push_back(4); },
       "layer 4 is in both kda_layers and full_attn_layers"},
      {"gap", [](Json& j) { j["linear_attn_config"]["full_attn_layers"] = {4, 8, 12, 16, 20, 24}; },
       "layer 27 (1-based) is in neither kda_layers nor full_attn_layers"},
      {"kda_layers not a list", [](Json& j) { j["linear_attn_config"]["kda_layers"] = 3; },
       "linear_attn_config.kda_layers must be a list"},
      {"no linear_attn_config", [](Json& j) { j.erase("linear_attn_config"); },
       "linear_attn_config is missing"},
      {"kda heads", [](Json& j) { j["linear_attn_config"]["num_heads"] = 0; },
       "linear_attn_config.num_heads must be in [1,"},
      {"kda head_dim type", [](Json& j) { j["linear_attn_config"]["head_dim"] = "128"; },
       "linear_attn_config.head_dim must be an integer"},
      {"conv width", [](Json& j) { j["linear_attn_config"]["short_conv_kernel_size"] = 0; },
       "linear_attn_config.short_conv_kernel_size must be in [1, 64]"},
      {"lower-bound gate", [](Json& j) { j["linear_attn_config"]["gate_lower_bound"] = -5.0; },
       "linear_attn_config.gate_lower_bound is set"},
      {"hidden_size zero", [](Json& j) { j["hidden_size"] = 0; }, "hidden_size must be in [1,"},
      {"hidden_size string", [](Json& j) { j["hidden_size"] = "2304"; },
       "hidden_size must be an integer, got string"},
      {"hidden_size float", [](Json& j) { j["hidden_size"] = 2304.5; }, "hidden_size must be an integer"},
      {"missing vocab", [](Json& j) { j.erase("vocab_size"); }, "vocab_size is missing (required)"},
      {"num_hidden_layers", [](Json& j) { j["num_hidden_layers"] = -1; }, "num_hidden_layers must be in"},
      {"top-k > experts", [](Json& j) { j["num_experts_per_token"] = 300; },
       "num_experts_per_token is 300 but must be in [1, num_experts = 256]"},
      {"top-k zero", [](Json& j) { j["num_experts_per_token"] = 0; }, "num_experts_per_token is 0"},
      {"expert groups", [](Json& j) { j["num_expert_group"] = 3; },
       "num_expert_group is 3 but must be >= 1 and divide num_experts = 256"},
      {"topk_group", [](Json& j) { j["topk_group"] = 2; },
       "topk_group is 2 but must be in [1, num_expert_group = 1]"},
      {"groups too narrow", [](Json& j) { j["num_expert_group"] = 64; },
       "num_experts_per_token is 8 but topk_group 1 of num_expert_group 64 leaves only 4"},
      {"moe width", [](Json& j) { j["moe_intermediate_size"] = 0; }, "moe_intermediate_size must be in"},
      {"shared experts", [](Json& j) { j["num_shared_experts"] = -1; }, "num_shared_experts must be in"},
      {"scaling", [](Json& j) { j["routed_scaling_factor"] = 0; }, "routed_scaling_factor must be positive"},
      {"dense width", [](Json& j) { j["intermediate_size"] = 0; }, "intermediate_size must be in"},
      {"first_k_dense", [](Json& j) { j["first_k_dense_replace"] = 28; },
       "first_k_dense_replace is 28 but must be in [0, num_hidden_layers = 27]"},
      {"moe freq", [](Json& j) { j["moe_layer_freq"] = 0; }, "moe_layer_freq must be in"},
      {"q_lora_rank", [](Json& j) { j["q_lora_rank"] = 1536; },
       "q_lora_rank is 1536 but only q_lora_rank null"},
      {"rotary MLA", [](Json& j) { j["mla_use_nope"] = false; },
       "mla_use_nope is false but only NoPE MLA"},
      {"kv_lora_rank", [](Json& j) { j["kv_lora_rank"] = -1; }, "kv_lora_rank must be in"},
      {"qk_rope", [](Json& j) { j["qk_rope_head_dim"] = 0; }, "qk_rope_head_dim must be in"},
      {"v_head_dim", [](Json& j) { j.erase("v_head_dim"); }, "v_head_dim is missing"},
      {"mla heads", [](Json& j) { j["num_attention_heads"] = 0; }, "num_attention_heads must be in"},
      {"bos id", [](Json& j) { j["bos_token_id"] = 999999; },
       "bos_token_id is 999999 but vocab_size is 163840"},
      {"eos id", [](Json& j) { j["eos_token_id"] = -3; }, "eos_token_id is -3"},
      {"eps", [](Json& j) { j["rms_norm_eps"] = -1e-5; }, "rms_norm_eps must be in (0, 1]"},
      {"dtype", [](Json& j) { j["dtype"] = "int8"; }, "dtype is \"int8\""},
      {"activation", [](Json& j) { j["hidden_act"] = "gelu"; }, "hidden_act is \"gelu\""},
      {"router", [](Json& j) { j["moe_router_activation_func"] = "softmax"; },
       "moe_router_activation_func is \"softmax\""},
      {"renormalize type", [](Json& j) { j["moe_renormalize"] = 1; }, "moe_renormalize must be true or false"},
      {"max length", [](Json& j) { j["model_max_length"] = 0; }, "model_max_length must be positive"},
      {"not an object", [](Json& j) { j = Json::array(); }, "top level must be a JSON object"},
  };
  for (const BadCase& bc : cases) {
    Json j = Json::parse(kKimi48BConfigJson);
    bc.mutate(j);
    absl::StatusOr<ModelConfig> c = ParseModelConfig(j.dump());
    ASSERT_FALSE(c.ok()) << bc.name;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << bc.name;
    const std::string msg(c.status().message());
    EXPECT_EQ(msg.rfind("config.json: ", 0), 0u) << bc.name << ": " << msg;
    EXPECT_NE(msg.find(bc.expected), std::string::npos)
        << bc.name << ": got \"" << msg << "\", want \"" << bc.expected << "\"";
  }
}

TEST(ModelConfig, RejectsMalformedJson) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig("{\"model_type\": \"kimi_linear\",");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c.status().message(), "config.json: not valid JSON");
}

TEST(ModelConfig, ValidateCatchesProgrammaticMistakes) {
  ModelConfig c = TinyConfig();
  c.layer_kinds.pop_back();
  EXPECT_EQ(c.Validate().message(),
            "config.json: linear_attn_config: layer kinds cover 3 layers but num_hidden_layers is 4");
  c = TinyConfig();
  c.num_experts = 0;  // all layers dense: MoE fields no longer checked
  c.num_experts_per_token = 0;
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  c.intermediate_size = 0;
  EXPECT_FALSE(c.Validate().ok());
  // A model without MLA layers does not need MLA dims.
  c = TinyConfig();
  c.layer_kinds.assign(4, LayerKind::kKda);
  c.kv_lora_rank = 0;
  c.mla_use_nope = false;
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
}

TEST(ModelConfig, LoadFromFile) {
  const std::string dir = testing::TempDir();
  const std::string path = dir + "/config.json";
  {
    std::ofstream out(path);
    out << ModelConfigToJson(TinyConfig());
  }
  absl::StatusOr<ModelConfig> c = LoadModelConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectSameConfig(*c, TinyConfig());
  EXPECT_EQ(LoadModelConfig(dir + "/nope.json").status().code(), absl::StatusCode::kNotFound);
  {
    std::ofstream out(path);
    out << "{}";
  }
  c = LoadModelConfig(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(std::string(c.status().message()), path + ": model_type is missing (required)");
}

TEST(ModelConfig, StateFingerprintIsStableAndSelective) {
  const ModelConfig tiny = TinyConfig();
  // Pinned: the value must not change across builds (it is stored in state bundles).
  EXPECT_EQ(StateFingerprint(tiny), 0x12e7d22ea84d3a9aull);
  EXPECT_NE(StateFingerprint(tiny), StateFingerprint(Kimi48BConfig()));
  EXPECT_NE(StateFingerprint(tiny), StateFingerprint(Small100MConfig()));
  ModelConfig c = tiny;
  c.num_experts = 16;  // FFN shape does not affect the state
  c.vocab_size = 8192;
  EXPECT_EQ(StateFingerprint(c), StateFingerprint(tiny));
  for (const std::function<void(ModelConfig&)>& change :
       std::vector<std::function<void(ModelConfig&)>>{
           [](ModelConfig& m) { m.layer_kinds[0] = LayerKind::kMla; },
           [](ModelConfig& m) { m.kda_num_heads = 8; },
           [](ModelConfig& m) { m.kda_head_dim = 32; },
           [](ModelConfig& m) { m.short_conv_kernel_size = 3; },
           [](ModelConfig& m) { m.kv_lora_rank = 32; },
           [](ModelConfig& m) { m.qk_rope_head_dim = 8; },
           [](ModelConfig& m) { m.hidden_size = 128; }}) {
    ModelConfig m = tiny;
    change(m);
    EXPECT_NE(StateFingerprint(m), StateFingerprint(tiny));
  }
}

}  // namespace
}  // namespace kl
