// Writes the seed corpus of every fuzz target (tests/fuzz/corpus/<target>/
// seed-*) with the project's real writers, so the seeds are valid inputs that
// reach deep paths: configs from the presets, safetensors files from
// WriteSafetensors, StateBundles from the BundleWriter, requests serialized by
// protobuf, and tokenizer texts. Deterministic (fixed seeds; bundle ids fixed).
// Usage: bazel run //tests/fuzz:make_seed_corpus -- $PWD/tests/fuzz/corpus
// Crash regressions (crash-*) live next to the seeds and are never rewritten.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "engine/checkpoint/safetensors.h"
#include "engine/config/model_config.h"
#include "engine/state/bundle_test_util.h"
#include "engine/state/state_bundle.h"
#include "proto/generation.pb.h"
#include "proto/worker.pb.h"
#include "services/transport/transfer_plan.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

std::string g_root;
int g_failures = 0;

void Put(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::filesystem::path dir = std::filesystem::path(g_root) / target;
  std::filesystem::create_directories(dir);
  std::ofstream out(dir / ("seed-" + name), std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s/%s\n", dir.c_str(), name.c_str());
    ++g_failures;
  }
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    ++g_failures;
  }
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void ConfigSeeds() {
  Put("config_fuzzer", "tiny.json", kl::ModelConfigToJson(kl::TinyConfig()));
  Put("config_fuzzer", "small100m.json", kl::ModelConfigToJson(kl::Small100MConfig()));
  Put("config_fuzzer", "kimi48b.json", kl::ModelConfigToJson(kl::Kimi48BConfig()));
  Put("config_fuzzer", "bundle_model.json", kl::ModelConfigToJson(kl::fuzz::FuzzBundleConfig()));
  Put("config_fuzzer", "not_an_object.json", "[1, 2, 3]");
  Put("config_fuzzer", "wrong_type.json", "{\"model_type\": \"llama\", \"hidden_size\": -1}");
}

void SafetensorsSeeds(const std::string& tmp) {
  const std::vector<float> f32 = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 42.0f};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x4040, 0x0000};
  const std::vector<int32_t> i32 = {7, -1, 1 << 20};
  const std::vector<std::pair<std::string, std::vector<kl::TensorToWrite>>> files = {
      {"three_tensors.safetensors",
       {{"model.embed_tokens.weight", kl::DType::kF32, {2, 3}, f32.data()},
        {"model.norm.weight", kl::DType::kBF16, {4}, bf16.data()},
        {"ids", kl::DType::kI32, {3}, i32.data()}}},
      {"scalar_and_empty.safetensors",
       {{"scalar", kl::DType::kF32, {}, f32.data()}, {"empty", kl::DType::kBF16, {0, 5}, bf16.data()}}},
      {"no_tensors.safetensors", {}},
  };
  for (const auto& [name, tensors] : files) {
    const std::string path = tmp + "/" + name;
    Check(kl::WriteSafetensors(path, tensors, {{"format", "pt"}}), name.c_str());
    Put("safetensors_fuzzer", name, ReadFile(path));
  }
}

void TokenizerSeeds() {
  // Control byte first (bit 0: raw int32 ids, bit 1: generation prompt, bits 2-3: first role).
  const std::vector<std::pair<std::string, std::string>> texts = {
      {"ascii", std::string("\x00", 1) + "Hello, world! It's 2026; x = 12345 + 678."},
      {"code", std::string("\x02", 1) + "int main() {\n    return 0;\n}\n\t\t  trailing   "},
      {"cjk_emoji", std::string("\x04", 1) + "\xe4\xbd\xa0\xe5\xa5\xbd\xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x98\x80 caf\xc3\xa9"},
      {"invalid_utf8", std::string("\x06", 1) + "ok \xff\xfe \xc3 \xe4\xbd \xf0\x9f\x98 \xed\xa0\x80 \xc0\xaf end"},
      {"specials", std::string("\x03", 1) + "<|im_user|>hi<|im_middle|>[BOS]<|im_end|>[EOS] <|im_end"},
      {"chat", std::string("\x0a", 1) + "be brief\x01what is 2+2?\x01" "4\x01<|im_end|>thanks"},
      {"raw_ids", std::string("\x01", 1) + std::string("\x00\x00\x00\x00\xff\x03\x00\x00\x00\x04\x00\x00\xff\xff\xff\xff\x41\x00\x00\x00", 20)},
  };
  for (const auto& [name, bytes] : texts) Put("tokenizer_fuzzer", name, bytes);
}

void BundleSeeds() {
  const kl::ModelConfig config = kl::fuzz::FuzzBundleConfig();
  struct Variant {
    const char* name;
    int64_t tokens;
    kl::DType dtype;
    int64_t max_part_bytes;
    char control;
  };
  const Variant variants[] = {
      {"f32_1tok", 1, kl::DType::kF32, 0, 0},
      {"f32_3tok_split", 3, kl::DType::kF32, 32, 0},
      {"bf16_2tok", 2, kl::DType::kBF16, 0, 0},
      {"f32_2tok_reseal", 2, kl::DType::kF32, 64, 3},
      {"bf16_4tok_reversed", 4, kl::DType::kBF16, 48, 3 | 16},
  };
  uint64_t seed = 1;
  for (const Variant& v : variants) {
    kl::BundleMeta meta;
    meta.request_id = std::string("seed-") + v.name;
    meta.first_token = 5;
    meta.checkpoint_fingerprint = 0x1234;
    meta.bundle_id = 0x5eed0000 + seed;
    kl::BundleOptions options;
    options.kda_state_dtype = options.conv_dtype = options.mla_dtype = v.dtype;
    options.max_part_payload_bytes = v.max_part_bytes;
    absl::StatusOr<std::string> blob = kl::SerializeBundle(
        config, kl::testing_util::RandomState(config, v.tokens, seed++), meta, options);
    Check(blob.status(), v.name);
    if (!blob.ok()) continue;
    // A seed must get through the whole decoder, or it seeds nothing deep.
    Check(kl::DeserializeBundle(*blob, config).status(), v.name);
    Put("bundle_fuzzer", v.name, std::string(1, v.control) + *blob);
  }
}

void RequestSeeds() {
  kl::v1::GenerateRequest text;
  text.set_text("Once upon a time");
  text.set_request_id("req-1");
  text.mutable_sampling()->set_max_tokens(8);
  text.mutable_sampling()->set_temperature(0.7);
  text.mutable_sampling()->set_top_p(0.9);
  text.mutable_sampling()->set_top_k(40);
  text.mutable_sampling()->set_seed(42);
  text.mutable_sampling()->add_stop("\n\n");
  text.mutable_sampling()->add_stop_token_ids(1);

  kl::v1::GenerateRequest chat;
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("system");
  m->set_content("You are terse.");
  m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("Hi <|im_end|> there");
  chat.mutable_chat()->set_add_generation_prompt(true);

  kl::v1::GenerateRequest ids;
  for (int i : {1, 2, 3, 500, 1023}) ids.mutable_token_ids()->add_ids(i);
  ids.mutable_sampling()->set_temperature(0);
  ids.mutable_sampling()->set_ignore_eos(true);

  kl::v1::GenerateRequest bad;
  bad.set_text("");
  bad.set_request_id("bad id\n");
  bad.mutable_sampling()->set_top_p(0);
  bad.mutable_sampling()->set_max_tokens(-1);

  Put("request_fuzzer", "text", text.SerializeAsString());
  Put("request_fuzzer", "chat", chat.SerializeAsString());
  Put("request_fuzzer", "token_ids", ids.SerializeAsString());
  Put("request_fuzzer", "invalid", bad.SerializeAsString());
}

// Header (transfer_plan_fuzzer.cc): num_tokens, built-plan chunk / bound /
// tokens, G, the row-size byte, then G (first - next, count) pairs; then a
// plan that the prefill worker's builder made with the same sizes, so the
// seeds start from plans the receiver accepts.
void TransferPlanSeeds() {
  const kl::ModelConfig config = kl::fuzz::FuzzBundleConfig();
  struct Variant {
    const char* name;
    int64_t tokens, chunk;
    uint8_t bound, row_shift;  // header bytes 3 and 6
    std::vector<std::pair<int8_t, int8_t>> groups;
  };
  const Variant variants[] = {
      {"one_chunk", 5, 64, 0, 1, {{0, 1}, {0, 1}}},
      {"chunked_split", 40, 16, 42, 1, {{0, 2}, {0, 3}, {0, 64}, {1, 1}, {0, 2}}},
      {"grouped_whole", 100, 30, 0, 1, {{0, 4}, {0, 2}}},
      {"bad_groups", 9, 4, 14, 1, {{3, 1}, {0, 0}, {0, -1}, {0, 127}, {0, 1}}},
      {"big_rows", 60, 20, 3, 16, {{0, 1}, {0, 2}, {0, 1}}},  // 1 MiB rows
  };
  for (const Variant& v : variants) {
    const int64_t row_bytes = int64_t{16} << v.row_shift;
    kl::PlanSizes sizes;
    sizes.kda_layer_bytes = kl::KdaLayerBytes(config);
    sizes.latent_row_bytes = row_bytes;
    sizes.max_message_bytes = v.bound == 0 ? 0 : v.bound * row_bytes / 7 + 1;
    kl::v1::DeviceTransfer t;
    for (const auto& m : kl::BuildTransferPlan(config, v.tokens, v.chunk, sizes)) {
      *t.add_messages() = m;
    }
    Check(kl::ValidateTransferPlan(t.messages(), config, v.tokens, sizes, nullptr), v.name);
    std::string bytes;
    bytes.push_back(static_cast<char>(v.tokens & 0xff));
    bytes.push_back(static_cast<char>(v.tokens >> 8));
    bytes.push_back(static_cast<char>(v.chunk - 1));
    bytes.push_back(static_cast<char>(v.bound));
    bytes.push_back(static_cast<char>(v.tokens - 1));
    bytes.push_back(static_cast<char>(v.groups.size()));
    bytes.push_back(static_cast<char>(v.row_shift));
    for (const auto& [first, count] : v.groups) {
      bytes.push_back(static_cast<char>(first));
      bytes.push_back(static_cast<char>(count));
    }
    Put("transfer_plan_fuzzer", v.name, bytes + t.SerializeAsString());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR (absolute: bazel run changes directory)\n", argv[0]);
    return 2;
  }
  g_root = argv[1];
  char tmpl[] = "/tmp/kl_seed_corpus_XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return 1;
  ConfigSeeds();
  SafetensorsSeeds(tmpl);
  TokenizerSeeds();
  BundleSeeds();
  RequestSeeds();
  TransferPlanSeeds();
  std::filesystem::remove_all(tmpl);
  std::printf("seed corpus written to %s (%d failures)\n", g_root.c_str(), g_failures);
  return g_failures == 0 ? 0 : 1;
}
