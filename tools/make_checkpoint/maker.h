// Random Kimi-Linear checkpoints in the real Hugging Face layout, for tests,
// benchmarks and the README demo (no downloads): config.json, sharded
// safetensors + model.safetensors.index.json, a synthetic tokenizer and
// generation_config.json. Weights are drawn from SplitMix64 streams keyed by
// (seed, tensor name, element index), so output is byte-identical for a seed
// regardless of thread count, and is scaled so a forward pass gives
// non-degenerate activations and logits.
#ifndef KL_TOOLS_MAKE_CHECKPOINT_MAKER_H_
#define KL_TOOLS_MAKE_CHECKPOINT_MAKER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/checkpoint/expected_tensors.h"
#include "engine/config/model_config.h"
#include "kernels/common/dtype.h"

namespace kl {

struct MakerOptions {
  uint64_t seed = 0;
  // Storage dtype of the weights: kBF16 (as the official checkpoint), kF16 or kF32.
  // A_log, dt_bias and e_score_correction_bias are always F32. config.json's
  // "dtype" is set to match.
  DType dtype = DType::kBF16;
  // Largest shard (sum of tensor bytes); a tensor larger than this gets a shard of
  // its own. 0 = AutoShardBytes(total), which gives the tiny model ~4 shards and
  // the 48B model ~20, like the official one.
  int64_t max_shard_bytes = 0;
  // Also write tiktoken.model / tokenizer_config.json / special_tokens_map.json.
  bool write_tokenizer = true;
};

// Writes a complete checkpoint for `config` into `out_dir` (created if needed;
// existing files of the same names are replaced). Streams one tensor at a time,
// so memory stays at the largest tensor even for the 48B shape. config.json is
// written last: its presence means the directory is complete.
// INVALID_ARGUMENT for an invalid config or dtype; INTERNAL on I/O errors.
absl::Status MakeCheckpoint(const ModelConfig& config, const std::string& out_dir,
                            const MakerOptions& options);

// ceil(total / 4) clamped to [1 MiB, 5 GiB].
int64_t AutoShardBytes(int64_t total_bytes);

// Bytes a tensor takes in a checkpoint of `dtype` (fp32 tensors stay fp32).
int64_t StoredBytes(const TensorSpec& spec, DType dtype);

// Fills out[0, n) with elements [begin, begin + n) of `spec`'s random init for
// `seed`, in fp32 (before rounding to the storage dtype). Exposed for tests.
void GenerateInit(const ModelConfig& config, const TensorSpec& spec, uint64_t seed, int64_t begin,
                  int64_t n, float* out);

}  // namespace kl

#endif  // KL_TOOLS_MAKE_CHECKPOINT_MAKER_H_
