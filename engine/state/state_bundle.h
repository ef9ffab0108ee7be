// StateBundle: the self-describing, verifiable, streamable hand-off of one
// request's SequenceState from a prefill worker to a decode worker
// (ARCHITECTURE.md §3; byte layout and status codes in engine/state/FORMAT.md).
//
//   streaming, sender:   BundleWriter   (bundle_writer.h)  header, parts per layer, final
//   streaming, receiver: BundleAssembler (bundle_assembler.h) Add(frame)..., Finish()
//   one call:            EncodeBundle / SerializeBundle / DeserializeBundle (below)
//
// A blob (file, test fixture) is simply the frames concatenated: every frame is
// self-delimiting (its 32-byte prefix holds its size).
#ifndef KL_ENGINE_STATE_STATE_BUNDLE_H_
#define KL_ENGINE_STATE_STATE_BUNDLE_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/config/model_config.h"
#include "engine/state/bundle_assembler.h"
#include "engine/state/bundle_format.h"
#include "engine/state/bundle_writer.h"
#include "engine/state/sequence_state.h"

namespace kl {

// All frames of `state` (header, then each layer's parts in layer order, then
// the final record). `config` gives the layer map; `state` must match it
// (INVALID_ARGUMENT otherwise) and have num_tokens >= 1. Options must use the
// canonical layouts (a SequenceState is [H][K][V] / [W-1][C]).
absl::StatusOr<std::vector<BundleFrame>> EncodeBundle(const ModelConfig& config,
                                                      const SequenceState& state,
                                                      const BundleMeta& meta,
                                                      const BundleOptions& options = {});

// EncodeBundle's frames concatenated into one blob.
absl::StatusOr<std::string> SerializeBundle(const ModelConfig& config, const SequenceState& state,
                                            const BundleMeta& meta,
                                            const BundleOptions& options = {});

struct DecodedBundle {
  BundleHeader header;  // request id, first token, fingerprints, dtypes, ...
  SequenceState state;
};

// Feeds every frame of `blob` to a BundleAssembler for `config` and finishes
// it. A blob cut inside a frame is DATA_LOSS; other codes as BundleAssembler.
absl::StatusOr<DecodedBundle> DeserializeBundle(std::string_view blob, const ModelConfig& config,
                                                const AssemblerOptions& options = {});

// Splits a blob into its frames using their prefixes only (no CRC checks).
absl::StatusOr<std::vector<std::string_view>> SplitFrames(std::string_view blob);

}  // namespace kl

#endif  // KL_ENGINE_STATE_STATE_BUNDLE_H_
