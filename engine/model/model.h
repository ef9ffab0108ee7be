// Model: the Kimi-Linear forward pass (spec §3, §6, §7) over a packed batch of
// sequences, written against the Backend seam. One call handles prefill,
// decode and mixed batches: each item appends its new tokens to its own state.
#ifndef KL_ENGINE_MODEL_MODEL_H_
#define KL_ENGINE_MODEL_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend/backend.h"
#include "engine/config/model_config.h"
#include "engine/model/weights.h"
#include "engine/state/sequence_state.h"

namespace kl {

struct ModelOptions {
  MoeWeightConvention moe_convention = MoeWeightConvention::kUnbiased;  // spec §7: vLLM's
  int64_t kda_chunk = 64;  // C of the chunkwise prefill
};

// One sequence of a batch.
struct ForwardItem {
  SequenceState* state = nullptr;      // advanced in place by the call
  absl::Span<const int32_t> tokens;    // new tokens (may be empty: no-op for this item)
  bool all_logits = false;             // logits for every new token, not just the last
  // With a layer-done callback: copy each finished layer of a device-resident
  // state to its host vectors before the callback (a gRPC state push reads
  // them). False for a state a device transport ships straight from the GPU.
  bool sync_layers_to_host = true;
  // Optional: sample this item's next token where the logits are (Backend::SampleTokens)
  // instead of returning its logits. Used only when the backend samples on the device and
  // every item of the call has tokens, no all_logits, and a `sample`; otherwise logits.
  const TokenSampling* sample = nullptr;
};

// Called during Forward right after layer `layer`'s mixer has updated every
// item's state for that layer (KDA state + conv tails, or MLA latent rows), so
// a prefill worker can ship that layer while the next ones compute. Runs on
// the forward thread: hand heavy work to another thread.
using LayerDoneCallback = std::function<void(int64_t layer)>;

struct ForwardOutput {
  // Per item: [rows][vocab] with rows = tokens.size() if all_logits, else 1
  // (0 when the item had no tokens).
  std::vector<std::vector<float>> logits;
  // Per item, when the call sampled on the device (see ForwardItem::sample): the next
  // token, and `logits` is left empty. Empty otherwise.
  std::vector<int32_t> tokens;
};

class Model {
 public:
  // Builds the model from tensors supplied by `source` (a checkpoint or random
  // weights); `backend` must outlive the model.
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config,
                                                       const TensorSource& source,
                                                       Backend* backend,
                                                       const ModelOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  Backend* backend() const { return backend_; }

  // Runs the batch. Inputs are validated before any state is touched (bad token
  // id, state of the wrong shape → INVALID_ARGUMENT, nothing modified). A
  // failure after that (a backend error) leaves the items' states undefined:
  // the caller must drop those sequences.
  absl::Status Forward(absl::Span<ForwardItem> items, ForwardOutput* out,
                       const LayerDoneCallback& on_layer_done = nullptr);

  // Device backends keep states in device memory: copy one into its host vectors
  // (before exporting a StateBundle), or give its device memory back. No-ops on
  // the CPU backend.
  absl::Status SyncStateToHost(SequenceState* s) { return backend_->SyncStateToHost(s); }
  absl::Status ReleaseState(SequenceState* s) { return backend_->ReleaseState(s); }

  // A fresh, zero state for a new sequence.
  SequenceState NewState() const { return SequenceState::Zero(config_); }

 private:
  Model(const ModelConfig& config, const ModelOptions& options, Backend* backend)
      : config_(config), options_(options), backend_(backend) {}
  absl::Status Validate(absl::Span<ForwardItem> items) const;
  // Forward after the states are bound and the backend's forward has begun.
  absl::Status ForwardBound(absl::Span<ForwardItem> items,
                            const std::vector<SequenceState*>& states, ForwardOutput* out,
                            const LayerDoneCallback& on_layer_done, bool device_sampling);
  absl::Status KdaLayer(int64_t layer, int64_t kda_index, const float* h, int64_t rows,
                        const std::vector<SequenceState*>& states,
                        const std::vector<SeqSlice>& seqs, float* out);
  absl::Status MlaLayer(int64_t layer, int64_t mla_index, const float* h, int64_t rows,
                        const std::vector<SequenceState*>& states,
                        const std::vector<SeqSlice>& seqs, float* out);
  absl::Status Ffn(int64_t layer, const float* h, int64_t rows, float* out);

  ModelConfig config_;
  ModelOptions options_;
  Backend* backend_;
  ModelWeights weights_;
};

}  // namespace kl

#endif  // KL_ENGINE_MODEL_MODEL_H_
