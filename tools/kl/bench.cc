#include "tools/kl/bench.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "tools/kl/client.h"

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

struct Job {
  int prompt_tokens;
  int output_tokens;
  uint64_t seed;
  double arrival_seconds;  // Poisson schedule offset (0 for fixed concurrency)
};

struct Outcome {
  StreamResult r;
  int prompt_tokens = 0;
  int output_tokens = 0;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos)), hi = static_cast<size_t>(std::ceil(pos));
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

nlohmann::json Summary(const std::vector<double>& v) {
  return {{"p50", Percentile(v, 50)}, {"p90", Percentile(v, 90)}, {"p99", Percentile(v, 99)},
          {"mean", v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / v.size()},
          {"count", v.size()}};
}

kl::v1::GenerateRequest MakeRequest(const Job& j, int64_t vocab_ids) {
  kl::v1::GenerateRequest req;
  std::mt19937_64 g(j.seed);
  auto* ids = req.mutable_token_ids();
  for (int i = 0; i < j.prompt_tokens; ++i) ids->add_ids(static_cast<int32_t>(g() % vocab_ids));
  auto* s = req.mutable_sampling();
  s->set_temperature(0.0);
  s->set_max_tokens(j.output_tokens);
  s->set_ignore_eos(true);
  req.set_request_id(absl::StrCat("bench-", j.seed));
  return req;
}

}  // namespace

absl::StatusOr<std::string> RunBench(const BenchOptions& o) {
  // The vocabulary from ModelInfo; prompts avoid the 256 special ids at the end.
  auto channel = o.security.channel.Dial(o.address);
  auto stub = kl::v1::Generation::NewStub(channel);
  kl::v1::ModelInfoResponse info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    o.security.Authorize(&ctx);
    grpc::Status st = stub->ModelInfo(&ctx, kl::v1::ModelInfoRequest(), &info);
    if (!st.ok()) return absl::UnavailableError(absl::StrCat("ModelInfo: ", st.error_message()));
  }
  const int64_t vocab_ids = std::max<int64_t>(1, info.vocab_size() - 256);

  std::mt19937_64 rng(o.seed);
  auto uni = [&](int lo, int hi) { return lo + static_cast<int>(rng() % (hi - lo + 1)); };
  std::vector<Job> jobs(o.warmup_requests + o.num_requests);
  double t = 0;
  std::exponential_distribution<double> gap(o.request_rate > 0 ? o.request_rate : 1.0);
  for (size_t i = 0; i < jobs.size(); ++i) {
    jobs[i].prompt_tokens = uni(o.prompt_tokens_min, o.prompt_tokens_max);
    jobs[i].output_tokens = uni(o.output_tokens_min, o.output_tokens_max);
    jobs[i].seed = o.seed * 1000003 + i;
    if (o.request_rate > 0 && static_cast<int>(i) >= o.warmup_requests) {
      t += gap(rng);
      jobs[i].arrival_seconds = t;
    }
  }
  GenerationClient client(o.address, o.security);
  // Warm-up, sequentially.
  for (int i = 0; i < o.warmup_requests; ++i) {
    client.Generate(MakeRequest(jobs[i], vocab_ids), o.deadline_seconds);
  }
  std::vector<Outcome> outcomes(o.num_requests);
  std::atomic<int> next{0};
  const auto start = Clock::now();
  auto run_one = [&](int i) {
    const Job& j = jobs[o.warmup_requests + i];
    outcomes[i].r = client.Generate(MakeRequest(j, vocab_ids), o.deadline_seconds);
    outcomes[i].prompt_tokens = j.prompt_tokens;
    outcomes[i].output_tokens = j.output_tokens;
  };
  std::vector<std::thread> threads;
  const int nthreads = std::max(1, o.concurrency);
  for (int w = 0; w < nthreads; ++w) {
    threads.emplace_back([&] {
      for (int i; (i = next.fetch_add(1)) < o.num_requests;) {
        if (o.request_rate > 0) {  // Poisson: wait for the scheduled arrival
          const double at = jobs[o.warmup_requests + i].arrival_seconds;
          std::this_thread::sleep_until(start + std::chrono::duration<double>(at));
        }
        run_one(i);
      }
    });
  }
  for (auto& th : threads) th.join();
  const double duration = std::chrono::duration<double>(Clock::now() - start).count();

  std::vector<double> ttft, tpot, itl, e2e;
  std::map<std::string, int> errors;
  int64_t ok = 0, good = 0, out_tokens = 0, in_tokens = 0;
  for (const auto& oc : outcomes) {
    if (!oc.r.status.ok()) {
      errors[absl::StrCat(oc.r.status.error_code())]++;
      continue;
    }
    ++ok;
    const int64_t n = static_cast<int64_t>(oc.r.tokens.size());
    out_tokens += n;
    in_tokens += oc.prompt_tokens;
    ttft.push_back(oc.r.ttft_seconds);
    e2e.push_back(oc.r.e2e_seconds);
    const double tp = n > 1 ? (oc.r.e2e_seconds - oc.r.ttft_seconds) / (n - 1) : 0.0;
    if (n > 1) tpot.push_back(tp);
    itl.insert(itl.end(), oc.r.chunk_gaps.begin(), oc.r.chunk_gaps.end());
    if (oc.r.ttft_seconds <= o.slo_ttft_seconds && tp <= o.slo_tpot_seconds) ++good;
  }
  nlohmann::json j = {
      {"address", o.address},
      {"mode", o.request_rate > 0 ? "poisson" : "concurrency"},
      {"request_rate", o.request_rate},
      {"concurrency", o.concurrency},
      {"seed", o.seed},
      {"requests", o.num_requests},
      {"completed", ok},
      {"errors", errors},
      {"duration_seconds", duration},
      {"request_throughput", ok / duration},
      {"output_token_throughput", out_tokens / duration},
      {"total_token_throughput", (out_tokens + in_tokens) / duration},
      {"slo", {{"ttft_seconds", o.slo_ttft_seconds}, {"tpot_seconds", o.slo_tpot_seconds}}},
      {"goodput", good / duration},
      {"slo_attainment", o.num_requests ? static_cast<double>(good) / o.num_requests : 0.0},
      {"ttft_seconds", Summary(ttft)},
      {"tpot_seconds", Summary(tpot)},
      {"itl_seconds", Summary(itl)},
      {"e2e_seconds", Summary(e2e)},
  };
  return j.dump(2);
}

}  // namespace kl
