// The device transport's Prometheus families that prefill and decode workers
// share (README.md's metrics table): what went over device links and how long
// their set-up took. Read from the worker's WorkerStats at scrape time.
#ifndef KL_SERVICES_TRANSPORT_DEVICE_METRICS_H_
#define KL_SERVICES_TRANSPORT_DEVICE_METRICS_H_

#include <functional>

#include "proto/worker.pb.h"
#include "services/common/metrics.h"

namespace kl {

void RegisterDeviceTransportCallbacks(Metrics& m, std::function<v1::WorkerStats()> snapshot);

}  // namespace kl

#endif  // KL_SERVICES_TRANSPORT_DEVICE_METRICS_H_
