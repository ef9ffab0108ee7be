// Router overhead: time to first token through kl-router against driving the
// workers directly (Reserve on the decode worker, then Prefill with that target:
// what the router itself does before the first token), on the same local
// cluster, sequential requests, short prompts. Also the streaming rate one
// router sustains (tokens/s relayed) with a long generation.
//   bazel build -c opt //services/bench:router_overhead_bench //tools/kl:kl && \
//   bazel-bin/services/bench/router_overhead_bench --model DIR --bin_dir DIR
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "proto/worker.grpc.pb.h"
#include "tools/kl/client.h"
#include "tools/kl/local_cluster.h"

ABSL_FLAG(std::string, model, "", "model folder (e.g. ~/.cache/kimi-serve/tiny-v1)");
ABSL_FLAG(std::string, bin_dir, "", "folder with kl-router, kl-prefill, kl-decode");
ABSL_FLAG(int32_t, requests, 200, "requests per path");

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

double Pct(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p / 100.0 * (v.size() - 1))];
}

int Main() {
  LocalClusterOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model);
  o.bin_dir = absl::GetFlag(FLAGS_bin_dir);
  o.log_dir = "/tmp";
  LocalCluster c(o);
  if (auto s = c.Start(); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  const int n = absl::GetFlag(FLAGS_requests);
  const std::vector<int32_t> prompt = {11, 400, 3, 77, 1024, 9, 512, 600};
  // Through the router.
  GenerationClient client(c.router_address());
  kl::v1::GenerateRequest req;
  for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_tokens(1);
  std::vector<double> via_router;
  for (int i = 0; i < n + 10; ++i) {
    StreamResult r = client.Generate(req, 30);
    if (!r.status.ok()) return 1;
    if (i >= 10) via_router.push_back(r.ttft_seconds);
  }
  // Directly: Reserve + Prefill(target) + Release.
  auto dec = kl::v1::Decode::NewStub(grpc::CreateChannel(c.decode_address(0), grpc::InsecureChannelCredentials()));
  auto pre = kl::v1::Prefill::NewStub(grpc::CreateChannel(c.prefill_address(0), grpc::InsecureChannelCredentials()));
  std::vector<double> direct;
  for (int i = 0; i < n + 10; ++i) {
    const auto t0 = Clock::now();
    grpc::ClientContext c1, c2, c3;
    kl::v1::ReserveRequest rr;
    rr.set_request_id("direct");
    rr.set_max_total_tokens(16);
    kl::v1::ReserveResponse lease;
    if (!dec->Reserve(&c1, rr, &lease).ok()) return 1;
    kl::v1::PrefillRequest pr;
    pr.set_request_id("direct");
    for (int32_t t : prompt) pr.add_token_ids(t);
    pr.mutable_target()->set_address(c.decode_address(0));
    pr.mutable_target()->set_lease_id(lease.lease_id());
    kl::v1::PrefillResponse presp;
    if (!pre->Prefill(&c2, pr, &presp).ok()) return 1;
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    kl::v1::ReleaseRequest rel;
    rel.set_lease_id(lease.lease_id());
    kl::v1::ReleaseResponse relr;
    dec->Release(&c3, rel, &relr);
    if (i >= 10) direct.push_back(dt);
  }
  // Streaming rate through one router: one long generation.
  req.mutable_sampling()->set_max_tokens(2000);
  req.mutable_sampling()->set_ignore_eos(true);
  StreamResult longr = client.Generate(req, 120);
  std::printf("TTFT, %d sequential 8-token prompts, max_tokens 1 (ms):\n", n);
  std::printf("  direct to workers  p50 %.3f  p90 %.3f  p99 %.3f\n", Pct(direct, 50) * 1e3,
              Pct(direct, 90) * 1e3, Pct(direct, 99) * 1e3);
  std::printf("  through the router p50 %.3f  p90 %.3f  p99 %.3f\n", Pct(via_router, 50) * 1e3,
              Pct(via_router, 90) * 1e3, Pct(via_router, 99) * 1e3);
  std::printf("  router overhead    p50 %.3f  p99 %.3f\n", (Pct(via_router, 50) - Pct(direct, 50)) * 1e3,
              (Pct(via_router, 99) - Pct(direct, 99)) * 1e3);
  std::printf("one stream of %zu tokens through the router: %.0f tokens/s (decode-bound on the tiny model)\n",
              longr.tokens.size(), longr.tokens.size() / longr.e2e_seconds);
  c.Stop();
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kl::Main();
}
