// kl-prefill: a prefill worker. Serves kl.v1.Prefill (batched prefill whose
// state is pushed layer by layer to a reserved decode slot), grpc.health.v1 and
// reflection.
//   kl-prefill --model DIR --listen 0.0.0.0:50051 [--max_batch_tokens 8192]
// SIGTERM/SIGINT drain: health NOT_SERVING, new Prefill refused (UNAVAILABLE),
// queued work finishes (at most --drain_grace_seconds), then shutdown.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/time.h"
#include "engine/common/log.h"
#include "engine/runtime/local_engine.h"
#include "services/common/backend_flags.h"
#include "services/common/metrics.h"
#include "services/common/server_util.h"
#include "services/common/tls_flags.h"
#include "services/transport/transport_flags.h"
#include "services/prefill/prefill_service.h"

ABSL_FLAG(std::string, model, "", "model folder (config.json, safetensors, tokenizer)");
ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "host:port to serve on");
ABSL_FLAG(int64_t, max_batch_tokens, 8192, "tokens per prefill forward (longer prompts are chunked)");
ABSL_FLAG(int64_t, max_queue, 64, "queued requests before RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, prefix_cache_mb, 512,
          "host memory (MiB) for prompt states kept so a prompt that extends one (the next "
          "turn of a conversation) prefills only its new tokens; 0 = off");
ABSL_FLAG(int, threads, 0, "CPU compute threads (0 = all cores)");
ABSL_FLAG(std::string, bundle_dtype, "f32", "wire dtype of conv tails and MLA latents: f32|bf16");
ABSL_FLAG(double, drain_grace_seconds, 30, "how long queued work may finish on SIGTERM");
ABSL_FLAG(int64_t, max_request_bytes, 64 << 20,
          "largest request message accepted (RESOURCE_EXHAUSTED beyond it); state-push "
          "frames are about 2 MiB");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9402",
          "host:port serving Prometheus text on /metrics (port 0: any free port); empty: off");
ABSL_FLAG(std::string, fault_inject_state, "",
          "FAULT INJECTION, tests only: damage pushed state bundles, comma-separated kinds "
          "corrupt,truncate,duplicate,reorder,drop_final taken in turn (services/prefill/"
          "state_fault.h); empty: off");
ABSL_FLAG(int64_t, fault_inject_every, 1, "FAULT INJECTION: damage only every Nth push");

namespace kl {
namespace {

int Main() {
  BlockStopSignals();  // before any thread starts

  PrefillServiceOptions opts;
  opts.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  opts.max_queue = absl::GetFlag(FLAGS_max_queue);
  opts.prefix_cache_bytes = absl::GetFlag(FLAGS_prefix_cache_mb) << 20;
  const std::string dtype = absl::GetFlag(FLAGS_bundle_dtype);
  if (dtype == "f32") {
    opts.bundle_dtype = DType::kF32;
  } else if (dtype == "bf16") {
    opts.bundle_dtype = DType::kBF16;
  } else {
    std::fprintf(stderr, "kl-prefill: --bundle_dtype must be f32 or bf16, got %s\n", dtype.c_str());
    return 2;
  }
  if (absl::GetFlag(FLAGS_model).empty() || opts.max_batch_tokens < 1 || opts.max_queue < 1 ||
      absl::GetFlag(FLAGS_prefix_cache_mb) < 0 ||
      absl::GetFlag(FLAGS_prefix_cache_mb) > (1 << 24)) {
    std::fprintf(stderr,
                 "kl-prefill: --model is required; --max_batch_tokens and --max_queue >= 1; "
                 "--prefix_cache_mb from 0 to 16777216\n");
    return 2;
  }
  // Mutual TLS (--cluster_*): callers must present a cluster certificate, and
  // state pushes to decode workers present ours.
  absl::StatusOr<ClusterTls> cluster = ClusterTlsFromFlags();
  if (!cluster.ok()) {
    std::fprintf(stderr, "kl-prefill: %s\n", std::string(cluster.status().message()).c_str());
    return 2;
  }
  opts.push_security = cluster->client;
  const int64_t max_request = absl::GetFlag(FLAGS_max_request_bytes);
  if (max_request < 1024 || max_request > (1 << 30)) {
    std::fprintf(stderr, "kl-prefill: --max_request_bytes must be in [1024, 2^30]\n");
    return 2;
  }
  absl::StatusOr<std::shared_ptr<StateFaultInjector>> fault = StateFaultInjector::Parse(
      absl::GetFlag(FLAGS_fault_inject_state), absl::GetFlag(FLAGS_fault_inject_every));
  if (!fault.ok()) {
    std::fprintf(stderr, "kl-prefill: %s\n", fault.status().ToString().c_str());
    return 2;
  }
  opts.fault_injector = *std::move(fault);
  if (opts.fault_injector != nullptr) {
    KL_LOG(WARNING).Field("kinds", absl::GetFlag(FLAGS_fault_inject_state))
        << "FAULT INJECTION enabled: pushed state bundles will be damaged (tests only)";
  }
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<PrefillMetrics> prefill_metrics;
  if (const std::string listen = absl::GetFlag(FLAGS_metrics_listen); !listen.empty()) {
    absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Serve(listen);
    if (!m.ok()) {
      std::fprintf(stderr, "kl-prefill: %s\n", m.status().ToString().c_str());
      return m.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
    }
    metrics = *std::move(m);
    prefill_metrics = std::make_unique<PrefillMetrics>(metrics->registry());
    opts.metrics = prefill_metrics.get();
    KL_LOG(INFO).Field("listen", listen).Field("port", metrics->port()) << "metrics serving";
  }
  LocalEngineOptions eo;
  eo.model_dir = absl::GetFlag(FLAGS_model);
  eo.threads = absl::GetFlag(FLAGS_threads);
  // A slot per sequence of a batched forward and one for a chunked prompt, twice
  // over: a device transfer keeps its slot until the sends are done, while the
  // next batch runs.
  eo.backend = BackendSpecFromFlags(2 * kPrefillMaxBatchSeqs + 1);
  eo.backend.graphs = false;  // layer-done callbacks run between layers (no graph capture)
  auto engine = LocalEngine::Open(eo);
  if (!engine.ok()) {
    std::fprintf(stderr, "kl-prefill: %s\n", engine.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<DeviceTransport>> transport =
      DeviceTransportFromFlags((*engine)->model());
  if (!transport.ok()) {
    std::fprintf(stderr, "kl-prefill: %s\n", transport.status().ToString().c_str());
    return 2;
  }
  opts.transport = transport->get();
  auto service = std::make_unique<PrefillService>(&(*engine)->model(),
                                                  (*engine)->checkpoint_fingerprint(), opts);
  ServerOptions so;
  so.address = absl::GetFlag(FLAGS_listen);
  so.credentials = cluster->server;
  so.max_receive_message_bytes = static_cast<int>(max_request);
  auto server = StartServer(so, {service.get()});
  if (!server.ok()) {
    std::fprintf(stderr, "kl-prefill: %s\n", server.status().ToString().c_str());
    return 1;
  }
  if (metrics != nullptr) RegisterPrefillCallbacks(*metrics, service.get());
  server->SetServing(true);
  KL_LOG(INFO)
          .Field("port", server->port)
          .Field("max_batch_tokens", opts.max_batch_tokens)
          .Field("prefix_cache_mb", absl::GetFlag(FLAGS_prefix_cache_mb))
          .Field("cluster_tls", cluster->enabled())
      << "kl-prefill serving";

  const int sig = WaitForStopSignal();
  KL_LOG(INFO).Field("signal", sig) << "draining";
  server->SetServing(false);
  service->Drain();
  if (!service->WaitIdle(absl::Seconds(absl::GetFlag(FLAGS_drain_grace_seconds)))) {
    KL_LOG(WARNING) << "grace period over; cancelling prefills";
  }
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  if (metrics != nullptr) metrics->ClearCallbacks();
  service.reset();
  KL_LOG(INFO) << "kl-prefill stopped";
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kl::Main();
}
