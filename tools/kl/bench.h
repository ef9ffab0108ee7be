// `kl bench`: a load generator for the public API. Poisson or fixed-concurrency
// arrivals, seeded random prompt / output lengths (random token-id prompts,
// ignore_eos so outputs have the drawn length), warm-up requests excluded,
// TTFT / TPOT / ITL / E2E percentiles, throughput and goodput against SLOs.
#ifndef KL_TOOLS_KL_BENCH_H_
#define KL_TOOLS_KL_BENCH_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

#include "tools/kl/client.h"

namespace kl {

struct BenchOptions {
  std::string address;            // router host:port
  double request_rate = 0;        // requests/s (Poisson); 0 = fixed concurrency
  int concurrency = 4;            // fixed-concurrency clients (or the cap under Poisson)
  int num_requests = 64;          // measured requests
  int warmup_requests = 4;        // sent first, not measured
  int prompt_tokens_min = 16, prompt_tokens_max = 256;
  int output_tokens_min = 16, output_tokens_max = 64;
  uint64_t seed = 0;
  double slo_ttft_seconds = 1.0;  // goodput: both SLOs met
  double slo_tpot_seconds = 0.1;
  double deadline_seconds = 300;
  ClientSecurity security;        // TLS / API key of the router
};

// Runs the benchmark; returns the report as JSON text (also suitable for plots).
absl::StatusOr<std::string> RunBench(const BenchOptions& options);

}  // namespace kl

#endif  // KL_TOOLS_KL_BENCH_H_
