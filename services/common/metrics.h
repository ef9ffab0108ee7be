// Prometheus metrics of one process: a prometheus::Registry served as text on
// `GET /metrics` by prometheus-cpp's civetweb Exposer bound to --metrics_listen
// (host:port; port 0 picks a free one, port() tells which). Families follow
// /work/shared/design/ANCHORS.md §5: base units, the `kl_` prefix, vLLM's names.
//
// Besides the registry's own counters / gauges / histograms, a process may add
// callback families: gauges (or counters) whose value is read from a function
// at scrape time, for what the services already count (queue depths, slot
// occupancy, existing atomic counters) — no extra bookkeeping on hot paths.
//
// Threading: the registry's metrics are thread-safe; callbacks run on the
// Exposer's thread. ClearCallbacks() before destroying what they read.
#ifndef KL_SERVICES_COMMON_METRICS_H_
#define KL_SERVICES_COMMON_METRICS_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/status/statusor.h"

namespace prometheus {
class Exposer;
}

namespace kl {

class CallbackCollectable;

class Metrics {
 public:
  // Serves the registry on `listen` ("host:port", port 0 allowed).
  // INVALID_ARGUMENT for a malformed address, UNAVAILABLE when it cannot bind.
  static absl::StatusOr<std::unique_ptr<Metrics>> Serve(const std::string& listen);
  // A registry that is not served (tests read it with Text()).
  static std::unique_ptr<Metrics> Unserved();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  prometheus::Registry& registry() { return *registry_; }
  // The bound port (0 when unserved).
  int port() const { return port_; }

  using Labels = std::map<std::string, std::string>;
  // A gauge / counter family `name` with one series per call (same name, other
  // labels), valued by `fn` at scrape time.
  void AddCallbackGauge(const std::string& name, const std::string& help, const Labels& labels,
                        std::function<double()> fn);
  void AddCallbackCounter(const std::string& name, const std::string& help, const Labels& labels,
                          std::function<double()> fn);
  // Drops every callback (call before what they read goes away).
  void ClearCallbacks();

  // Everything in the Prometheus text format, as /metrics serves it.
  std::string Text() const;

 private:
  Metrics();
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<CallbackCollectable> callbacks_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string host_;  // as given to Serve ("0.0.0.0", "[::]", an address, a name)
  int port_ = 0;
};

// Bucket sets (upper bounds, seconds unless named otherwise).
namespace buckets {
// TTFT: 1 ms .. 40 minutes.
const std::vector<double>& Ttft();
// Inter-token latency and TPOT: 0.5 ms .. 80 s, dense below 10 ms.
const std::vector<double>& TokenLatency();
// Request-level durations (E2E, queue, prefill): 1 ms .. ~2 hours.
const std::vector<double>& Request();
// State transfer and decode steps: 0.5 ms .. 5 s.
const std::vector<double>& Transfer();
// Counts (tokens per batch, sequences per step): 1, 2, 4, ... 2^20.
const std::vector<double>& PowersOfTwo(int max_exponent);
}  // namespace buckets

// One histogram (one series, `labels`) of a new or existing family.
prometheus::Histogram& AddHistogram(prometheus::Registry& registry, const std::string& name,
                                    const std::string& help, const std::vector<double>& bounds,
                                    const Metrics::Labels& labels = {});
prometheus::Counter& AddCounter(prometheus::Registry& registry, const std::string& name,
                                const std::string& help, const Metrics::Labels& labels = {});
prometheus::Gauge& AddGauge(prometheus::Registry& registry, const std::string& name,
                            const std::string& help, const Metrics::Labels& labels = {});

}  // namespace kl

#endif  // KL_SERVICES_COMMON_METRICS_H_
