#include "services/router/model_meta.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/checkpoint/checkpoint.h"
#include "engine/common/log.h"
#include "kernels/common/status_macros.h"

namespace kl {

absl::StatusOr<std::unique_ptr<ModelMeta>> ModelMeta::Open(const std::string& dir) {
  std::unique_ptr<ModelMeta> m(new ModelMeta());
  ASSIGN_OR_RETURN(m->config_, LoadModelConfig(dir + "/config.json"));
  ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::Load(dir));
  if (m->tokenizer_->vocab_size() > m->config_.vocab_size) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, ": tokenizer has ", m->tokenizer_->vocab_size(),
                     " ids but config.json vocab_size is ", m->config_.vocab_size));
  }
  m->state_fingerprint_ = StateFingerprint(m->config_);
  // The checkpoint is optional: a router may be given config + tokenizer only.
  std::error_code ec;
  const bool has_weights =
      std::filesystem::exists(dir + "/model.safetensors.index.json", ec) ||
      std::filesystem::exists(dir + "/model.safetensors", ec);
  if (has_weights) {
    ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir, m->config_));
    m->checkpoint_fingerprint_ = ckpt->CheckpointFingerprint();
  }
  KL_LOG(INFO).Field("dir", dir).Field("vocab", m->tokenizer_->vocab_size())
          .Field("state_fingerprint", FormatFingerprint(m->state_fingerprint_))
          .Field("checkpoint_fingerprint", FormatFingerprint(m->checkpoint_fingerprint_))
      << "model metadata loaded";
  return m;
}

}  // namespace kl
