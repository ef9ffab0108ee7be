// ModelMeta: what the router needs from a model folder — config.json and the
// tokenizer — without loading weights (LocalEngine maps and builds the whole
// model). If the folder also holds the safetensors checkpoint, its fingerprint
// is computed too (memory-mapped; touches two pages per tensor).
//
// Thread-safety: immutable after Open; every const method may be called
// concurrently.
#ifndef KL_SERVICES_ROUTER_MODEL_META_H_
#define KL_SERVICES_ROUTER_MODEL_META_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/config/model_config.h"
#include "engine/tokenizer/tokenizer.h"
#include "services/router/fingerprint_hex.h"

namespace kl {

class ModelMeta {
 public:
  // Loads `dir`/config.json and the tokenizer files. Errors name the file.
  // FAILED_PRECONDITION if the tokenizer has more ids than config vocab_size.
  static absl::StatusOr<std::unique_ptr<ModelMeta>> Open(const std::string& dir);

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // StateFingerprint(config): workers reporting another one are incompatible.
  uint64_t state_fingerprint() const { return state_fingerprint_; }
  // 0 when the folder has no checkpoint (tokenizer + config only).
  uint64_t checkpoint_fingerprint() const { return checkpoint_fingerprint_; }
  // The end-of-turn id generation stops at (config.json eos_token_id), -1 if none.
  int32_t eos_id() const { return static_cast<int32_t>(config_.eos_token_id); }

 private:
  ModelMeta() = default;
  ModelConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  uint64_t state_fingerprint_ = 0;
  uint64_t checkpoint_fingerprint_ = 0;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_MODEL_META_H_
