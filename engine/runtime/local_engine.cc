#include "engine/runtime/local_engine.h"

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "kernels/common/parallel.h"
#include "kernels/common/status_macros.h"

namespace kl {

TensorSource CheckpointTensorSource(const Checkpoint* checkpoint) {
  return [checkpoint](const std::string& name, int64_t rows,
                      int64_t cols) -> absl::StatusOr<HostTensor> {
    ASSIGN_OR_RETURN(TensorView v, checkpoint->Get(name));
    if (v.NumElements() != rows * cols) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " in ", v.file, " has shape ",
                                                     ShapeToString(v.shape), ", expected ",
                                                     rows * cols, " elements"));
    }
    HostTensor t;
    t.dtype = v.dtype;
    t.data = v.data;
    t.rows = rows;
    t.cols = cols;
    return t;
  };
}

absl::StatusOr<std::unique_ptr<LocalEngine>> LocalEngine::Open(const LocalEngineOptions& o) {
  if (o.threads > 0) SetNumThreads(o.threads);
  std::unique_ptr<LocalEngine> e(new LocalEngine());
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(o.model_dir + "/config.json"));
  ASSIGN_OR_RETURN(e->checkpoint_, Checkpoint::Open(o.model_dir, config));
  ASSIGN_OR_RETURN(e->tokenizer_, Tokenizer::Load(o.model_dir));
  if (e->tokenizer_->vocab_size() > config.vocab_size) {
    return absl::FailedPreconditionError(
        absl::StrCat(o.model_dir, ": tokenizer has ", e->tokenizer_->vocab_size(),
                     " ids but config.json vocab_size is ", config.vocab_size));
  }
  e->checkpoint_fingerprint_ = e->checkpoint_->CheckpointFingerprint();
  BackendSpec spec = o.backend;
  spec.cpu = o.cpu;
  ASSIGN_OR_RETURN(e->backend_, MakeBackend(config, spec));
  ASSIGN_OR_RETURN(e->model_, Model::Create(config, CheckpointTensorSource(e->checkpoint_.get()),
                                            e->backend_.get(), o.model));
  KL_LOG(INFO).Field("dir", o.model_dir).Field("layers", config.num_hidden_layers)
          .Field("hidden", config.hidden_size).Field("vocab", config.vocab_size)
          .Field("backend", e->backend_->Name())
          .Field("weight_bytes", e->backend_->weight_bytes())
      << "model loaded";
  return e;
}

}  // namespace kl
