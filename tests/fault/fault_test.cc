// The fault suite (docs/reliability.md): real kl-router / kl-prefill /
// kl-decode processes on loopback under continuous load, while an injector
// SIGKILLs and restarts workers, stalls them (SIGSTOP / SIGCONT) and cuts them
// off (CutProxy black-holes every connection to the worker). Every request must
// either return exactly the single-process oracle's greedy tokens or fail with
// a clear status no later than its deadline (tokens streamed before the failure
// must be a prefix of the oracle's); afterwards every pool — decode slots,
// leases, latent rows, transfers, prefill queues, the router's queue — must be
// idle again. Prints what it injected and what happened.
//
// A second test damages pushed state bundles on purpose (kl-prefill's
// --fault_inject_state) and checks they are refused, never decoded, and retried
// or failed clearly.
#include <signal.h>

#include <chrono>
#include <fstream>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "gtest/gtest.h"
#include "engine/runtime/generator.h"
#include "engine/runtime/local_engine.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/http_get.h"
#include "tests/fault/cut_proxy.h"
#include "tools/kl/client.h"
#include "tools/kl/local_cluster.h"
#include "tests/common/cluster_util.h"
#include "tests/common/tiny_oracle.h"
#include "tools/make_checkpoint/maker.h"

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string ModelDir() { return std::string(std::getenv("TEST_TMPDIR")) + "/tiny"; }

// The single-process engine on the checkpoint the workers load (tests/common).
class Oracle {
 public:
  static testing::TinyOracle& Get() {
    static auto* o = new testing::TinyOracle(ModelDir(), /*seed=*/11, /*threads=*/1);
    return *o;
  }
};

std::string Prompt(int words, int seed) { return testing::WordPrompt(words, seed); }
kl::v1::GenerateRequest Req(const std::string& prompt, int64_t max_tokens) {
  return testing::GreedyRequest(prompt, max_tokens);
}

const char* CodeName(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    default: return "OTHER";
  }
}

// The statuses a client may see when the cluster could not serve a request in
// time: the request itself was fine, so never INVALID_ARGUMENT / NOT_FOUND /
// INTERNAL / UNKNOWN / CANCELLED (nobody cancelled).
bool ClearFailure(grpc::StatusCode c) {
  return c == grpc::StatusCode::UNAVAILABLE || c == grpc::StatusCode::DEADLINE_EXCEEDED ||
         c == grpc::StatusCode::RESOURCE_EXHAUSTED;
}

template <typename Stub>
bool StatsOf(const std::string& addr, kl::v1::WorkerStats* s) {
  auto stub = Stub::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return stub->Stats(&ctx, kl::v1::WorkerStatsRequest(), s).ok();
}

// The value of one sample line of a /metrics text, or -1.
double Sample(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() > series.size() && line.compare(0, series.size(), series) == 0 &&
        line[series.size()] == ' ') {
      return std::strtod(line.c_str() + series.size() + 1, nullptr);
    }
  }
  return -1;
}

std::string Metrics(const std::string& addr) {
  absl::StatusOr<HttpResponse> r = HttpGet(addr, "/metrics");
  return r.ok() ? r->body : "";
}

// Every pool of every process empty, or a description of what is still held.
std::string Busy(LocalCluster& c, int prefill, int decode) {
  std::string busy;
  for (int i = 0; i < decode; ++i) {
    kl::v1::WorkerStats s;
    if (!StatsOf<kl::v1::Decode>(c.decode_address(i), &s)) {
      busy += " decode-" + std::to_string(i) + ": Stats failed;";
      continue;
    }
    if (s.slots_used() || s.leases_active() || s.running() || s.waiting() ||
        s.transfers_in_flight() || s.latent_rows_used()) {
      busy += " decode-" + std::to_string(i) + ": " + s.ShortDebugString() + ";";
    }
  }
  for (int i = 0; i < prefill; ++i) {
    kl::v1::WorkerStats s;
    if (!StatsOf<kl::v1::Prefill>(c.prefill_address(i), &s)) {
      busy += " prefill-" + std::to_string(i) + ": Stats failed;";
      continue;
    }
    if (s.running() || s.waiting() || s.transfers_in_flight()) {
      busy += " prefill-" + std::to_string(i) + ": " + s.ShortDebugString() + ";";
    }
  }
  const std::string m = Metrics(c.metrics_address(ClusterRole::kRouter));
  if (Sample(m, "kl_num_requests_running{stage=\"router\"}") != 0 ||
      Sample(m, "kl_num_requests_waiting{stage=\"router_queue\"}") != 0) {
    busy += " router: requests running or queued;";
  }
  return busy;
}

// Polls Busy() until it is empty or `seconds` pass; returns the last answer.
std::string WaitIdle(LocalCluster& c, int prefill, int decode, double seconds) {
  const auto t0 = Clock::now();
  std::string busy = Busy(c, prefill, decode);
  while (!busy.empty() && Since(t0) < seconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    busy = Busy(c, prefill, decode);
  }
  return busy;
}

std::string LogDir() {
  const char* out = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR");
  return out ? out : std::getenv("TEST_TMPDIR");
}

struct Outcome {
  double start = 0, end = 0;  // seconds since the load began
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string violation;      // empty: correct tokens, or a clear failure in time
};

struct Injection {
  double start = 0, end = 0;
  std::string what, target;
};

TEST(FaultSuite, ContinuousLoadSurvivesKillsStallsAndCuts) {
  constexpr int kPrefill = 2, kDecode = 2, kClients = 4, kPrompts = 6;
  constexpr double kDeadline = 20, kSlack = 2, kOutage = 3;
  // The oracle first: it makes the checkpoint the workers load.
  std::vector<std::string> prompts;
  std::vector<int64_t> max_tokens;
  std::vector<std::vector<int32_t>> expected;
  for (int k = 0; k < kPrompts; ++k) {
    prompts.push_back(Prompt(6 + 14 * k, k));
    max_tokens.push_back(24 + 16 * k);  // long enough that kills hit streams mid-decode
    expected.push_back(Oracle::Get().Greedy(prompts.back(), max_tokens.back(), /*ignore_eos=*/true));
  }

  std::map<std::pair<int, int>, std::unique_ptr<CutProxy>> proxies;  // (role, index)
  LocalClusterOptions o;
  o.model_dir = ModelDir();
  o.prefill_workers = kPrefill;
  o.decode_workers = kDecode;
  o.decode_slots = 8;
  o.log_dir = LogDir();
  // Short lease TTL and health period so that the test's idle check and the
  // router's view of a healed worker do not take long.
  o.decode_args = {"--lease_ttl_seconds=8"};
  o.router_args = {"--health_interval_ms=200", "--max_migrations=6"};
  o.router_address_of = [&](ClusterRole role, int i, const std::string& address) {
    auto& p = proxies[{static_cast<int>(role), i}];
    p = std::make_unique<CutProxy>(address);
    return p->address();
  };
  LocalCluster c(o);
  ASSERT_TRUE(c.Start().ok());
  GenerationClient client(c.router_address());

  // Load: kClients closed-loop clients until `stop`.
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<Outcome> outcomes;
  std::atomic<int> ok_count{0};
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int t = 0; t < kClients; ++t) {
    clients.emplace_back([&, t] {
      for (int n = 0; !stop; ++n) {
        const int k = (t * 5 + n) % kPrompts;
        Outcome oc;
        oc.start = Since(t0);
        StreamResult r = client.Generate(Req(prompts[k], max_tokens[k]), kDeadline);
        oc.end = Since(t0);
        oc.code = r.status.error_code();
        const std::vector<int32_t>& want = expected[k];
        const bool prefix = r.tokens.size() <= want.size() &&
                            std::equal(r.tokens.begin(), r.tokens.end(), want.begin());
        for (size_t i = 0; i < r.indices.size(); ++i) {
          if (r.indices[i] != static_cast<int64_t>(i)) oc.violation = "token indices not contiguous";
        }
        if (r.status.ok()) {
          if (r.tokens != want) oc.violation = "OK with tokens that differ from the oracle";
        } else if (!prefix) {
          oc.violation = "streamed tokens that differ from the oracle before failing";
        } else if (!ClearFailure(r.status.error_code()) || r.status.error_message().empty()) {
          oc.violation = std::string("unclear failure ") + CodeName(r.status.error_code()) +
                         ": " + r.status.error_message();
        } else if (oc.end - oc.start > kDeadline + kSlack) {
          oc.violation = "failed " + std::to_string(oc.end - oc.start - kDeadline) +
                         " s after its deadline";
        }
        if (r.status.ok() && oc.violation.empty()) ++ok_count;
        std::lock_guard<std::mutex> l(mu);
        outcomes.push_back(oc);
      }
    });
  }

  // Load between injections: until `n` more requests succeeded (bounded).
  auto load_for = [&](int n, double max_seconds) {
    const int target = ok_count + n;
    const auto until = Clock::now() + std::chrono::duration<double>(max_seconds);
    while (ok_count < target && Clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  };
  uint64_t seed = std::random_device()();
  if (const char* s = std::getenv("FAULT_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::cout << "fault suite seed " << seed << " (FAULT_SEED=" << seed << " repeats it)\n";
  std::mt19937_64 rng(seed);
  auto pick = [&](int n) { return static_cast<int>(rng() % n); };

  std::vector<Injection> injections;
  enum Kind { kKillDecode, kKillPrefill, kStall, kCutDecode, kCutPrefill };
  const std::vector<Kind> plan = {kKillDecode, kKillPrefill, kStall, kCutDecode,
                                  kKillDecode, kKillPrefill, kCutPrefill, kStall};
  load_for(2 * kClients, 60);  // warm: every client has been served
  for (Kind kind : plan) {
    Injection inj;
    inj.start = Since(t0);
    const bool decode = kind == kKillDecode || kind == kCutDecode || (kind == kStall && pick(2));
    int i = pick(decode ? kDecode : kPrefill);
    if (kind == kKillDecode) {
      // Prefer a worker with streams running, so the kill forces migrations
      // (decoding the tiny model is quick: a random moment often finds none).
      const auto until = Clock::now() + std::chrono::seconds(5);
      bool found = false;
      while (!found && Clock::now() < until) {
        for (int d = 0; d < kDecode && !found; ++d) {
          kl::v1::WorkerStats s;
          if (StatsOf<kl::v1::Decode>(c.decode_address((i + d) % kDecode), &s) && s.running() > 0) {
            i = (i + d) % kDecode;
            found = true;
          }
        }
      }
    }
    inj.target = (decode ? "decode-" : "prefill-") + std::to_string(i);
    switch (kind) {
      case kKillDecode:
      case kKillPrefill: {
        inj.what = "SIGKILL, restart on the same port";
        const absl::Status s = decode ? c.RestartDecode(i) : c.RestartPrefill(i);
        ASSERT_TRUE(s.ok()) << s;
        break;
      }
      case kStall:
        inj.what = "SIGSTOP 3 s, SIGCONT";
        decode ? c.KillDecode(i, SIGSTOP) : c.KillPrefill(i, SIGSTOP);
        std::this_thread::sleep_for(std::chrono::duration<double>(kOutage));
        decode ? c.KillDecode(i, SIGCONT) : c.KillPrefill(i, SIGCONT);
        break;
      case kCutDecode:
      case kCutPrefill: {
        inj.what = "cut off (black hole) 3 s, heal";
        CutProxy& p = *proxies[{static_cast<int>(decode ? ClusterRole::kDecode : ClusterRole::kPrefill), i}];
        p.Cut();
        std::this_thread::sleep_for(std::chrono::duration<double>(kOutage));
        p.Heal();
        break;
      }
    }
    inj.end = Since(t0);
    injections.push_back(inj);
    load_for(kClients, 15);  // the cluster serves again before the next fault
  }
  load_for(kClients, 15);
  stop = true;
  for (auto& t : clients) t.join();

  // Every pool back to idle (a lease whose Release could not reach its worker
  // during a cut expires after --lease_ttl_seconds).
  const std::string busy = WaitIdle(c, kPrefill, kDecode, 40);
  EXPECT_EQ(busy, "") << "pools still held after the faults";

  // And the cluster still answers correctly.
  StreamResult after = client.Generate(Req(prompts[1], max_tokens[1]), kDeadline);
  EXPECT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, expected[1]);

  // The report: per injection, the requests that ended from its start to the
  // next one's.
  const std::string router_metrics = Metrics(c.metrics_address(ClusterRole::kRouter));
  int64_t integrity = 0;
  for (int i = 0; i < kDecode; ++i) {
    kl::v1::WorkerStats s;
    if (StatsOf<kl::v1::Decode>(c.decode_address(i), &s)) integrity += s.integrity_failures();
  }
  std::ostringstream table;
  table << "\n#  start-end (s)   injection                          target     | requests ended  ok  failed (codes)\n";
  std::map<std::string, int> totals;
  int violations = 0;
  for (const Outcome& oc : outcomes) {
    ++totals[CodeName(oc.code)];
    if (!oc.violation.empty()) {
      ++violations;
      ADD_FAILURE() << "request " << oc.start << "-" << oc.end << " s: " << oc.violation;
    }
  }
  for (size_t j = 0; j <= injections.size(); ++j) {
    const double from = j == 0 ? 0 : injections[j - 1].start;
    const double to = j < injections.size() ? injections[j].start : 1e9;
    int ended = 0, ok = 0;
    std::map<std::string, int> codes;
    for (const Outcome& oc : outcomes) {
      if (oc.end < from || oc.end >= to) continue;
      ++ended;
      if (oc.code == grpc::StatusCode::OK) {
        ++ok;
      } else {
        ++codes[CodeName(oc.code)];
      }
    }
    std::string failed;
    for (const auto& [k, v] : codes) failed += k + " x" + std::to_string(v) + " ";
    char line[256];
    if (j == 0) {
      std::snprintf(line, sizeof(line), "-  %6.1f-%-6.1f   %-34s %-10s | %14d %3d  %s\n", 0.0,
                    injections.empty() ? 0.0 : injections[0].start, "(warm-up, no fault)", "",
                    ended, ok, failed.c_str());
    } else {
      const Injection& in = injections[j - 1];
      std::snprintf(line, sizeof(line), "%-2zu %6.1f-%-6.1f   %-34s %-10s | %14d %3d  %s\n", j,
                    in.start, in.end, in.what.c_str(), in.target.c_str(), ended, ok,
                    failed.c_str());
    }
    table << line;
  }
  table << "totals: " << outcomes.size() << " requests;";
  for (const auto& [k, v] : totals) table << " " << k << " " << v << ";";
  table << " violations " << violations << "; router retries "
        << Sample(router_metrics, "kl_retries_total") << ", migrations "
        << Sample(router_metrics, "kl_migrations_total") << "; decode integrity failures "
        << integrity << "; pools idle afterwards: " << (busy.empty() ? "yes" : "NO") << "\n";
  std::cout << table.str() << std::flush;
  if (const char* out = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR")) {
    std::ofstream(std::string(out) + "/fault_table.txt") << "seed " << seed << table.str();
  }
  EXPECT_GT(totals["OK"], 0);
  EXPECT_EQ(injections.size(), plan.size());
}

// Damaged state pushes: kl-prefill damages every second push (each kind in
// turn); the decode worker refuses each (integrity failure), nothing of it is
// decoded, the router retries on a clean push, every request gets the oracle's
// tokens, and nothing stays held.
TEST(FaultSuite, DamagedStatePushesAreRefusedNeverDecodedAndRetried) {
  const std::vector<std::string> kinds = {"corrupt", "truncate", "duplicate", "reorder",
                                          "drop_final"};
  Oracle::Get();
  LocalClusterOptions o;
  o.model_dir = ModelDir();
  o.log_dir = LogDir();
  o.prefill_args = {"--fault_inject_state=corrupt,truncate,duplicate,reorder,drop_final",
                    "--fault_inject_every=2"};
  LocalCluster c(o);
  ASSERT_TRUE(c.Start().ok());
  GenerationClient client(c.router_address());
  // Serial requests: pushes 2, 4, ... are damaged, so request n >= 2 meets
  // damaged push kinds[n - 2] first and its retry is clean.
  const int n = 1 + static_cast<int>(kinds.size());
  for (int i = 0; i < n; ++i) {
    const std::string prompt = Prompt(10 + 7 * i, 20 + i);
    StreamResult r = client.Generate(Req(prompt, 8), 60);
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle::Get().Greedy(prompt, 8, /*ignore_eos=*/true)) << i;
  }
  kl::v1::WorkerStats d;
  ASSERT_TRUE(StatsOf<kl::v1::Decode>(c.decode_address(0), &d));
  EXPECT_EQ(d.integrity_failures(), static_cast<int64_t>(kinds.size()));  // each one refused
  EXPECT_EQ(d.requests_completed(), n);  // only the verified states were decoded
  const std::string router = Metrics(c.metrics_address(ClusterRole::kRouter));
  EXPECT_EQ(Sample(router, "kl_retries_total"), static_cast<double>(kinds.size()));
  EXPECT_EQ(WaitIdle(c, 1, 1, 10), "");
  std::cout << "damaged pushes: " << kinds.size() << " injected (one of each kind), "
            << d.integrity_failures() << " refused by the decode worker, "
            << Sample(router, "kl_retries_total") << " router retries, " << n
            << "/" << n << " requests correct\n";
}

// When every push is damaged, the request fails clearly (UNAVAILABLE naming
// the refused transfer) within its deadline, and nothing is decoded or held.
TEST(FaultSuite, AlwaysDamagedPushesFailTheRequestClearly) {
  Oracle::Get();
  LocalClusterOptions o;
  o.model_dir = ModelDir();
  o.log_dir = LogDir();
  o.prefill_args = {"--fault_inject_state=corrupt"};
  o.router_args = {"--retries=2"};
  LocalCluster c(o);
  ASSERT_TRUE(c.Start().ok());
  GenerationClient client(c.router_address());
  const auto t0 = Clock::now();
  StreamResult r = client.Generate(Req(Prompt(12, 3), 8), 30);
  EXPECT_LT(Since(t0), 30);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_NE(r.status.error_message().find("DATA_LOSS"), std::string::npos)
      << r.status.error_message();
  EXPECT_TRUE(r.tokens.empty());
  kl::v1::WorkerStats d;
  ASSERT_TRUE(StatsOf<kl::v1::Decode>(c.decode_address(0), &d));
  EXPECT_EQ(d.integrity_failures(), 3);  // the first attempt and 2 retries
  EXPECT_EQ(d.requests_completed(), 0);
  EXPECT_EQ(WaitIdle(c, 1, 1, 10), "");
  std::cout << "always-damaged pushes: " << r.status.error_message() << "\n";
}

}  // namespace
}  // namespace kl
