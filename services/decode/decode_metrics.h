// kl-decode's Prometheus families observed by the DecodeEngine (null
// DecodeMetrics*: metrics off). Slot, lease, latent-cache and integrity
// families are read from DecodeService::Snapshot at scrape time
// (RegisterDecodeCallbacks in decode_service.h).
#ifndef KL_SERVICES_DECODE_DECODE_METRICS_H_
#define KL_SERVICES_DECODE_DECODE_METRICS_H_

#include "services/common/metrics.h"

namespace kl {

struct DecodeMetrics {
  explicit DecodeMetrics(prometheus::Registry& r)
      : step_seconds(AddHistogram(r, "kl_decode_step_seconds",
                                  "One continuous-batching decode step (Forward over the batch, "
                                  "one token per sequence).",
                                  buckets::TokenLatency())),
        batch_size(AddHistogram(r, "kl_decode_batch_size", "Sequences per decode step.",
                                buckets::PowersOfTwo(12))) {}

  prometheus::Histogram& step_seconds;
  prometheus::Histogram& batch_size;
};

}  // namespace kl

#endif  // KL_SERVICES_DECODE_DECODE_METRICS_H_
