// kl-router: the cluster's front door (kl.v1.Generation) in front of prefill
// and decode worker pools. See docs/cluster.md for the request flow.
//
//   kl-router --model DIR --listen 0.0.0.0:8000
//       --prefill_dns kl-prefill.ns.svc:9000 --decode_dns kl-decode.ns.svc:9001
//       [--tls_cert F --tls_key F] [--api_keys_file F] [--cluster_cert F --cluster_key F
//        --cluster_ca F]   (docs/security.md)
//
// SIGTERM / SIGINT drain: health goes NOT_SERVING, new requests get
// UNAVAILABLE, running streams get --drain_grace_seconds to finish, exit 0.
#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "engine/common/log.h"
#include "services/common/metrics.h"
#include "services/common/server_util.h"
#include "services/common/tls.h"
#include "services/common/tls_flags.h"
#include "services/router/api_keys.h"
#include "services/router/dns_resolver.h"
#include "services/router/model_meta.h"
#include "services/router/router_service.h"

ABSL_FLAG(std::string, model, "", "model folder (config.json + tokenizer; weights optional)");
ABSL_FLAG(std::string, listen, "0.0.0.0:8000", "host:port to serve kl.v1.Generation on");
ABSL_FLAG(std::string, prefill, "", "static prefill workers, host:port,...");
ABSL_FLAG(std::string, prefill_dns, "", "prefill DNS names, name:port,... (every A record)");
ABSL_FLAG(std::string, decode, "", "static decode workers, host:port,...");
ABSL_FLAG(std::string, decode_dns, "", "decode DNS names, name:port,... (every A record)");
ABSL_FLAG(int64_t, max_queue, 256, "admitted requests waiting for a driver thread");
ABSL_FLAG(int64_t, max_inflight, 64, "requests running at once (driver threads)");
ABSL_FLAG(double, default_deadline_seconds, 300, "deadline of requests that set none");
ABSL_FLAG(int64_t, max_prompt_tokens, 0, "prompt length limit (0: model_max_length)");
ABSL_FLAG(int64_t, max_tokens_limit, 0, "largest sampling.max_tokens (0: model_max_length)");
ABSL_FLAG(int64_t, default_max_tokens, 256, "sampling.max_tokens when unset");
ABSL_FLAG(int, retries, 3, "extra worker-pair attempts before the first token");
ABSL_FLAG(double, decode_slot_wait_seconds, 30,
          "how long a request waits for a decode slot while every decode worker is full "
          "(then RESOURCE_EXHAUSTED); 0 = refuse at once");
ABSL_FLAG(int64_t, prefix_affinity_entries, 65536,
          "prompts remembered with the prefill worker that prefilled them, so a prompt that "
          "extends one (a conversation's next turn) goes where its state is cached; 0 = off");
ABSL_FLAG(int64_t, prefix_affinity_slack, 2,
          "how much busier than the least loaded prefill worker (running + queued) the "
          "remembered one may be and still be picked");
ABSL_FLAG(int, max_migrations, 3, "decode-worker moves after the first token");
ABSL_FLAG(int, health_interval_ms, 1000, "worker health / Stats polling period");
ABSL_FLAG(int, dns_interval_ms, 5000, "DNS re-resolution period");
ABSL_FLAG(double, drain_grace_seconds, 30, "how long running streams may take on SIGTERM");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9401",
          "host:port serving Prometheus text on /metrics (port 0: any free port); empty: off");
// Security of the public API (docs/security.md). The internal plane's mutual
// TLS flags (--cluster_*) come from services/common/tls_flags.
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the public API (TLS); empty: plaintext");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA: public clients must also present a certificate it signed (optional)");
ABSL_FLAG(std::string, api_keys_file, "",
          "API keys, one `key` or `name:key` per line ('#' comments); calls then need "
          "'authorization: Bearer <key>' or 'x-api-key' metadata. Empty: no auth");
ABSL_FLAG(int64_t, max_concurrent_per_client, 0,
          "Generate streams one client (API key name, else peer IP) may run at once; 0: no limit");
ABSL_FLAG(int64_t, max_request_bytes, 8 << 20,
          "largest request message accepted (RESOURCE_EXHAUSTED beyond it)");

namespace kl {
namespace {

// Flags -> validated options (RouterService::Create checks the rest).
absl::StatusOr<RouterOptions> OptionsFromFlags() {
  RouterOptions o;
  o.max_queue = absl::GetFlag(FLAGS_max_queue);
  o.max_inflight = absl::GetFlag(FLAGS_max_inflight);
  o.default_deadline = absl::Seconds(absl::GetFlag(FLAGS_default_deadline_seconds));
  o.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  o.max_tokens_limit = absl::GetFlag(FLAGS_max_tokens_limit);
  o.default_max_tokens = absl::GetFlag(FLAGS_default_max_tokens);
  o.retries = absl::GetFlag(FLAGS_retries);
  o.prefix_affinity_entries = absl::GetFlag(FLAGS_prefix_affinity_entries);
  o.prefix_affinity_slack = absl::GetFlag(FLAGS_prefix_affinity_slack);
  o.decode_slot_wait = absl::Seconds(absl::GetFlag(FLAGS_decode_slot_wait_seconds));
  o.max_migrations = absl::GetFlag(FLAGS_max_migrations);
  o.max_concurrent_per_client = absl::GetFlag(FLAGS_max_concurrent_per_client);
  if (const std::string path = absl::GetFlag(FLAGS_api_keys_file); !path.empty()) {
    absl::StatusOr<ApiKeys> keys = ApiKeys::Load(path);
    if (!keys.ok()) return keys.status();
    o.api_keys = std::make_shared<const ApiKeys>(*std::move(keys));
    KL_LOG(INFO).Field("keys", o.api_keys->size()) << "API keys loaded";
  }
  absl::StatusOr<ClusterTls> cluster = ClusterTlsFromFlags();
  if (!cluster.ok()) return cluster.status();
  o.prefill.security = cluster->client;
  o.decode.security = cluster->client;
  const int health_ms = absl::GetFlag(FLAGS_health_interval_ms);
  const int dns_ms = absl::GetFlag(FLAGS_dns_interval_ms);
  if (health_ms < 10 || dns_ms < 10) {
    return absl::InvalidArgumentError("--health_interval_ms and --dns_interval_ms must be >= 10");
  }
  for (WorkerPoolOptions* p : {&o.prefill, &o.decode}) {
    p->health_interval = absl::Milliseconds(health_ms);
    p->dns_interval = absl::Milliseconds(dns_ms);
    p->check_timeout = std::min(absl::Milliseconds(health_ms), absl::Seconds(2));
  }
  o.prefill.addresses = SplitAddressList(absl::GetFlag(FLAGS_prefill));
  o.prefill.dns_targets = SplitAddressList(absl::GetFlag(FLAGS_prefill_dns));
  o.decode.addresses = SplitAddressList(absl::GetFlag(FLAGS_decode));
  o.decode.dns_targets = SplitAddressList(absl::GetFlag(FLAGS_decode_dns));
  if (o.prefill.addresses.empty() && o.prefill.dns_targets.empty()) {
    return absl::InvalidArgumentError("give --prefill and/or --prefill_dns");
  }
  if (o.decode.addresses.empty() && o.decode.dns_targets.empty()) {
    return absl::InvalidArgumentError("give --decode and/or --decode_dns");
  }
  return o;
}

int Main() {
  BlockStopSignals();  // before any thread starts

  if (absl::GetFlag(FLAGS_model).empty()) {
    KL_LOG(ERROR) << "--model is required";
    return 2;
  }
  absl::StatusOr<RouterOptions> options = OptionsFromFlags();
  if (!options.ok()) {
    KL_LOG(ERROR) << options.status().message();
    return 2;
  }
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<RouterMetrics> router_metrics;
  if (const std::string listen = absl::GetFlag(FLAGS_metrics_listen); !listen.empty()) {
    absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Serve(listen);
    if (!m.ok()) {
      KL_LOG(ERROR) << m.status().ToString();
      return m.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
    }
    metrics = *std::move(m);
    router_metrics = std::make_unique<RouterMetrics>(metrics->registry());
    options->metrics = router_metrics.get();
    KL_LOG(INFO).Field("listen", listen).Field("port", metrics->port()) << "metrics serving";
  }
  absl::StatusOr<std::unique_ptr<ModelMeta>> model = ModelMeta::Open(absl::GetFlag(FLAGS_model));
  if (!model.ok()) {
    KL_LOG(ERROR) << model.status().ToString();
    return 1;
  }
  absl::StatusOr<std::unique_ptr<RouterService>> service =
      RouterService::Create(*std::move(options), std::shared_ptr<const ModelMeta>(*std::move(model)));
  if (!service.ok()) {
    KL_LOG(ERROR) << service.status().ToString();
    return 2;
  }
  ServerOptions server_options;
  server_options.address = absl::GetFlag(FLAGS_listen);
  const int64_t max_request = absl::GetFlag(FLAGS_max_request_bytes);
  if (max_request < 1024 || max_request > (1 << 30)) {
    KL_LOG(ERROR) << "--max_request_bytes must be in [1024, 2^30]";
    return 2;
  }
  server_options.max_receive_message_bytes = static_cast<int>(max_request);
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> public_tls = LoadPublicServerTls(
      absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
      absl::GetFlag(FLAGS_tls_client_ca));
  if (!public_tls.ok()) {
    KL_LOG(ERROR) << public_tls.status().message();
    return 2;
  }
  server_options.credentials = *public_tls;
  absl::StatusOr<RunningServer> server = StartServer(server_options, {service->get()});
  if (!server.ok()) {
    KL_LOG(ERROR) << server.status().ToString();
    return 1;
  }
  if (metrics != nullptr) RegisterRouterCallbacks(*metrics, service->get());
  server->SetServing(true);
  KL_LOG(INFO).Field("listen", server_options.address).Field("port", server->port)
      .Field("tls", !absl::GetFlag(FLAGS_tls_cert).empty())
      .Field("auth", (*service)->options().api_keys != nullptr)
      .Field("cluster_tls", (*service)->options().decode.security.tls())
      << "kl-router serving";

  const int sig = WaitForStopSignal();
  KL_LOG(INFO).Field("signal", sig) << "stop signal: draining";
  server->SetServing(false);
  const bool clean = (*service)->Drain(absl::Seconds(absl::GetFlag(FLAGS_drain_grace_seconds)));
  server->server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  if (metrics != nullptr) metrics->ClearCallbacks();
  service->reset();
  KL_LOG(INFO).Field("all_finished", clean) << "kl-router stopped";
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kl-router --model DIR --prefill[_dns] ... --decode[_dns] ...");
  absl::ParseCommandLine(argc, argv);
  return kl::Main();
}
