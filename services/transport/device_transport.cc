#include "services/transport/device_transport.h"

#include <algorithm>
#include <utility>

namespace kl {
namespace {

DeviceTransportFactory& Factory() {
  static auto* f = new DeviceTransportFactory();
  return *f;
}

}  // namespace

bool RegisterDeviceTransport(DeviceTransportFactory factory) {
  Factory() = std::move(factory);
  return true;
}

absl::Duration LinkIdleLimit(const DeviceTransportOptions& options, bool decode_side,
                             absl::Duration peer_timeout) {
  const absl::Duration own = options.link_idle_timeout;
  if (own <= absl::ZeroDuration()) return absl::InfiniteDuration();
  if (!decode_side) return own;
  if (peer_timeout <= absl::ZeroDuration()) return absl::InfiniteDuration();
  return 2 * std::max(own, peer_timeout);
}

absl::StatusOr<std::unique_ptr<DeviceTransport>> MakeDeviceTransport(
    const ModelConfig& config, DeviceStateAccess* access, const DeviceTransportOptions& options) {
  if (!Factory() || access == nullptr || !options.enabled) return nullptr;
  return Factory()(config, access, options);
}

}  // namespace kl
