#include "services/prefill/prefill_metrics.h"

#include "services/prefill/prefill_service.h"
#include "services/transport/device_metrics.h"

namespace kl {
namespace {
constexpr char kBytesHelp[] =
    "Bytes of StateBundle frames pushed to decode workers, by kind (KDA recurrent state and "
    "conv tails, MLA latent rows, framing: header and final record).";
constexpr char kSecondsHelp[] =
    "State push time per request: kind=bundle from the first frame to the decode worker's "
    "acknowledgement; kda_state / mla_latent the sender's time serialising and writing that "
    "kind's frames (flow control included).";
}  // namespace

PrefillMetrics::PrefillMetrics(prometheus::Registry& r)
    : prefill_time(AddHistogram(r, "kl_prefill_time_seconds",
                                "Prefill compute per request: first forward to the sampled token.",
                                buckets::Request())),
      queue_time(AddHistogram(r, "kl_prefill_queue_time_seconds",
                              "Time a prefill request waited in the worker's queue.",
                              buckets::Request())),
      batch_tokens(AddHistogram(r, "kl_prefill_batch_tokens", "Prompt tokens per prefill forward.",
                                buckets::PowersOfTwo(20))),
      kda_bytes(AddCounter(r, "kl_state_transfer_bytes_total", kBytesHelp, {{"kind", "kda_state"}})),
      mla_bytes(AddCounter(r, "kl_state_transfer_bytes_total", kBytesHelp, {{"kind", "mla_latent"}})),
      other_bytes(AddCounter(r, "kl_state_transfer_bytes_total", kBytesHelp, {{"kind", "framing"}})),
      bundle_seconds(AddHistogram(r, "kl_state_transfer_seconds", kSecondsHelp,
                                  buckets::Transfer(), {{"kind", "bundle"}})),
      kda_seconds(AddHistogram(r, "kl_state_transfer_seconds", kSecondsHelp, buckets::Transfer(),
                               {{"kind", "kda_state"}})),
      mla_seconds(AddHistogram(r, "kl_state_transfer_seconds", kSecondsHelp, buckets::Transfer(),
                               {{"kind", "mla_latent"}})),
      failures_(prometheus::BuildCounter()
                    .Name("kl_state_transfer_failures_total")
                    .Help("State pushes that failed or were cancelled, by status code.")
                    .Register(r)) {}

void PrefillMetrics::CountTransferFailure(absl::StatusCode code) {
  failures_.Add({{"code", absl::StatusCodeToString(code)}}).Increment();
}

void RegisterPrefillCallbacks(Metrics& m, const PrefillService* s) {
  m.AddCallbackGauge("kl_num_requests_waiting", "Requests waiting, by stage.",
                     {{"stage", "prefill"}}, [s] { return static_cast<double>(s->Snapshot().waiting()); });
  m.AddCallbackGauge("kl_num_requests_running", "Requests running, by stage.",
                     {{"stage", "prefill"}}, [s] { return static_cast<double>(s->Snapshot().running()); });
  m.AddCallbackGauge("kl_state_transfers_in_flight", "State pushes in progress, by stage.",
                     {{"stage", "prefill"}},
                     [s] { return static_cast<double>(s->Snapshot().transfers_in_flight()); });
  using Field = int64_t (v1::WorkerStats::*)() const;
  auto get = [s](Field f) { return [s, f] { return static_cast<double>((s->Snapshot().*f)()); }; };
  m.AddCallbackGauge("kl_device_links", "NCCL device links to decode workers that are up.", {},
                     get(&v1::WorkerStats::device_links));
  m.AddCallbackCounter("kl_device_transfers_total",
                       "States sent over device links (NCCL) that the decode worker accepted.", {},
                       get(&v1::WorkerStats::device_transfers));
  m.AddCallbackCounter("kl_device_transfer_failures_total",
                       "Device transfers (NCCL) refused, cut or timed out; the link was dropped.",
                       {}, get(&v1::WorkerStats::device_transfer_failures));
  m.AddCallbackCounter("kl_device_transfer_fallbacks_total",
                       "State pushes sent over gRPC although device links are on (no free link, "
                       "link coming up, or the peer takes gRPC).",
                       {}, get(&v1::WorkerStats::device_fallbacks));
  RegisterDeviceTransportCallbacks(m, [s] { return s->Snapshot(); });
  // The prefix cache, in vLLM's terms (its prefix_cache_queries / _hits count
  // tokens), plus requests and the memory held.
  m.AddCallbackCounter("kl_prefix_cache_queries_total",
                       "Prompt tokens looked up in the prefix cache.", {},
                       get(&v1::WorkerStats::prefix_cache_query_tokens));
  m.AddCallbackCounter("kl_prefix_cache_hits_total",
                       "Prompt tokens taken from the prefix cache instead of prefilled.", {},
                       get(&v1::WorkerStats::prefix_cache_hit_tokens));
  m.AddCallbackCounter("kl_prefix_cache_requests_total",
                       "Prompts looked up in the prefix cache, by result.", {{"result", "hit"}},
                       get(&v1::WorkerStats::prefix_cache_hits));
  m.AddCallbackCounter(
      "kl_prefix_cache_requests_total", "Prompts looked up in the prefix cache, by result.",
      {{"result", "miss"}}, [s] {
        const v1::WorkerStats w = s->Snapshot();
        return static_cast<double>(w.prefix_cache_queries() - w.prefix_cache_hits());
      });
  m.AddCallbackGauge("kl_prefix_cache_bytes", "Host memory the prefix cache holds.", {},
                     get(&v1::WorkerStats::prefix_cache_bytes));
  m.AddCallbackGauge("kl_prefix_cache_entries", "Prompt states in the prefix cache.", {},
                     get(&v1::WorkerStats::prefix_cache_entries));
}

}  // namespace kl
