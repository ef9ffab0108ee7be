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

absl::StatusOr<std::unique_ptr<DeviceTransport>> MakeDeviceTransport(
    const ModelConfig& config, DeviceStateAccess* access, const DeviceTransportOptions& options) {
  if (!Factory() || access == nullptr || !options.enabled) return nullptr;
  return Factory()(config, access, options);
}

}  // namespace kl
