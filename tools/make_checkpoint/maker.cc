// Random checkpoint maker: shard planning, deterministic parallel init, HF files.
#include "tools/make_checkpoint/maker.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/checkpoint/checkpoint.h"
#include "kernels/common/splitmix64.h"
#include "engine/checkpoint/safetensors.h"
#include "engine/common/log.h"
#include "engine/tokenizer/synthetic.h"
#include "kernels/common/parallel.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

using Json = nlohmann::json;

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;
// Elements generated per ParallelFor task (and per stack-free scratch buffer).
constexpr int64_t kGenBlock = 1 << 14;

uint64_t Fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Independent stream per tensor: element i of the tensor draws outputs 2i, 2i+1.
uint64_t TensorSeed(uint64_t seed, const std::string& name) {
  return SplitMix64(seed ^ Fnv1a64(name)).Next();
}

// Initialiser: value = mean + stddev * N(0, 1), except A_log = log U(1, 16).
struct Init {
  double mean = 0;
  double stddev = 1;
  bool log_uniform_1_16 = false;
};

Init InitFor(const ModelConfig& c, const TensorSpec& s) {
  switch (s.kind) {
    case TensorKind::kEmbedding: return {0, 1.0};
    case TensorKind::kLmHead: return {0, 1.0 / std::sqrt(static_cast<double>(c.hidden_size))};
    case TensorKind::kLinear: return {0, 1.0 / std::sqrt(static_cast<double>(s.shape[1]))};
    case TensorKind::kNorm: return {1.0, 0.05};
    case TensorKind::kConv: return {0, 0.5};
    case TensorKind::kALog: return {0, 0, true};
    case TensorKind::kDtBias: return {0, 0.5};
    case TensorKind::kScoreBias: return {0, 0.02};
  }
  return {};
}

absl::Status WriteTextFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !ok) return absl::InternalError(absl::StrCat("error writing ", tmp));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("rename ", tmp, " -> ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

// Fills `dst` (the tensor's storage bytes) in parallel; deterministic because each
// block's generator is positioned by element index, not by thread.
void FillTensor(const ModelConfig& config, const TensorSpec& spec, uint64_t seed, DType dtype,
                void* dst) {
  const int64_t n = spec.NumElements();
  ParallelFor(n, kGenBlock, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t b = begin; b < end; b += kGenBlock) {
      const int64_t len = std::min(kGenBlock, end - b);
      if (dtype == DType::kF32) {
        GenerateInit(config, spec, seed, b, len, static_cast<float*>(dst) + b);
        continue;
      }
      scratch.resize(len);
      GenerateInit(config, spec, seed, b, len, scratch.data());
      uint16_t* out = static_cast<uint16_t*>(dst) + b;
      if (dtype == DType::kBF16) {
        F32ToBf16(scratch.data(), out, static_cast<size_t>(len));
      } else {
        for (int64_t i = 0; i < len; ++i) out[i] = F32ToF16(scratch[i]);
      }
    }
  });
}

struct ShardPlan {
  std::vector<std::vector<size_t>> shards;  // indices into the spec list
  int64_t total_bytes = 0;
};

ShardPlan PlanShards(const std::vector<TensorSpec>& specs, DType dtype, int64_t max_shard_bytes) {
  ShardPlan plan;
  for (const TensorSpec& s : specs) plan.total_bytes += StoredBytes(s, dtype);
  const int64_t cap = max_shard_bytes > 0 ? max_shard_bytes : AutoShardBytes(plan.total_bytes);
  int64_t current = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t bytes = StoredBytes(specs[i], dtype);
    if (plan.shards.empty() || (current > 0 && current + bytes > cap)) {
      plan.shards.emplace_back();
      current = 0;
    }
    plan.shards.back().push_back(i);
    current += bytes;
  }
  return plan;
}

std::string ShardName(size_t index, size_t count) {
  return absl::StrFormat("model-%05d-of-%05d.safetensors", index + 1, count);
}

std::string GenerationConfigJson(const ModelConfig& c) {
  Json j = Json::object();
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  j["max_length"] = c.model_max_length;
  return j.dump(2) + "\n";
}

const char* TorchDtypeName(DType t) {
  switch (t) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    default: return "bfloat16";
  }
}

}  // namespace

int64_t AutoShardBytes(int64_t total_bytes) {
  return std::clamp((total_bytes + 3) / 4, kMiB, 5 * kGiB);
}

int64_t StoredBytes(const TensorSpec& spec, DType dtype) {
  return spec.NumElements() * static_cast<int64_t>(DTypeSize(spec.fp32 ? DType::kF32 : dtype));
}

void GenerateInit(const ModelConfig& config, const TensorSpec& spec, uint64_t seed, int64_t begin,
                  int64_t n, float* out) {
  const Init init = InitFor(config, spec);
  SplitMix64 rng(TensorSeed(seed, spec.name));
  rng.Skip(2 * static_cast<uint64_t>(begin));
  for (int64_t i = 0; i < n; ++i) {
    if (init.log_uniform_1_16) {
      const double u = rng.Uniform();
      rng.Next();  // keep two draws per element
      out[i] = static_cast<float>(std::log(1.0 + 15.0 * u));
    } else {
      out[i] = static_cast<float>(init.mean + init.stddev * rng.Normal());
    }
  }
}

absl::Status MakeCheckpoint(const ModelConfig& config_in, const std::string& out_dir,
                            const MakerOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(config_in.Validate());
  if (options.dtype != DType::kBF16 && options.dtype != DType::kF16 && options.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("MakeCheckpoint: dtype ",
                                                   std::string(DTypeName(options.dtype)),
                                                   " is not one of BF16, F16, F32"));
  }
  ModelConfig config = config_in;
  config.torch_dtype = TorchDtypeName(options.dtype);
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec || !std::filesystem::is_directory(out_dir)) {
    return absl::InternalError(absl::StrCat("cannot create directory ", out_dir, ": ", ec.message()));
  }
  // Remove a previous config.json first so an interrupted run never looks complete.
  std::filesystem::remove(out_dir + "/config.json", ec);

  const std::vector<TensorSpec> specs = ExpectedTensors(config);
  const ShardPlan plan = PlanShards(specs, options.dtype, options.max_shard_bytes);
  Json weight_map = Json::object();
  for (size_t s = 0; s < plan.shards.size(); ++s) {
    const std::string name = ShardName(s, plan.shards.size());
    std::vector<TensorToWrite> tensors;
    for (size_t i : plan.shards[s]) {
      const TensorSpec& spec = specs[i];
      const DType dtype = spec.fp32 ? DType::kF32 : options.dtype;
      weight_map[spec.name] = name;
      tensors.push_back({spec.name, dtype, spec.shape, nullptr,
                         [&config, &spec, dtype, &options](void* dst) {
                           FillTensor(config, spec, options.seed, dtype, dst);
                         }});
    }
    RETURN_IF_ERROR(WriteSafetensors(out_dir + "/" + name, tensors, {{"format", "pt"}}));
  }
  const Json index = {{"metadata", {{"total_size", plan.total_bytes}}}, {"weight_map", weight_map}};
  RETURN_IF_ERROR(WriteTextFile(out_dir + "/" + kSafetensorsIndexFile, index.dump(2) + "\n"));
  RETURN_IF_ERROR(WriteTextFile(out_dir + "/generation_config.json", GenerationConfigJson(config)));
  if (options.write_tokenizer) {
    RETURN_IF_ERROR(WriteSyntheticTokenizer(out_dir, config.vocab_size, options.seed));
  }
  RETURN_IF_ERROR(WriteTextFile(out_dir + "/config.json", ModelConfigToJson(config)));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  KL_LOG(INFO)
      .Field("dir", out_dir)
      .Field("params", ParameterCount(config))
      .Field("shards", plan.shards.size())
      .Field("bytes", plan.total_bytes)
      .Field("seconds", seconds)
      << "made random checkpoint";
  return absl::OkStatus();
}

}  // namespace kl
