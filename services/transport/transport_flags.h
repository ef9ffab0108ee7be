// Command-line flags of the device transport, shared by kl-prefill and
// kl-decode: --transport, --nccl_*.
#ifndef KL_SERVICES_TRANSPORT_TRANSPORT_FLAGS_H_
#define KL_SERVICES_TRANSPORT_TRANSPORT_FLAGS_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/model/model.h"
#include "services/transport/device_transport.h"

namespace kl {

// The transport the flags ask for over `model`'s backend: null with
// --transport=grpc, in CPU builds, or on a host backend. INVALID_ARGUMENT for
// bad flag values.
absl::StatusOr<std::unique_ptr<DeviceTransport>> DeviceTransportFromFlags(Model& model);

// The options the flags give (enabled = --transport=auto). INVALID_ARGUMENT
// naming the flag for bad values.
absl::StatusOr<DeviceTransportOptions> DeviceTransportOptionsFromFlags();

}  // namespace kl

#endif  // KL_SERVICES_TRANSPORT_TRANSPORT_FLAGS_H_
