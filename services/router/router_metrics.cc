#include "services/router/router_metrics.h"

#include "absl/strings/ascii.h"
#include "services/router/router_service.h"

namespace kl {

RouterMetrics::RouterMetrics(prometheus::Registry& r)
    : ttft(AddHistogram(r, "kl_time_to_first_token_seconds",
                        "Time to first token, measured at the router from receipt (queue, "
                        "reserve, prefill and the state transfer included).",
                        buckets::Ttft())),
      itl(AddHistogram(r, "kl_inter_token_latency_seconds",
                       "Gap between successive chunks streamed to the client.",
                       buckets::TokenLatency())),
      tpot(AddHistogram(r, "kl_time_per_output_token_seconds",
                        "Per request: (e2e - ttft) / (generated tokens - 1).",
                        buckets::TokenLatency())),
      e2e(AddHistogram(r, "kl_e2e_request_latency_seconds",
                       "Router receipt to the final status, every request that was admitted.",
                       buckets::Request())),
      queue_time(AddHistogram(r, "kl_request_queue_time_seconds",
                              "Time in the router's admission queue.", buckets::Request())),
      prompt_tokens(AddCounter(r, "kl_prompt_tokens_total", "Prompt tokens of started requests.")),
      generation_tokens(AddCounter(r, "kl_generation_tokens_total",
                                   "Tokens streamed to clients.")),
      success_stop(AddCounter(r, "kl_request_success_total", "Requests finished OK, by reason.",
                              {{"finished_reason", "stop"}})),
      success_length(AddCounter(r, "kl_request_success_total", "Requests finished OK, by reason.",
                                {{"finished_reason", "length"}})),
      success_abort(AddCounter(r, "kl_request_success_total", "Requests finished OK, by reason.",
                               {{"finished_reason", "abort"}})),
      failure_(prometheus::BuildCounter()
                   .Name("kl_request_failure_total")
                   .Help("Admitted requests that ended with an error (not a client cancel), "
                         "by gRPC status code.")
                   .Register(r)) {}

void RouterMetrics::CountFailure(absl::StatusCode code) {
  failure_.Add({{"code", absl::StatusCodeToString(code)}}).Increment();
}

void RegisterRouterCallbacks(Metrics& m, const RouterService* s) {
  auto stat = [s](int64_t RouterStats::*field) {
    return [s, field] { return static_cast<double>(s->Stats().*field); };
  };
  m.AddCallbackGauge("kl_num_requests_running", "Requests running, by stage.",
                     {{"stage", "router"}}, stat(&RouterStats::in_flight));
  m.AddCallbackGauge("kl_num_requests_waiting", "Requests waiting, by stage.",
                     {{"stage", "router_queue"}}, stat(&RouterStats::queue_depth));
  m.AddCallbackGauge("kl_num_requests_waiting", "Requests waiting, by stage.",
                     {{"stage", "decode_slot"}}, stat(&RouterStats::waiting_decode_slot));
  m.AddCallbackCounter("kl_retries_total",
                       "Extra worker-pair attempts before the first token.", {},
                       stat(&RouterStats::retries));
  m.AddCallbackCounter("kl_migrations_total",
                       "Requests moved to another decode worker after the first token.", {},
                       stat(&RouterStats::migrations));
  m.AddCallbackCounter("kl_cancellations_total", "Requests the client cancelled.", {},
                       stat(&RouterStats::cancelled));
  const std::string aff_help =
      "Prefill picks for prompts extending one a prefill worker prefilled (its state is cached "
      "there): sent there (followed) or, busier than the slack allows, elsewhere (overridden).";
  m.AddCallbackCounter("kl_prefix_affinity_total", aff_help, {{"result", "followed"}},
                       stat(&RouterStats::affinity_followed));
  m.AddCallbackCounter("kl_prefix_affinity_total", aff_help, {{"result", "overridden"}},
                       stat(&RouterStats::affinity_overridden));
  m.AddCallbackCounter("kl_stop_string_cancels_total",
                       "Decode streams the router cancelled at a stop string.", {},
                       stat(&RouterStats::stop_cancels));
  const std::string rej_help =
      "Requests refused: admission queue full, router draining, invalid arguments, no valid "
      "API key, per-client concurrency limit.";
  m.AddCallbackCounter("kl_rejections_total", rej_help, {{"reason", "queue_full"}},
                       stat(&RouterStats::rejected_full));
  m.AddCallbackCounter("kl_rejections_total", rej_help, {{"reason", "draining"}},
                       stat(&RouterStats::rejected_draining));
  m.AddCallbackCounter("kl_rejections_total", rej_help, {{"reason", "invalid"}},
                       stat(&RouterStats::invalid));
  m.AddCallbackCounter("kl_rejections_total", rej_help, {{"reason", "unauthenticated"}},
                       stat(&RouterStats::rejected_unauthenticated));
  m.AddCallbackCounter("kl_rejections_total", rej_help, {{"reason", "client_limit"}},
                       stat(&RouterStats::rejected_client_limit));
}

}  // namespace kl
