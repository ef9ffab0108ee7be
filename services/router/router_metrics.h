// kl-router's Prometheus families (README "Metrics"). Histograms and the
// per-label counters are observed by the request lifecycle; the gauges and
// the counters RouterCounters already keeps are read at scrape time
// (RegisterRouterCallbacks). A null RouterMetrics* means metrics are off.
#ifndef KL_SERVICES_ROUTER_ROUTER_METRICS_H_
#define KL_SERVICES_ROUTER_ROUTER_METRICS_H_

#include <string>

#include "absl/status/status.h"
#include "services/common/metrics.h"

namespace kl {

class RouterService;

struct RouterMetrics {
  explicit RouterMetrics(prometheus::Registry& r);

  prometheus::Histogram& ttft;          // router receipt -> first token written (incl. transfer)
  prometheus::Histogram& itl;           // gap between streamed chunks
  prometheus::Histogram& tpot;          // (e2e - ttft) / (tokens - 1), per request
  prometheus::Histogram& e2e;           // receipt -> final status
  prometheus::Histogram& queue_time;    // receipt -> a driver thread took it
  prometheus::Counter& prompt_tokens;
  prometheus::Counter& generation_tokens;
  prometheus::Counter& success_stop;
  prometheus::Counter& success_length;
  prometheus::Counter& success_abort;   // a stream ended OK without a finish reason (not expected)

  // kl_request_failure_total{code}, one series per code, created on first use.
  void CountFailure(absl::StatusCode code);

 private:
  prometheus::Family<prometheus::Counter>& failure_;
};

// Gauges and counters read from `service` at scrape time: running / waiting
// requests, retries, migrations, cancellations, rejections{reason}.
void RegisterRouterCallbacks(Metrics& metrics, const RouterService* service);

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_ROUTER_METRICS_H_
