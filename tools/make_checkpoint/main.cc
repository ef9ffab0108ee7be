// make_checkpoint: writes a random Kimi-Linear checkpoint in the Hugging Face layout.
//
//   bazel run //tools/make_checkpoint -- --out_dir=/tmp/kimi-tiny --preset=tiny --seed=1
//   make_checkpoint --out_dir=DIR --config=path/to/config.json --dtype=f32
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "engine/checkpoint/expected_tensors.h"
#include "engine/config/model_config.h"
#include "kernels/common/dtype.h"
#include "kernels/common/parallel.h"
#include "tools/make_checkpoint/maker.h"

ABSL_FLAG(std::string, out_dir, "", "Directory to write (created if needed). Required.");
ABSL_FLAG(std::string, preset, "tiny", "tiny | small100m | kimi48b (ignored when --config is set).");
ABSL_FLAG(std::string, config, "", "Path of a config.json to use instead of a preset.");
ABSL_FLAG(uint64_t, seed, 0, "Random seed; the same seed gives byte-identical files.");
ABSL_FLAG(std::string, dtype, "bf16", "Weight dtype: bf16 | f16 | f32 (A_log, dt_bias, "
                                      "e_score_correction_bias are always f32).");
ABSL_FLAG(int64_t, max_shard_bytes, 0, "Largest shard in bytes; 0 = about a quarter of the model.");
ABSL_FLAG(bool, tokenizer, true, "Also write a synthetic tokenizer (tiktoken.model etc.).");
ABSL_FLAG(int64_t, max_total_gib, 8, "Refuse to write more than this many GiB of weights.");
ABSL_FLAG(int, threads, 0, "Generator threads; 0 = all cores.");
ABSL_FLAG(int64_t, layers, 0,
          "Keep only the first N layers of the preset / config (0 = all): the per-layer "
          "shapes stay the model's (benchmarks of a large model's layers on small disks)");
ABSL_FLAG(int64_t, experts, 0, "Routed experts per MoE layer instead of the config's (0 = same)");

namespace {

int Fail(const std::string& msg) {
  std::fprintf(stderr, "make_checkpoint: %s\n", msg.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Writes a random Kimi-Linear checkpoint (config.json, safetensors "
                               "shards + index, tokenizer). Usage: make_checkpoint --out_dir=DIR");
  absl::ParseCommandLine(argc, argv);
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  if (out_dir.empty()) return Fail("--out_dir is required");

  kl::ModelConfig config;
  if (!absl::GetFlag(FLAGS_config).empty()) {
    absl::StatusOr<kl::ModelConfig> c = kl::LoadModelConfig(absl::GetFlag(FLAGS_config));
    if (!c.ok()) return Fail(std::string(c.status().message()));
    config = *c;
  } else {
    const std::string preset = absl::GetFlag(FLAGS_preset);
    if (preset == "tiny") config = kl::TinyConfig();
    else if (preset == "small100m") config = kl::Small100MConfig();
    else if (preset == "kimi48b") config = kl::Kimi48BConfig();
    else return Fail("--preset must be tiny, small100m or kimi48b, got " + preset);
  }

  if (const int64_t n = absl::GetFlag(FLAGS_layers); n > 0) {
    if (n > config.num_hidden_layers) return Fail("--layers exceeds the model's layers");
    config.num_hidden_layers = n;
    config.layer_kinds.resize(n);
  }
  if (const int64_t e = absl::GetFlag(FLAGS_experts); e > 0) {
    if (e < config.num_experts_per_token) return Fail("--experts below experts per token");
    config.num_experts = e;
  }
  if (absl::Status v = config.Validate(); !v.ok()) {
    return Fail(std::string(v.message()));
  }

  kl::MakerOptions options;
  options.seed = absl::GetFlag(FLAGS_seed);
  options.max_shard_bytes = absl::GetFlag(FLAGS_max_shard_bytes);
  options.write_tokenizer = absl::GetFlag(FLAGS_tokenizer);
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype == "bf16") options.dtype = kl::DType::kBF16;
  else if (dtype == "f16") options.dtype = kl::DType::kF16;
  else if (dtype == "f32") options.dtype = kl::DType::kF32;
  else return Fail("--dtype must be bf16, f16 or f32, got " + dtype);
  if (absl::GetFlag(FLAGS_threads) > 0) kl::SetNumThreads(absl::GetFlag(FLAGS_threads));

  int64_t total_bytes = 0;
  for (const kl::TensorSpec& s : kl::ExpectedTensors(config)) {
    total_bytes += kl::StoredBytes(s, options.dtype);
  }
  if (total_bytes > (absl::GetFlag(FLAGS_max_total_gib) << 30)) {
    return Fail("the checkpoint would be " + std::to_string(total_bytes >> 30) +
                " GiB; raise --max_total_gib to allow it");
  }

  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = kl::MakeCheckpoint(config, out_dir, options);
  if (!s.ok()) return Fail(std::string(s.message()));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("wrote %s: %lld parameters, %.1f MiB, %.2f s\n", out_dir.c_str(),
              static_cast<long long>(kl::ParameterCount(config)), total_bytes / 1048576.0, seconds);
  return 0;
}
