#include "services/transport/device_transport.h"

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

absl::Duration LinkIdleLimit(const DeviceTransportOptions& options, bool decode_side) {
  if (options.link_idle_timeout <= absl::ZeroDuration()) return absl::InfiniteDuration();
  return decode_side ? 2 * options.link_idle_timeout : options.link_idle_timeout;
}

absl::StatusOr<std::unique_ptr<DeviceTransport>> MakeDeviceTransport(
    const ModelConfig& config, DeviceStateAccess* access, const DeviceTransportOptions& options) {
  if (!Factory() || access == nullptr || !options.enabled) return nullptr;
  return Factory()(config, access, options);
}

}  // namespace kl
