// kl-decode: a decode worker. Serves kl.v1.Decode (leases, state push, decode
// streams with continuous batching, stats), grpc.health.v1 and reflection.
//   kl-decode --model DIR --listen 0.0.0.0:50061 [--slots 16] [--lease_ttl_seconds 30]
// SIGTERM/SIGINT drain: health NOT_SERVING, Reserve refused, running streams
// finish (at most --drain_grace_seconds), then the server shuts down.
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
#include "services/decode/decode_service.h"

ABSL_FLAG(std::string, model, "", "model folder (config.json, safetensors, tokenizer)");
ABSL_FLAG(std::string, listen, "0.0.0.0:50061", "host:port to serve on");
ABSL_FLAG(int64_t, slots, 16, "state slots (concurrent leases)");
ABSL_FLAG(double, lease_ttl_seconds, 30, "lease TTL without progress");
ABSL_FLAG(int64_t, max_batch, 0, "sequences per decode step (0 = slots)");
ABSL_FLAG(int, threads, 0, "CPU compute threads (0 = all cores)");
ABSL_FLAG(int64_t, latent_rows, 0, "latent rows (tokens) all leases may reserve (0 = unbounded)");
ABSL_FLAG(double, drain_grace_seconds, 30, "how long running streams may finish on SIGTERM");
ABSL_FLAG(int64_t, max_request_bytes, 64 << 20,
          "largest request message accepted (RESOURCE_EXHAUSTED beyond it); state-push "
          "frames are about 2 MiB");
ABSL_FLAG(std::string, metrics_listen, "0.0.0.0:9403",
          "host:port serving Prometheus text on /metrics (port 0: any free port); empty: off");

namespace kl {
namespace {

int Main() {
  BlockStopSignals();  // before any thread starts

  if (absl::GetFlag(FLAGS_model).empty()) {
    std::fprintf(stderr, "kl-decode: --model is required\n");
    return 2;
  }
  DecodeServiceOptions opts;
  opts.slots = absl::GetFlag(FLAGS_slots);
  opts.lease_ttl = absl::Seconds(absl::GetFlag(FLAGS_lease_ttl_seconds));
  opts.max_batch = absl::GetFlag(FLAGS_max_batch);
  opts.latent_rows_capacity = absl::GetFlag(FLAGS_latent_rows);
  if (opts.slots < 1 || opts.lease_ttl <= absl::ZeroDuration() || opts.max_batch < 0 ||
      opts.latent_rows_capacity < 0) {
    std::fprintf(stderr,
                 "kl-decode: --slots must be >= 1, --lease_ttl_seconds > 0, --max_batch >= 0, "
                 "--latent_rows >= 0\n");
    return 2;
  }
  // Mutual TLS (--cluster_*): with it, every caller must present a certificate
  // signed by the cluster CA; never plaintext as a fallback.
  absl::StatusOr<ClusterTls> cluster = ClusterTlsFromFlags();
  if (!cluster.ok()) {
    std::fprintf(stderr, "kl-decode: %s\n", std::string(cluster.status().message()).c_str());
    return 2;
  }
  const int64_t max_request = absl::GetFlag(FLAGS_max_request_bytes);
  if (max_request < 1024 || max_request > (1 << 30)) {
    std::fprintf(stderr, "kl-decode: --max_request_bytes must be in [1024, 2^30]\n");
    return 2;
  }
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<DecodeMetrics> decode_metrics;
  if (const std::string listen = absl::GetFlag(FLAGS_metrics_listen); !listen.empty()) {
    absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Serve(listen);
    if (!m.ok()) {
      std::fprintf(stderr, "kl-decode: %s\n", m.status().ToString().c_str());
      return m.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
    }
    metrics = *std::move(m);
    decode_metrics = std::make_unique<DecodeMetrics>(metrics->registry());
    opts.metrics = decode_metrics.get();
    KL_LOG(INFO).Field("listen", listen).Field("port", metrics->port()) << "metrics serving";
  }
  LocalEngineOptions eo;
  eo.model_dir = absl::GetFlag(FLAGS_model);
  eo.threads = absl::GetFlag(FLAGS_threads);
  // One device slot per lease, plus one for the state a push may be adopting.
  eo.backend = BackendSpecFromFlags(opts.slots + 1);
  auto engine = LocalEngine::Open(eo);
  if (!engine.ok()) {
    std::fprintf(stderr, "kl-decode: %s\n", engine.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<DeviceTransport>> transport =
      DeviceTransportFromFlags((*engine)->model());
  if (!transport.ok()) {
    std::fprintf(stderr, "kl-decode: %s\n", transport.status().ToString().c_str());
    return 2;
  }
  opts.transport = transport->get();
  // A backend with a fixed latent pool (a GPU's pages): leases reserve within
  // it, so an admitted sequence never runs out of rows mid-stream.
  if (const Backend::LatentCapacity cap = (*engine)->model().backend()->latent_capacity();
      cap.rows > 0) {
    if (opts.latent_rows_capacity == 0 || opts.latent_rows_capacity > cap.rows) {
      if (opts.latent_rows_capacity > cap.rows) {
        KL_LOG(WARNING).Field("latent_rows", opts.latent_rows_capacity).Field("pool_rows", cap.rows)
            << "--latent_rows is more than the backend's latent pool holds; using the pool's size";
      }
      opts.latent_rows_capacity = cap.rows;
    }
    opts.latent_row_granularity = cap.granularity;
    opts.max_rows_per_lease = cap.max_rows_per_sequence;
    KL_LOG(INFO)
            .Field("latent_rows", opts.latent_rows_capacity)
            .Field("page_rows", cap.granularity)
            .Field("max_rows_per_sequence", cap.max_rows_per_sequence)
        << "leases reserve latent rows in the backend's pool";
  }
  auto service = std::make_unique<DecodeService>(&(*engine)->model(),
                                                 (*engine)->checkpoint_fingerprint(), opts);
  ServerOptions so;
  so.address = absl::GetFlag(FLAGS_listen);
  so.credentials = cluster->server;
  so.max_receive_message_bytes = static_cast<int>(max_request);
  auto server = StartServer(so, {service.get()});
  if (!server.ok()) {
    std::fprintf(stderr, "kl-decode: %s\n", server.status().ToString().c_str());
    return 1;
  }
  if (metrics != nullptr) RegisterDecodeCallbacks(*metrics, service.get());
  server->SetServing(true);
  KL_LOG(INFO).Field("port", server->port).Field("slots", opts.slots)
      .Field("cluster_tls", cluster->enabled()) << "kl-decode serving";

  const int sig = WaitForStopSignal();
  KL_LOG(INFO).Field("signal", sig) << "draining";
  server->SetServing(false);
  service->Drain();
  const absl::Duration grace = absl::Seconds(absl::GetFlag(FLAGS_drain_grace_seconds));
  if (!service->WaitIdle(grace)) {
    KL_LOG(WARNING) << "grace period over; cancelling streams";
  }
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  if (metrics != nullptr) metrics->ClearCallbacks();
  service.reset();
  KL_LOG(INFO) << "kl-decode stopped";
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kl::Main();
}
