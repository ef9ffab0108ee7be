// The PushState RPC (client streaming) on the callback API: receives one
// request's StateBundle frame by frame from a prefill worker and verifies each
// with a BundleAssembler configured with this worker's model config and
// checkpoint fingerprint. Only a complete, verified state is adopted into the
// lease; any failure drops the partial assembly and leaves the lease reserved
// and empty, so the router can retry the push (or release the lease).
//
// Status codes: NOT_FOUND unknown/expired lease; INVALID_ARGUMENT no lease id on
// the first message (or a different one later) or malformed bundle content;
// FAILED_PRECONDITION incompatible bundle (fingerprints, version, layout);
// DATA_LOSS corrupt or duplicated frame, or the stream ended before the bundle
// was complete;
// ALREADY_EXISTS the lease already holds a state; ABORTED superseded by a newer
// push on the same lease; CANCELLED the client went away.
//
// Device transfers (StatePart.device, services/transport): the first message
// carries the header frame and the plan (the device state is allocated then);
// messages with device_groups announce groups of plan messages, whose receives
// are posted at once and whose parts arrive over the device link straight into
// the device state; the last message carries the sender's checksums.
// INVALID_ARGUMENT also for a group that does not continue the plan. Also: FAILED_PRECONDITION this worker has no device
// transport; UNAVAILABLE the named link is unknown or not ready; DATA_LOSS a
// checksum mismatch or the stream ended before the checksums; DEADLINE_EXCEEDED
// the device receives did not finish in time. Every failure aborts the link
// (pending receives end) and frees the device state.
#ifndef KL_SERVICES_DECODE_PUSH_STREAM_H_
#define KL_SERVICES_DECODE_PUSH_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>

#include "engine/config/model_config.h"
#include "proto/worker.grpc.pb.h"
#include "services/decode/lease_manager.h"

#include "services/decode/state_pool.h"
#include "services/transport/device_transport.h"

namespace kl {

struct PushStreamDeps {
  LeaseManager* leases = nullptr;
  const ModelConfig* config = nullptr;
  uint64_t checkpoint_fingerprint = 0;    // bundles must carry exactly this
  std::atomic<int64_t>* integrity_failures = nullptr;  // bumped on refused bundles
  StatePool* state_pool = nullptr;  // buffers to import into (optional)
  DeviceTransport* transport = nullptr;  // device transfers (optional)
};

// Starts a PushState call; the reactor deletes itself when done.
grpc::ServerReadReactor<v1::StatePart>* StartPushCall(grpc::CallbackServerContext* ctx,
                                                      v1::PushStateResponse* response,
                                                      const PushStreamDeps& deps);

}  // namespace kl

#endif  // KL_SERVICES_DECODE_PUSH_STREAM_H_
