#include "services/transport/device_metrics.h"

#include <string>
#include <utility>

namespace kl {

void RegisterDeviceTransportCallbacks(Metrics& m, std::function<v1::WorkerStats()> snapshot) {
  auto get = [snapshot](auto field) {
    return [snapshot, field] { return static_cast<double>((snapshot().*field)()); };
  };
  m.AddCallbackCounter("kl_device_transfer_bytes_total",
                       "State bytes of the device transfers (NCCL) that went through.", {},
                       get(&v1::WorkerStats::device_bytes));
  m.AddCallbackCounter("kl_device_transfer_messages_total",
                       "Plan messages of the device transfers (NCCL) that went through (a KDA "
                       "layer is one; MLA rows go in pieces of at most --nccl_message_mb).",
                       {}, get(&v1::WorkerStats::device_messages));
  const std::string inits_help =
      "Device link (NCCL communicator) set-ups that started, by result (a peer that answers "
      "gRPC starts none).";
  m.AddCallbackCounter("kl_device_link_inits_total", inits_help, {{"result", "ok"}},
                       get(&v1::WorkerStats::device_link_inits));
  m.AddCallbackCounter("kl_device_link_inits_total", inits_help, {{"result", "failed"}},
                       get(&v1::WorkerStats::device_link_init_failures));
  m.AddCallbackCounter("kl_device_link_init_seconds_total",
                       "Time the device link set-ups that finished took, in all (divide by "
                       "kl_device_link_inits_total{result=\"ok\"} for the mean).",
                       {}, get(&v1::WorkerStats::device_link_init_seconds));
}

}  // namespace kl
