// A Hugging Face Kimi-Linear checkpoint directory, memory-mapped and checked
// against a ModelConfig: every tensor of ExpectedTensors(config) present with the
// right shape and a float dtype. Tensors are read in place (no copy) or converted
// to fp32 on demand.
#ifndef KL_ENGINE_CHECKPOINT_CHECKPOINT_H_
#define KL_ENGINE_CHECKPOINT_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/checkpoint/expected_tensors.h"
#include "engine/checkpoint/safetensors.h"
#include "engine/config/model_config.h"

namespace kl {

inline constexpr char kSafetensorsIndexFile[] = "model.safetensors.index.json";
inline constexpr char kSingleSafetensorsFile[] = "model.safetensors";

// Immutable after Open; every method is thread-safe. TensorViews point into the
// mappings and stay valid for the Checkpoint's lifetime.
class Checkpoint {
 public:
  // Opens `dir`: model.safetensors.index.json ({"metadata": {...}, "weight_map":
  // {tensor: shard}}) if present, else a single model.safetensors. Maps every shard,
  // validates its header (see SafetensorsFile::Open), then checks the tensors:
  //   NOT_FOUND         no index and no model.safetensors in dir; a shard named by
  //                     the index does not exist; an expected tensor is missing
  //                     ("missing tensor <name> (expected [a, b]) in <dir>");
  //   INVALID_ARGUMENT  malformed index JSON / weight_map; the index maps a tensor to
  //                     a shard that does not contain it; a tensor has the wrong shape
  //                     (names expected, actual and the file) or a non-float dtype;
  //   DATA_LOSS         a truncated shard.
  // Tensors not in ExpectedTensors(config) are logged at WARNING and kept (Get
  // works on them). `config` must be valid; Open keeps a copy.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir,
                                                          const ModelConfig& config);
  // Same, with the config read from <dir>/config.json (LoadModelConfig errors pass through).
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  // NOT_FOUND if the checkpoint has no tensor `name`.
  absl::StatusOr<TensorView> Get(const std::string& name) const;

  // Converts a float tensor (BF16, F16, F32 or F64) to fp32, flattened in storage
  // order; resizes *out. Large tensors are converted on the ParallelFor pool, so do
  // not call from inside a ParallelFor body expecting parallelism.
  absl::Status ReadF32(const std::string& name, std::vector<float>* out) const;
  // Same into a caller buffer; INVALID_ARGUMENT unless n equals the element count.
  absl::Status ReadF32(const std::string& name, float* out, size_t n) const;

  // A 64-bit FNV-1a hash identifying these weights: the canonical config text
  // (ModelConfigToJson), and for every tensor (sorted by name) its name, dtype,
  // shape and the bytes of its first and last 4 KiB. Cheap (touches at most two
  // pages per tensor, no full read); computed on the first call and cached.
  // Two checkpoints with different random weights differ.
  uint64_t CheckpointFingerprint() const;

  const ModelConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  // Every tensor in the checkpoint (expected and unknown), sorted.
  std::vector<std::string> TensorNames() const;
  // Shard file names (relative to dir), sorted.
  std::vector<std::string> ShardNames() const;
  // Sum of all tensor data bytes.
  uint64_t TotalTensorBytes() const;

 private:
  Checkpoint() = default;
  absl::Status LoadIndex(const std::string& index_path);
  absl::Status LoadSingleFile(const std::string& path);
  absl::Status AddShard(const std::string& shard_name, const SafetensorsFile** out);
  absl::Status CheckAgainstConfig() const;

  std::string dir_;
  ModelConfig config_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;  // by file name
  std::map<std::string, const SafetensorsFile*> tensors_;            // tensor -> shard
  mutable std::once_flag fingerprint_once_;
  mutable uint64_t fingerprint_ = 0;
};

}  // namespace kl

#endif  // KL_ENGINE_CHECKPOINT_CHECKPOINT_H_
