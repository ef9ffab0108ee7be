// LocalEngine: a model folder opened on a backend (CPU unless `backend` names
// another one linked into the binary) — config, memory-mapped
// checkpoint, tokenizer and Model — ready to run. What `kl generate` and the
// workers start from.
#ifndef KL_ENGINE_RUNTIME_LOCAL_ENGINE_H_
#define KL_ENGINE_RUNTIME_LOCAL_ENGINE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/backend/registry.h"
#include "engine/checkpoint/checkpoint.h"
#include "engine/model/model.h"
#include "engine/tokenizer/tokenizer.h"

namespace kl {

struct LocalEngineOptions {
  std::string model_dir;
  ModelOptions model;
  CpuBackendOptions cpu;
  // Which backend and how (registry.h); backend.cpu is overwritten by `cpu`.
  BackendSpec backend;
  int threads = 0;  // 0 = all cores
};

class LocalEngine {
 public:
  // Loads `model_dir`/config.json, the safetensors checkpoint (every tensor
  // checked against the config) and the tokenizer. Errors name the file.
  static absl::StatusOr<std::unique_ptr<LocalEngine>> Open(const LocalEngineOptions& options);

  Model& model() { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // Identity of the weights (StateBundle checkpoint fingerprint).
  uint64_t checkpoint_fingerprint() const { return checkpoint_fingerprint_; }

 private:
  LocalEngine() = default;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Model> model_;
  uint64_t checkpoint_fingerprint_ = 0;
};

// A TensorSource over a checkpoint (tensors read in place, no copy).
TensorSource CheckpointTensorSource(const Checkpoint* checkpoint);

}  // namespace kl

#endif  // KL_ENGINE_RUNTIME_LOCAL_ENGINE_H_
