#include "engine/checkpoint/checkpoint.h"

#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/checkpoint/expected_tensors.h"
#include "engine/checkpoint/safetensors.h"
#include "engine/config/model_config.h"
#include "gtest/gtest.h"
#include "kernels/common/dtype.h"

namespace kl {
namespace {

using Json = nlohmann::json;

std::string TestDir() {
  const std::string dir = absl::StrCat(testing::TempDir(),
                                       testing::UnitTest::GetInstance()->current_test_info()->name());
  ::mkdir(dir.c_str(), 0755);
  return dir;
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Test values k/8 with |k| <= 30: exact in bf16, f16 and f32.
float TestValue(const std::string& name, int64_t i) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return static_cast<float>(static_cast<int64_t>((h + static_cast<uint64_t>(i) * 7) % 61) - 30) / 8;
}

struct Layout {
  DType dtype = DType::kBF16;
  int num_shards = 2;
  bool single_file = false;                 // model.safetensors, no index
  std::string drop;                         // omit this tensor
  std::map<std::string, std::vector<int64_t>> reshape;  // write with another shape
  std::map<std::string, DType> retype;      // write with another dtype
  bool alt_shapes = false;                  // conv as [C, W], A_log as [H]
  std::vector<std::string> extra;           // unknown tensors to add, F32 [4]
  float bump = 0;                           // added to element 0 of every tensor
};

// Writes a checkpoint of ExpectedTensors(config) with TestValue contents.
void WriteTestCheckpoint(const std::string& dir, const ModelConfig& config, const Layout& layout) {
  struct Item {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  std::vector<Item> items;
  for (const TensorSpec& s : ExpectedTensors(config)) {
    if (s.name == layout.drop) continue;
    Item it{s.name, s.fp32 ? DType::kF32 : layout.dtype, s.shape};
    if (layout.alt_shapes && !s.alt_shape.empty()) it.shape = s.alt_shape;
    if (layout.reshape.count(s.name)) it.shape = layout.reshape.at(s.name);
    if (layout.retype.count(s.name)) it.dtype = layout.retype.at(s.name);
    items.push_back(it);
  }
  for (const std::string& e : layout.extra) items.push_back({e, DType::kF32, {4}});
  const int shards = layout.single_file ? 1 : layout.num_shards;
  std::vector<std::vector<TensorToWrite>> per_shard(shards);
  Json weight_map = Json::object();
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const int shard = static_cast<int>(i % shards);
    const std::string file = layout.single_file
                                 ? std::string(kSingleSafetensorsFile)
                                 : absl::StrFormat("model-%05d-of-%05d.safetensors", shard + 1, shards);
    weight_map[it.name] = file;
    const float bump = layout.bump;
    per_shard[shard].push_back({it.name, it.dtype, it.shape, nullptr, [it, bump](void* dst) {
      int64_t n = 1;
      for (int64_t d : it.shape) n *= d;
      for (int64_t j = 0; j < n; ++j) {
        const float v = TestValue(it.name, j) + (j == 0 ? bump : 0.0f);
        switch (it.dtype) {
          case DType::kF32: static_cast<float*>(dst)[j] = v; break;
          case DType::kBF16: static_cast<uint16_t*>(dst)[j] = F32ToBf16(v); break;
          case DType::kF16: static_cast<uint16_t*>(dst)[j] = F32ToF16(v); break;
          case DType::kI64: static_cast<int64_t*>(dst)[j] = static_cast<int64_t>(v); break;
          default: FAIL() << "unsupported test dtype";
        }
      }
    }});
  }
  for (int s = 0; s < shards; ++s) {
    const std::string file = layout.single_file
                                 ? std::string(kSingleSafetensorsFile)
                                 : absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards);
    ASSERT_TRUE(WriteSafetensors(dir + "/" + file, per_shard[s], {{"format", "pt"}}).ok());
  }
  if (!layout.single_file) {
    Json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
    WriteText(dir + "/" + kSafetensorsIndexFile, index.dump(2));
  }
}

absl::Status OpenStatus(const std::string& dir, const ModelConfig& config = TinyConfig()) {
  return Checkpoint::Open(dir, config).status();
}

void ExpectError(const absl::Status& s, absl::StatusCode code, const std::string& want) {
  ASSERT_FALSE(s.ok()) << want;
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_NE(std::string(s.message()).find(want), std::string::npos)
      << "got: " << s.message() << "\nwant: " << want;
}

TEST(ExpectedTensors, Matches48BInventory) {
  const ModelConfig c = Kimi48BConfig();
  const std::vector<TensorSpec> specs = ExpectedTensors(c);
  EXPECT_EQ(specs.size(), 20493u);
  int64_t total = 0;
  std::map<std::string, const TensorSpec*> by_name;
  for (const TensorSpec& s : specs) {
    total += s.NumElements();
    EXPECT_TRUE(by_name.emplace(s.name, &s).second) << "duplicate " << s.name;
  }
  EXPECT_EQ(total, ParameterCount(c));
  auto shape = [&](const std::string& n) { return by_name.at(n)->shape; };
  using S = std::vector<int64_t>;
  EXPECT_EQ(shape("model.embed_tokens.weight"), (S{163840, 2304}));
  EXPECT_EQ(shape("lm_head.weight"), (S{163840, 2304}));
  EXPECT_EQ(shape("model.layers.0.self_attn.q_conv1d.weight"), (S{4096, 1, 4}));
  EXPECT_EQ(by_name.at("model.layers.0.self_attn.q_conv1d.weight")->alt_shape, (S{4096, 4}));
  EXPECT_EQ(shape("model.layers.0.self_attn.A_log"), (S{1, 1, 32, 1}));
  EXPECT_TRUE(by_name.at("model.layers.0.self_attn.A_log")->fp32);
  EXPECT_EQ(shape("model.layers.0.self_attn.dt_bias"), (S{4096}));
  EXPECT_EQ(shape("model.layers.0.self_attn.f_b_proj.weight"), (S{4096, 128}));
  EXPECT_EQ(shape("model.layers.0.self_attn.b_proj.weight"), (S{32, 2304}));
  EXPECT_EQ(shape("model.layers.0.self_attn.o_norm.weight"), (S{128}));
  EXPECT_EQ(shape("model.layers.0.mlp.gate_proj.weight"), (S{9216, 2304}));
  EXPECT_EQ(shape("model.layers.3.self_attn.q_proj.weight"), (S{6144, 2304}));
  EXPECT_EQ(shape("model.layers.3.self_attn.kv_a_proj_with_mqa.weight"), (S{576, 2304}));
  EXPECT_EQ(shape("model.layers.3.self_attn.kv_a_layernorm.weight"), (S{512}));
  EXPECT_EQ(shape("model.layers.3.self_attn.kv_b_proj.weight"), (S{8192, 512}));
  EXPECT_EQ(shape("model.layers.26.self_attn.o_proj.weight"), (S{2304, 4096}));
  EXPECT_EQ(shape("model.layers.1.block_sparse_moe.gate.weight"), (S{256, 2304}));
  EXPECT_EQ(shape("model.layers.1.block_sparse_moe.gate.e_score_correction_bias"), (S{256}));
  EXPECT_TRUE(by_name.at("model.layers.1.block_sparse_moe.gate.e_score_correction_bias")->fp32);
  EXPECT_EQ(shape("model.layers.26.block_sparse_moe.experts.255.w2.weight"), (S{2304, 1024}));
  EXPECT_EQ(shape("model.layers.26.block_sparse_moe.shared_experts.up_proj.weight"), (S{1024, 2304}));
  EXPECT_EQ(by_name.count("model.layers.1.mlp.gate_proj.weight"), 0u);
  EXPECT_EQ(by_name.count("model.layers.0.block_sparse_moe.gate.weight"), 0u);
}

TEST(ExpectedTensors, ElementCountEqualsParameterCount) {
  for (const ModelConfig& c : {TinyConfig(), Small100MConfig()}) {
    int64_t total = 0;
    for (const TensorSpec& s : ExpectedTensors(c)) total += s.NumElements();
    EXPECT_EQ(total, ParameterCount(c));
  }
  ModelConfig tied = TinyConfig();
  tied.tie_word_embeddings = true;
  for (const TensorSpec& s : ExpectedTensors(tied)) EXPECT_NE(s.name, "lm_head.weight");
}

TEST(Checkpoint, OpensShardedCheckpoint) {
  const std::string dir = TestDir();
  const ModelConfig config = TinyConfig();
  WriteTestCheckpoint(dir, config, Layout{});
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir, config);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->ShardNames(), (std::vector<std::string>{"model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors"}));
  const std::vector<TensorSpec> specs = ExpectedTensors(config);
  EXPECT_EQ((*ckpt)->TensorNames().size(), specs.size());
  uint64_t bytes = 0;
  for (const TensorSpec& s : specs) {
    absl::StatusOr<TensorView> v = (*ckpt)->Get(s.name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->shape, s.shape) << s.name;
    EXPECT_EQ(v->dtype, s.fp32 ? DType::kF32 : DType::kBF16) << s.name;
    bytes += v->bytes;
  }
  EXPECT_EQ((*ckpt)->TotalTensorBytes(), bytes);
  std::vector<float> w;
  ASSERT_TRUE((*ckpt)->ReadF32("model.layers.3.self_attn.kv_b_proj.weight", &w).ok());
  ASSERT_EQ(w.size(), 256u * 64u);
  for (size_t i = 0; i < w.size(); i += 97) {
    ASSERT_EQ(w[i], TestValue("model.layers.3.self_attn.kv_b_proj.weight", i)) << i;
  }
  std::vector<float> small(3);
  ExpectError((*ckpt)->ReadF32("model.norm.weight", small.data(), small.size()),
              absl::StatusCode::kInvalidArgument, "buffer holds 3 floats but the tensor has 256");
  ExpectError((*ckpt)->Get("model.nope").status(), absl::StatusCode::kNotFound, "no tensor model.nope");
}

TEST(Checkpoint, OpensSingleFileAndAlternateShapes) {
  const std::string dir = TestDir();
  Layout layout;
  layout.single_file = true;
  layout.alt_shapes = true;
  WriteTestCheckpoint(dir, TinyConfig(), layout);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir, TinyConfig());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->ShardNames(), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ((*ckpt)->Get("model.layers.0.self_attn.A_log")->shape, std::vector<int64_t>{4});
  EXPECT_EQ((*ckpt)->Get("model.layers.0.self_attn.k_conv1d.weight")->shape,
            (std::vector<int64_t>{256, 4}));
}

TEST(Checkpoint, Bf16F16AndF32GiveTheSameValues) {
  const ModelConfig config = TinyConfig();
  std::map<DType, std::vector<float>> values;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    const std::string dir = absl::StrCat(TestDir(), "/", std::string(DTypeName(dt)));
    ::mkdir(dir.c_str(), 0755);
    Layout layout;
    layout.dtype = dt;
    WriteTestCheckpoint(dir, config, layout);
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir, config);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    EXPECT_EQ((*ckpt)->Get("model.embed_tokens.weight")->dtype, dt);
    // The embedding is 1M elements: exercises the parallel conversion path.
    ASSERT_TRUE((*ckpt)->ReadF32("model.embed_tokens.weight", &values[dt]).ok());
  }
  EXPECT_EQ(values[DType::kBF16], values[DType::kF32]);
  EXPECT_EQ(values[DType::kF16], values[DType::kF32]);
  EXPECT_EQ(values[DType::kF32][12345], TestValue("model.embed_tokens.weight", 12345));
}

TEST(Checkpoint, MissingTensor) {
  const std::string dir = TestDir();
  Layout layout;
  layout.drop = "model.layers.3.self_attn.kv_b_proj.weight";
  WriteTestCheckpoint(dir, TinyConfig(), layout);
  const absl::Status s = OpenStatus(dir);
  ExpectError(s, absl::StatusCode::kNotFound,
              "missing tensor model.layers.3.self_attn.kv_b_proj.weight (expected [256, 64]) in " + dir);
}

TEST(Checkpoint, MisshapenTensor) {
  const std::string dir = TestDir();
  Layout layout;
  layout.reshape["model.layers.1.self_attn.dt_bias"] = {128};
  WriteTestCheckpoint(dir, TinyConfig(), layout);
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument,
              "tensor model.layers.1.self_attn.dt_bias in " + dir + "/model-0000");
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument,
              ".safetensors has shape [128], expected [256]");
  // An alternate shape is named when one exists.
  const std::string dir2 = dir + "/conv";
  ::mkdir(dir2.c_str(), 0755);
  layout.reshape.clear();
  layout.reshape["model.layers.0.self_attn.v_conv1d.weight"] = {256, 1, 3};
  WriteTestCheckpoint(dir2, TinyConfig(), layout);
  ExpectError(OpenStatus(dir2), absl::StatusCode::kInvalidArgument,
              "has shape [256, 1, 3], expected [256, 1, 4] or [256, 4]");
}

TEST(Checkpoint, NonFloatDtype) {
  const std::string dir = TestDir();
  Layout layout;
  layout.retype["model.norm.weight"] = DType::kI64;
  WriteTestCheckpoint(dir, TinyConfig(), layout);
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument,
              "tensor model.norm.weight in " + dir);
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument, "has dtype I64");
}

TEST(Checkpoint, WrongConfigIsRejected) {
  const std::string dir = TestDir();
  WriteTestCheckpoint(dir, TinyConfig(), Layout{});
  ModelConfig other = TinyConfig();
  other.num_experts = 16;
  ExpectError(OpenStatus(dir, other), absl::StatusCode::kInvalidArgument,
              "model.layers.1.block_sparse_moe.gate.weight");
}

TEST(Checkpoint, UnknownTensorOnlyWarns) {
  const std::string dir = TestDir();
  Layout layout;
  layout.extra = {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.mtp.0.weight"};
  WriteTestCheckpoint(dir, TinyConfig(), layout);
  testing::internal::CaptureStderr();
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir, TinyConfig());
  const std::string log = testing::internal::GetCapturedStderr();
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->Get("model.mtp.0.weight").ok());
  EXPECT_NE(log.find("level=warning"), std::string::npos) << log;
  EXPECT_NE(log.find("tensor=model.layers.0.self_attn.rotary_emb.inv_freq"), std::string::npos) << log;
  EXPECT_NE(log.find("tensor=model.mtp.0.weight"), std::string::npos) << log;
}

TEST(Checkpoint, NoCheckpointFiles) {
  const std::string dir = TestDir();
  ExpectError(OpenStatus(dir), absl::StatusCode::kNotFound,
              "no model.safetensors.index.json or model.safetensors in " + dir);
}

// Rewrites the index of a valid checkpoint with `mutate` applied.
void MutateIndex(const std::string& dir, const std::function<void(Json&)>& mutate) {
  const std::string path = dir + "/" + kSafetensorsIndexFile;
  Json index = Json::parse(ReadText(path));
  mutate(index);
  WriteText(path, index.dump());
}

TEST(Checkpoint, ShardListedButMissing) {
  const std::string dir = TestDir();
  WriteTestCheckpoint(dir, TinyConfig(), Layout{});
  MutateIndex(dir, [](Json& j) {
    j["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors";
  });
  ExpectError(OpenStatus(dir), absl::StatusCode::kNotFound,
              "shard model-00003-of-00003.safetensors listed in model.safetensors.index.json does "
              "not exist in " + dir);
  // The same when the shard file is deleted.
  const std::string dir2 = dir + "/deleted";
  ::mkdir(dir2.c_str(), 0755);
  WriteTestCheckpoint(dir2, TinyConfig(), Layout{});
  ASSERT_EQ(std::remove((dir2 + "/model-00002-of-00002.safetensors").c_str()), 0);
  ExpectError(OpenStatus(dir2), absl::StatusCode::kNotFound,
              "shard model-00002-of-00002.safetensors listed in");
}

TEST(Checkpoint, IndexPointsToShardLackingTensor) {
  const std::string dir = TestDir();
  WriteTestCheckpoint(dir, TinyConfig(), Layout{});
  MutateIndex(dir, [&](Json& j) {
    // Tensor 0 (embedding) is in shard 1; claim it is in shard 2.
    j["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors";
  });
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument,
              "model.safetensors.index.json in " + dir +
                  " maps model.embed_tokens.weight to shard model-00002-of-00002.safetensors, "
                  "which does not contain it");
}

TEST(Checkpoint, MalformedIndex) {
  const std::string dir = TestDir();
  WriteTestCheckpoint(dir, TinyConfig(), Layout{});
  const std::string index = dir + "/" + kSafetensorsIndexFile;
  WriteText(index, "{\"weight_map\": {\"a\": ");
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument, index + ": malformed JSON");
  WriteText(index, "{\"metadata\": {\"total_size\": 1e99999}}");  // out_of_range, not parse_error
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument, index + ": malformed JSON");
  WriteText(index, "{\"metadata\": {}}");
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument, "no \"weight_map\" object");
  WriteText(index, "{\"weight_map\": {\"model.norm.weight\": 3}}");
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument,
              "weight_map[\"model.norm.weight\"] is not a string");
  WriteText(index, "{\"weight_map\": {\"model.norm.weight\": \"../model-00001-of-00002.safetensors\"}}");
  ExpectError(OpenStatus(dir), absl::StatusCode::kInvalidArgument, "is not a plain file name");
}

TEST(Checkpoint, TruncatedShard) {
  const std::string dir = TestDir();
  WriteTestCheckpoint(dir, TinyConfig(), Layout{});
  const std::string shard = dir + "/model-00001-of-00002.safetensors";
  const std::string bytes = ReadText(shard);
  WriteText(shard, bytes.substr(0, bytes.size() - 4096));
  ExpectError(OpenStatus(dir), absl::StatusCode::kDataLoss, shard + ": tensor ");
  ExpectError(OpenStatus(dir), absl::StatusCode::kDataLoss, "file truncated");
}

TEST(Checkpoint, FingerprintTracksWeightsAndConfig) {
  const std::string dir = TestDir();
  const std::string a = dir + "/a", b = dir + "/b", c = dir + "/c";
  for (const std::string& d : {a, b, c}) ::mkdir(d.c_str(), 0755);
  Layout layout;
  WriteTestCheckpoint(a, TinyConfig(), layout);
  WriteTestCheckpoint(b, TinyConfig(), layout);
  layout.bump = 0.125f;
  WriteTestCheckpoint(c, TinyConfig(), layout);
  auto fp = [](const std::string& d, const ModelConfig& config) {
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(d, config);
    EXPECT_TRUE(ckpt.ok()) << ckpt.status();
    return ckpt.ok() ? (*ckpt)->CheckpointFingerprint() : 0;
  };
  const uint64_t fa = fp(a, TinyConfig());
  EXPECT_NE(fa, 0u);
  EXPECT_EQ(fa, fp(b, TinyConfig()));  // same bytes, different directory
  EXPECT_NE(fa, fp(c, TinyConfig()));
  ModelConfig eps = TinyConfig();
  eps.rms_norm_eps = 1e-6;  // same tensors, different config text
  EXPECT_NE(fa, fp(a, eps));
}

}  // namespace
}  // namespace kl
