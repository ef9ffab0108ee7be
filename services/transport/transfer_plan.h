// The plan of a device state transfer: the ordered list of messages a prefill
// worker sends over a device link (services/transport/device_transport.h), one
// per layer as its prefill finishes. Both ends derive their work from it: the
// sender checks each finished layer against the next message, the receiver
// posts one receive per message before the first one arrives.
#ifndef KL_SERVICES_TRANSPORT_TRANSFER_PLAN_H_
#define KL_SERVICES_TRANSPORT_TRANSFER_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "engine/config/model_config.h"
#include "proto/worker.pb.h"

namespace kl {

// Byte sizes of what moves: a KDA layer (recurrent state + three conv tails)
// and one latent row, as the device layout stores them.
struct PlanSizes {
  int64_t kda_layer_bytes = 0;
  int64_t latent_row_bytes = 0;
};

// KDA layer bytes of `config` (fp32 state and tails, device_state.h).
int64_t KdaLayerBytes(const ModelConfig& config);

// The messages of a prefill of `num_tokens` tokens run in chunks of at most
// `chunk_tokens` (the prefill engine's order: every layer of each chunk; MLA
// rows of every chunk, KDA layers only in the last chunk, whose state is final).
std::vector<v1::DeviceMessage> BuildTransferPlan(const ModelConfig& config, int64_t num_tokens,
                                                 int64_t chunk_tokens, const PlanSizes& sizes);

struct PlanSummary {
  int64_t total_bytes = 0;
  int64_t max_mla_bytes = 0;  // the largest MLA message (receive staging)
};

// Checks a plan received from a peer against this worker's model and layout:
// every KDA layer exactly once with kda_layer_bytes, every MLA layer's rows
// covering [0, num_tokens) exactly, in order, with row_end - row_begin rows of
// latent_row_bytes; nothing else. INVALID_ARGUMENT naming the first problem.
absl::Status ValidateTransferPlan(const google::protobuf::RepeatedPtrField<v1::DeviceMessage>& plan,
                                  const ModelConfig& config, int64_t num_tokens,
                                  const PlanSizes& sizes, PlanSummary* summary);

}  // namespace kl

#endif  // KL_SERVICES_TRANSPORT_TRANSFER_PLAN_H_
