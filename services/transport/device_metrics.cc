#include "services/transport/device_metrics.h"

#include <string>
#include <utility>

namespace kl {

void SetDeviceTransportStats(const DeviceTransportStats& t, v1::WorkerStats* out) {
  out->set_device_links(t.links_ready);
  out->set_device_transfers(t.transfers_ok);
  out->set_device_transfer_failures(t.transfers_failed);
  out->set_device_fallbacks(t.fallbacks);
  out->set_device_messages(t.messages);
  out->set_device_bytes(t.bytes);
  out->set_device_link_inits(t.link_inits);
  out->set_device_link_init_failures(t.link_init_failures);
  out->set_device_link_init_seconds(t.link_init_seconds);
  out->set_device_links_idle_closed(t.links_idle_closed);
}

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
  m.AddCallbackCounter("kl_device_links_idle_closed_total",
                       "Device links closed after carrying nothing for --nccl_link_idle_s (on "
                       "decode workers: twice the longer of their own and the peer's).",
                       {}, get(&v1::WorkerStats::device_links_idle_closed));
  m.AddCallbackCounter("kl_device_link_init_seconds_total",
                       "Time the device link set-ups that finished took, in all (divide by "
                       "kl_device_link_inits_total{result=\"ok\"} for the mean).",
                       {}, get(&v1::WorkerStats::device_link_init_seconds));
}

}  // namespace kl
