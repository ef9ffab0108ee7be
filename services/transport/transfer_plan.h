// The plan of a device state transfer: the ordered list of messages a prefill
// worker sends over a device link (services/transport/device_transport.h), one
// per layer as its prefill finishes. Both ends derive their work from it: the
// sender checks each finished layer against the next message, the receiver
// posts the receives of each group of messages the sender announces.
#ifndef KL_SERVICES_TRANSPORT_TRANSFER_PLAN_H_
#define KL_SERVICES_TRANSPORT_TRANSFER_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/config/model_config.h"
#include "proto/worker.pb.h"

namespace kl {

// Byte sizes of what moves: a KDA layer (recurrent state + three conv tails)
// and one latent row, as the device layout stores them; and the sender's bound
// on one MLA message (0: none), which splits a layer's rows into several
// messages so that packing, sending and scattering overlap and the staging
// buffers stay small.
struct PlanSizes {
  int64_t kda_layer_bytes = 0;
  int64_t latent_row_bytes = 0;
  int64_t max_message_bytes = 0;
};

// The largest MLA message a receiver accepts (its staging holds one, or two
// when pipelined): a peer's plan with a larger one is refused.
inline constexpr int64_t kMaxMlaMessageBytes = int64_t{256} << 20;
// The sender's default bound on an MLA message, and the smallest it may set.
inline constexpr int64_t kDefaultMessageBytes = int64_t{16} << 20;
inline constexpr int64_t kMinMessageBytes = int64_t{4} << 10;

// KDA layer bytes of `config` (fp32 state and tails, device_state.h).
int64_t KdaLayerBytes(const ModelConfig& config);

// The messages of a prefill of `num_tokens` tokens run in chunks of at most
// `chunk_tokens` (the prefill engine's order: every layer of each chunk; MLA
// rows of every chunk, KDA layers only in the last chunk, whose state is final).
// A chunk's rows of an MLA layer are consecutive messages of at most
// sizes.max_message_bytes each (at least one row), as equal in size as rows
// allow.
std::vector<v1::DeviceMessage> BuildTransferPlan(const ModelConfig& config, int64_t num_tokens,
                                                 int64_t chunk_tokens, const PlanSizes& sizes);

// The plan messages a finished layer covers: `layer`'s message at `next` if it
// is a KDA layer, else the consecutive messages of `layer` from `next` whose
// rows make up exactly [row_begin, row_end). Returns the index after them;
// INTERNAL naming the message that does not match.
absl::StatusOr<int64_t> LayerMessagesEnd(const std::vector<v1::DeviceMessage>& plan, int64_t next,
                                         int64_t layer, int64_t row_begin, int64_t row_end);

// FAULT INJECTION (tests): the plan message that `corrupt` damages in flight:
// the first non-empty MLA message (`mla`) or KDA message, else the first
// non-empty message of the other kind; -1 when every message is empty.
int64_t FaultTargetMessage(const std::vector<v1::DeviceMessage>& plan, bool mla);

struct PlanSummary {
  int64_t total_bytes = 0;
  int64_t max_mla_bytes = 0;  // the largest MLA message (receive staging)
};

// Checks a plan received from a peer against this worker's model and layout:
// every KDA layer exactly once with kda_layer_bytes, every MLA layer's rows
// covering [0, num_tokens) exactly, in order, with row_end - row_begin rows of
// latent_row_bytes, none over kMaxMlaMessageBytes; nothing else (the sender's
// max_message_bytes is its own choice). INVALID_ARGUMENT naming the first problem.
absl::Status ValidateTransferPlan(const google::protobuf::RepeatedPtrField<v1::DeviceMessage>& plan,
                                  const ModelConfig& config, int64_t num_tokens,
                                  const PlanSizes& sizes, PlanSummary* summary);

// Messages move in groups: consecutive plan messages whose data is ready on
// the sender go out as one NCCL group (one launch on each side) once the sender
// has announced the group on the PushState stream; the receiver posts the
// matching receives only then, so no receive waits on a GPU for data that is
// still being computed. Each MLA message of a group needs its own place in the
// link's staging buffer (KDA messages move in place).
struct MessageGroup {
  int64_t first = 0;
  int64_t count = 0;
};

inline constexpr int64_t kStagingAlign = 256;
// Grouping never grows staging past the largest single MLA message or this
// (device memory per link on each side, outside the latent budget).
inline constexpr int64_t kGroupStagingBytes = int64_t{16} << 20;
inline constexpr int64_t kMaxGroupMessages = 64;
inline int64_t AlignStaging(int64_t bytes) {
  return (bytes + kStagingAlign - 1) / kStagingAlign * kStagingAlign;
}

// Per plan message: its MLA bytes (0 for a KDA message).
std::vector<int64_t> MlaBytes(const std::vector<v1::DeviceMessage>& plan);
std::vector<int64_t> MlaBytes(const google::protobuf::RepeatedPtrField<v1::DeviceMessage>& plan);
// Staging bytes a link holds for a plan (both ends compute the same): the
// largest MLA message, or more — up to kGroupStagingBytes — to group several.
int64_t StagingCapacity(const std::vector<int64_t>& mla_bytes);
// Staging bytes messages [first, first + count) take (each MLA message aligned).
int64_t GroupStagingBytes(const std::vector<int64_t>& mla_bytes, int64_t first, int64_t count);
// An announced group must continue at `next`, hold 1..kMaxGroupMessages
// messages inside the plan and fit `capacity`. INVALID_ARGUMENT otherwise.
absl::Status ValidateGroup(const std::vector<int64_t>& mla_bytes, int64_t next,
                           const MessageGroup& group, int64_t capacity);

}  // namespace kl

#endif  // KL_SERVICES_TRANSPORT_TRANSFER_PLAN_H_
