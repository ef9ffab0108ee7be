// DeviceTransport: moves a request's state from a prefill worker's GPU straight
// into a decode worker's GPU (docs/nccl_transfer.md). gRPC stays the control
// plane — the rendezvous (Decode.OpenTransport), the plan and the checksums
// ride the PushState stream — and the bytes go over a device link (an NCCL
// communicator of two ranks: prefill 0, decode 1).
//
// One link carries one transfer at a time (both ends then issue their sends
// and receives in plan order, so they always match). The sender announces each
// group of messages on the PushState stream when its data is ready and sends
// it as one NCCL group; the receiver posts the group's receives only then, so
// no receive waits on its GPU for data still being computed. A worker keeps up to
// `links_per_peer` links per peer and falls back to the gRPC bundle when none
// is free. Any error on a link (NCCL error, timeout, a cancelled or refused
// transfer) aborts it on that side (ncclCommAbort: pending operations end) and
// drops it; the peer drops its end at its own next error or timeout. A dropped
// link never blocks a worker: waits are bounded and the state memory of a
// failed transfer goes back only after the link's stream has drained.
//
// The interface has no CUDA or NCCL types: the implementation
// (nccl_transport.cc) registers itself in GPU builds; CPU builds get null from
// MakeDeviceTransport and always use gRPC.
#ifndef KL_SERVICES_TRANSPORT_DEVICE_TRANSPORT_H_
#define KL_SERVICES_TRANSPORT_DEVICE_TRANSPORT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/backend/device_state.h"
#include "engine/config/model_config.h"
#include "engine/state/sequence_state.h"
#include "proto/worker.pb.h"
#include "services/transport/transfer_plan.h"

namespace kl {

// 2: receives are posted per announced group (StatePart.device_groups).
inline constexpr int32_t kDeviceTransportProtocol = 2;

struct DeviceTransportOptions {
  bool enabled = true;            // false: answer / choose "grpc" always
  int links_per_peer = 4;         // concurrent transfers to one peer over NCCL
  absl::Duration init_timeout = absl::Seconds(20);   // ncclCommInitRank
  // A transfer's receives / sends must finish within this plus bytes at 1 GB/s.
  absl::Duration transfer_timeout = absl::Seconds(10);
  // Prefill side: the first transfer to a peer waits for its first link to
  // come up instead of going over gRPC while it does (tests and benchmarks);
  // further links always come up in the background.
  bool sync_open = false;
  // Ship every layer after the forward instead of as each layer finishes
  // (benchmarks: layer-wise overlap against ship-at-end).
  bool ship_at_end = false;
  // Allow links to peers on other hosts (NCCL's network transport must reach
  // them). Off: peers on another host use gRPC.
  bool cross_host = false;
  // Overlap each group's pack + checksum (sender) or checksum + scatter
  // (receiver) with the NCCL transfer of the neighbouring group: a second
  // stream per link and two staging halves. Local to each side (the peers
  // need not agree).
  bool pipeline = false;
  // Prefill side: the largest MLA message of a plan (a layer's rows beyond it
  // move as several messages, so packing, sending and scattering overlap when
  // pipelined, and each side's staging stays this size). At most
  // kMaxMlaMessageBytes, which the receiver enforces.
  int64_t message_bytes = kDefaultMessageBytes;
  // A link that carried nothing for this long is closed (its communicator's
  // buffers and threads freed); zero: never. The prefill side, which picks
  // links, closes first; the decode side waits twice the longer of its own
  // and the peer's (LinkIdleLimit), so it does not close a link its peer may
  // still pick.
  absl::Duration link_idle_timeout = absl::Minutes(10);
};

// How long a link may stay unused before this side closes it
// (InfiniteDuration: never). Prefill side: its own timeout. Decode side: twice
// the longer of its own and the peer's (`peer_timeout`, from the rendezvous;
// zero or less: never, as for a peer that does not say).
absl::Duration LinkIdleLimit(const DeviceTransportOptions& options, bool decode_side,
                             absl::Duration peer_timeout = absl::ZeroDuration());

// Prefill side: one outgoing transfer on a link it holds exclusively.
class DeviceSend {
 public:
  virtual ~DeviceSend() = default;
  virtual uint64_t link_id() const = 0;
  virtual const std::vector<v1::DeviceMessage>& plan() const = 0;
  // Engine thread, inside the forward, after layer `layer` of `state` (rows
  // [row_begin, row_end) for MLA): queues the next plan messages, which must be
  // this layer's (one for KDA; for MLA, consecutive pieces covering exactly
  // those rows), behind the layer's compute. INTERNAL on a plan mismatch.
  virtual absl::Status OnLayer(const SequenceState& state, int64_t layer, int64_t row_begin,
                               int64_t row_end) = 0;
  // Engine thread, after the last forward: ship-at-end mode queues everything
  // here; otherwise a no-op. Keeps `state`'s device memory until the sends end.
  virtual absl::Status AfterForward(const SequenceState& state) = 0;
  // Sender thread: `wake` is called (from any thread) whenever TakeGroups has
  // something new — a group to announce or a failure of the link. Set before
  // the first TakeGroups (groups made ready earlier are kept for it);
  // SetWake(nullptr) clears it.
  virtual void SetWake(std::function<void()> wake) = 0;
  // Sender thread: appends the groups whose data became ready since the last
  // call (the link sends each right after this announcement; the receiver must
  // post the matching receives), in plan order. `*drained`: every message
  // queued so far has been announced — after AfterForward, the transfer's
  // announcements are over. An error: the transfer failed (the link is aborted
  // at End).
  virtual absl::Status TakeGroups(std::vector<MessageGroup>* groups, bool* drained) = 0;
  // Sender thread, after the last group was taken: waits until every message
  // has gone out (bounded) and returns one checksum per plan message.
  // `peer_alive` is called about every 100 ms of the wait (the pusher writes a
  // progress message: false once the decode worker has ended the call, e.g.
  // after refusing a group); false ends the wait at once with UNAVAILABLE
  // instead of at the deadline.
  virtual absl::StatusOr<std::vector<uint64_t>> Complete(
      const std::function<bool()>& peer_alive) = 0;
  // FAULT INJECTION (tests): stop sending after half the plan's messages, as
  // a sender that dies mid-transfer; Complete then aborts the link and fails.
  virtual void InjectCut() = 0;
  // FAULT INJECTION (tests): damages one bit of the plan's first MLA message
  // (`mla`) or first KDA message in flight (FaultTargetMessage: the other kind
  // when the plan has none of this one): after the sender summed it, before
  // it goes out (a KDA bit is flipped back in the sender's state once the send
  // went out; a failed send leaves it, as that state is never decoded). The
  // checksums stay the sender's, so only the receiver's own sum can catch it.
  virtual void InjectCorrupt(bool mla) = 0;
  // The transfer is over: ok = the decode worker accepted it (the link goes
  // back to the pool); otherwise the link is aborted and dropped. Idempotent;
  // any thread.
  virtual void End(bool ok) = 0;
};

// Decode side: one incoming transfer into a freshly allocated device state.
class DeviceReceive {
 public:
  virtual ~DeviceReceive() = default;
  // The sender announced `group`: posts its receives (on the link's worker;
  // cheap). INVALID_ARGUMENT when the group does not continue the plan or does
  // not fit the staging both ends derive from it (ValidateGroup); the link's
  // error when an earlier group already failed on it; ABORTED after Abort.
  // The caller fails the transfer on any error (ending the call, which the
  // sender notices at its next write).
  virtual absl::Status Receive(const MessageGroup& group) = 0;
  // Waits (bounded) for every receive, checks each message against the
  // sender's checksums, and hands back the state (device-resident, complete).
  // DATA_LOSS on a mismatch or when some message was never announced,
  // DEADLINE_EXCEEDED on a timeout. Blocks: call off the gRPC callback threads.
  virtual absl::StatusOr<SequenceState> Complete(const std::vector<uint64_t>& checksums) = 0;
  // Aborts the link (pending receives end), frees the state once the link's
  // stream has drained. Idempotent; any thread.
  virtual void Abort() = 0;
};

struct DeviceTransportStats {
  int64_t links_ready = 0;
  int64_t transfers_ok = 0;
  int64_t transfers_failed = 0;
  int64_t links_opened = 0;
  int64_t links_dropped = 0;
  int64_t fallbacks = 0;  // prefill: transfers sent over gRPC for want of a link
  int64_t bytes = 0;      // of the transfers that went through
  int64_t messages = 0;   // plan messages of the transfers that went through
  int64_t link_inits = 0;          // links whose set-up finished (ncclCommInitRank)
  int64_t link_init_failures = 0;  // links whose set-up failed or timed out
  int64_t links_idle_closed = 0;   // links closed for carrying nothing (link_idle_timeout)
  double link_init_seconds = 0;    // set-up time of the finished ones, in all
};

class DeviceTransport {
 public:
  virtual ~DeviceTransport() = default;

  // --- decode side
  // Decode.OpenTransport: "nccl" with a new link (initialising in the
  // background) or "grpc" with the reason.
  virtual v1::OpenTransportResponse Accept(const v1::OpenTransportRequest& request) = 0;
  // Starts receiving a transfer of `num_tokens` tokens over link `link_id`:
  // validates the plan, allocates the device state and the link's scratch;
  // the receives are posted per announced group (DeviceReceive::Receive).
  // NOT_FOUND (no such ready link), ABORTED (link busy), INVALID_ARGUMENT (bad
  // plan), RESOURCE_EXHAUSTED (no slot / pages).
  virtual absl::StatusOr<std::unique_ptr<DeviceReceive>> BeginReceive(
      uint64_t link_id, const v1::DeviceTransfer& transfer, int64_t num_tokens) = 0;

  // --- prefill side
  // A transfer of `plan` to the decode worker at `address`, or an error
  // meaning "use gRPC for this one" (UNAVAILABLE: no free link yet / the peer
  // answered grpc). Opens links as needed through `channel`.
  virtual absl::StatusOr<std::unique_ptr<DeviceSend>> BeginSend(
      const std::string& address, const std::shared_ptr<grpc::Channel>& channel,
      std::vector<v1::DeviceMessage> plan) = 0;
  // This worker's offer (tests; BeginSend sends it).
  virtual v1::OpenTransportRequest Offer() const = 0;
  // Sizes of what a plan's messages carry on this worker's device layout.
  virtual PlanSizes plan_sizes() const = 0;

  virtual DeviceTransportStats Stats() const = 0;
};

using DeviceTransportFactory = std::function<absl::StatusOr<std::unique_ptr<DeviceTransport>>(
    const ModelConfig& config, DeviceStateAccess* access, const DeviceTransportOptions& options)>;

// Called by a static initializer of the implementation (GPU builds).
bool RegisterDeviceTransport(DeviceTransportFactory factory);
// The registered transport over `access`, or null when this build has none,
// `access` is null (a host backend) or options.enabled is false.
absl::StatusOr<std::unique_ptr<DeviceTransport>> MakeDeviceTransport(
    const ModelConfig& config, DeviceStateAccess* access, const DeviceTransportOptions& options);

}  // namespace kl

#endif  // KL_SERVICES_TRANSPORT_DEVICE_TRANSPORT_H_
