// kl-prefill's Prometheus families (README "Metrics"). Observed by the
// PrefillEngine (null PrefillMetrics*: metrics off); the queue gauges are read
// from PrefillService::Snapshot at scrape time (RegisterPrefillCallbacks).
#ifndef KL_SERVICES_PREFILL_PREFILL_METRICS_H_
#define KL_SERVICES_PREFILL_PREFILL_METRICS_H_

#include "absl/status/status.h"
#include "services/common/metrics.h"

namespace kl {

class PrefillService;

struct PrefillMetrics {
  explicit PrefillMetrics(prometheus::Registry& r);

  prometheus::Histogram& prefill_time;   // first forward started -> token sampled
  prometheus::Histogram& queue_time;     // Submit -> first forward
  prometheus::Histogram& batch_tokens;   // tokens per Forward
  prometheus::Counter& kda_bytes;        // kl_state_transfer_bytes_total{kind="kda_state"}
  prometheus::Counter& mla_bytes;        // {kind="mla_latent"}
  prometheus::Counter& other_bytes;      // {kind="framing"}: header and final record
  prometheus::Histogram& bundle_seconds; // kl_state_transfer_seconds{kind="bundle"}
  prometheus::Histogram& kda_seconds;    // {kind="kda_state"}
  prometheus::Histogram& mla_seconds;    // {kind="mla_latent"}

  // kl_state_transfer_failures_total{code}
  void CountTransferFailure(absl::StatusCode code);

 private:
  prometheus::Family<prometheus::Counter>& failures_;
};

void RegisterPrefillCallbacks(Metrics& metrics, const PrefillService* service);

}  // namespace kl

#endif  // KL_SERVICES_PREFILL_PREFILL_METRICS_H_
