// What prefill and decode workers report of their device transport: its
// WorkerStats fields, and the Prometheus families read from them at scrape
// time (README.md's metrics table): what went over device links and how long
// their set-up took.
#ifndef KL_SERVICES_TRANSPORT_DEVICE_METRICS_H_
#define KL_SERVICES_TRANSPORT_DEVICE_METRICS_H_

#include <functional>

#include "proto/worker.pb.h"
#include "services/common/metrics.h"
#include "services/transport/device_transport.h"

namespace kl {

// The device_* fields of `out` from `t` (device_fallbacks is 0 on a decode
// worker, which never picks the transport).
void SetDeviceTransportStats(const DeviceTransportStats& t, v1::WorkerStats* out);

void RegisterDeviceTransportCallbacks(Metrics& m, std::function<v1::WorkerStats()> snapshot);

}  // namespace kl

#endif  // KL_SERVICES_TRANSPORT_DEVICE_METRICS_H_
