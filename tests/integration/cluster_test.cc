// End-to-end tests of the cluster: real kl-router, kl-prefill and kl-decode
// processes on loopback (tools/kl/local_cluster.h), the embedded tiny model, and
// the single-process engine as the oracle.
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "engine/runtime/generator.h"
#include "engine/runtime/local_engine.h"
#include "gtest/gtest.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/http_get.h"
#include "tests/common/cluster_util.h"
#include "tests/common/tiny_oracle.h"
#include "tools/kl/client.h"
#include "tools/kl/local_cluster.h"
#include "tools/make_checkpoint/maker.h"

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

std::string ModelDir() { return std::string(std::getenv("TEST_TMPDIR")) + "/tiny"; }

// The single-process engine on the checkpoint the workers load (tests/common).
class Oracle {
 public:
  static testing::TinyOracle& Get() {
    static auto* o = new testing::TinyOracle(ModelDir(), /*seed=*/7, /*threads=*/0);
    return *o;
  }
};

std::string LongPrompt(int words, int seed) { return testing::WordPrompt(words, seed); }

kl::v1::GenerateRequest Req(const std::string& prompt, int64_t max_tokens, bool ignore_eos = false) {
  return testing::GreedyRequest(prompt, max_tokens, ignore_eos);
}

// Indices 0..n-1 exactly once, in order.
void ExpectContiguous(const StreamResult& r) {
  for (size_t i = 0; i < r.indices.size(); ++i) ASSERT_EQ(r.indices[i], static_cast<int64_t>(i));
}

using testing::DecodeStats;

// Waits until every decode worker of `c` holds no slot, lease or transfer.
bool DecodeIdle(LocalCluster& c, int n, double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
    bool idle = true;
    for (int i = 0; i < n; ++i) {
      auto s = DecodeStats(c.decode_address(i));
      idle &= s.slots_used() == 0 && s.leases_active() == 0 && s.transfers_in_flight() == 0 &&
              s.running() == 0;
    }
    if (idle) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::unique_ptr<LocalCluster> StartCluster(int prefill, int decode,
                                           std::vector<std::string> router_args = {},
                                           std::function<int()> pick_port = nullptr) {
  Oracle::Get();  // makes the model
  LocalClusterOptions o;
  o.model_dir = ModelDir();
  o.prefill_workers = prefill;
  o.decode_workers = decode;
  o.decode_slots = 8;
  o.router_args = std::move(router_args);
  o.pick_port = std::move(pick_port);
  o.log_dir = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR") ? std::getenv("TEST_UNDECLARED_OUTPUTS_DIR")
                                                         : std::getenv("TEST_TMPDIR");
  auto c = std::make_unique<LocalCluster>(o);
  absl::Status s = c->Start();
  EXPECT_TRUE(s.ok()) << s;
  return c;
}

TEST(Cluster, GreedyEqualsSingleProcessShortAndLongPrompts) {
  auto c = StartCluster(1, 1);
  GenerationClient client(c->router_address());
  for (const std::string& prompt : {std::string("Once upon a time"), LongPrompt(150, 1)}) {
    StreamResult r = client.Generate(Req(prompt, 24), 60);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle::Get().Greedy(prompt, 24, false)) << prompt.size();
    ExpectContiguous(r);
    EXPECT_GT(r.usage.ttft_seconds(), 0);
    EXPECT_EQ(r.usage.completion_tokens(), static_cast<int64_t>(r.tokens.size()));
  }
  EXPECT_TRUE(DecodeIdle(*c, 1, 5));
}

// A loopback port held by a listening socket for the test's lifetime.
class HeldPort {
 public:
  HeldPort() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 && listen(fd_, 4) == 0 &&
        getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      port_ = ntohs(a.sin_port);
    }
  }
  ~HeldPort() { close(fd_); }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// Ports are picked before the processes bind them, so another process can
// take one in between (a parallel test did, once, in CI). Start must move the
// process that could not listen to fresh ports, worker or router, gRPC port or
// metrics port, and the cluster must then work as usual.
TEST(Cluster, PortsTakenBeforeTheProcessesBindThemAreReplaced) {
  HeldPort held_grpc, held_metrics;
  ASSERT_GT(held_grpc.port(), 0);
  ASSERT_GT(held_metrics.port(), 0);
  // Pick order: prefill port, prefill metrics, decode port, decode metrics,
  // router port, router metrics, then the replacements.
  int calls = 0;
  auto c = StartCluster(1, 1, {}, [&] {
    ++calls;
    const int p = calls == 1 || calls == 5 ? held_grpc.port()
                  : calls == 4             ? held_metrics.port()
                                           : PickFreePort();
    return p;
  });
  // Three processes had to move: each takes two fresh ports.
  EXPECT_EQ(calls, 6 + 2 * 3);
  for (const std::string& a :
       {c->router_address(), c->prefill_address(0), c->decode_address(0),
        c->metrics_address(ClusterRole::kRouter), c->metrics_address(ClusterRole::kPrefill, 0),
        c->metrics_address(ClusterRole::kDecode, 0)}) {
    EXPECT_NE(a, "127.0.0.1:" + std::to_string(held_grpc.port()));
    EXPECT_NE(a, "127.0.0.1:" + std::to_string(held_metrics.port()));
  }
  GenerationClient client(c->router_address());
  const std::string prompt = "Once upon a time";
  StreamResult r = client.Generate(Req(prompt, 8), 60);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, Oracle::Get().Greedy(prompt, 8, false));
  absl::StatusOr<HttpResponse> m = HttpGet(c->metrics_address(ClusterRole::kDecode, 0), "/metrics");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_NE(m->body.find("kl_"), std::string::npos);
}

TEST(Cluster, ConcurrentLoadOnSeveralWorkersMatchesOracle) {
  auto c = StartCluster(2, 2);
  GenerationClient client(c->router_address());
  const int n = 10;
  std::vector<StreamResult> results(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      results[i] = client.Generate(Req(LongPrompt(5 + 25 * i, i), 16 + i, true), 120);
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < n; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, Oracle::Get().Greedy(LongPrompt(5 + 25 * i, i), 16 + i, true)) << i;
    ExpectContiguous(results[i]);
  }
  EXPECT_TRUE(DecodeIdle(*c, 2, 5));
  // Every worker's stats, as `kl bench` reports them: the decode workers
  // finished the 10 requests between them; a CPU build moves no state over
  // device links.
  auto all = c->WorkerStatsAll();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 4u);
  int64_t finished = 0;
  for (const auto& [name, s] : *all) {
    EXPECT_EQ(s.role(), name.substr(0, name.find('-'))) << name;
    if (s.role() == "decode") finished += s.requests_completed();
    EXPECT_EQ(s.device_transfers() + s.device_messages() + s.device_link_inits(), 0) << name;
  }
  EXPECT_EQ((*all)[0].first, "prefill-0");
  EXPECT_EQ((*all)[3].first, "decode-1");
  EXPECT_EQ(finished, n);
}

TEST(Cluster, DecodeWorkerKilledMidStreamMigrates) {
  auto c = StartCluster(1, 2);
  GenerationClient client(c->router_address());
  const std::string prompt = LongPrompt(40, 3);
  std::atomic<int> seen{0};
  std::atomic<bool> killed{false};
  // Long enough (about 0.5 s, several under ASan) that the stream is still on
  // its first decode worker when that one is found and killed.
  const int n = 1000;
  StreamResult r =
      client.Generate(Req(prompt, n, true), 120, [&](const kl::v1::GenerateResponse& ch) {
        seen += ch.token_ids_size();
        if (seen >= 10 && !killed.exchange(true)) {
          for (int i = 0; i < 2; ++i) {
            // Only the first one found: the stream soon runs on the other.
            if (DecodeStats(c->decode_address(i)).running() > 0) {
              c->KillDecode(i);
              break;
            }
          }
        }
      });
  ASSERT_TRUE(killed);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, Oracle::Get().Greedy(prompt, n, true));
  ExpectContiguous(r);
  EXPECT_GE(r.usage.migrations(), 1);
}

TEST(Cluster, PrefillWorkerKilledBeforeFirstTokenIsRetried) {
  auto c = StartCluster(2, 1);
  c->KillPrefill(0);  // the router may still pick it until its health check notices
  GenerationClient client(c->router_address());
  for (int i = 0; i < 4; ++i) {
    const std::string prompt = LongPrompt(20 + i, i);
    StreamResult r = client.Generate(Req(prompt, 8), 60);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle::Get().Greedy(prompt, 8, false));
  }
}

TEST(Cluster, CancelDeadlineAndVanishedClientFreeEverything) {
  auto c = StartCluster(1, 1);
  GenerationClient client(c->router_address());
  // Deadline expiry mid-stream.
  StreamResult r = client.Generate(Req(LongPrompt(30, 4), 100000, true), 0.5);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(DecodeIdle(*c, 1, 10));
  // A client process that vanishes mid-stream (a separate Python client: forking
  // this gRPC-using process would not give an independent client).
  const std::string root = std::string(std::getenv("TEST_SRCDIR")) + "/kimi_serve";
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string router = c->router_address();
    execl("/usr/bin/python3", "python3", (root + "/tests/integration/python_client.py").c_str(),
          "--router", router.c_str(), "--proto_dir", (root + "/proto").c_str(), "--max_tokens",
          "100000", "--ignore_eos", static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait until the request is decoding, then kill the client.
  bool running = false;
  for (int i = 0; i < 200 && !running; ++i) {
    running = DecodeStats(c->decode_address(0)).running() > 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(running);
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  EXPECT_TRUE(DecodeIdle(*c, 1, 10));
  // The cluster still serves.
  StreamResult ok = client.Generate(Req("after", 4), 60);
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
}

TEST(Cluster, BadRequestsGetPreciseStatusesAndHarmNothing) {
  auto c = StartCluster(1, 1, {"--max_prompt_tokens=256", "--max_tokens_limit=1000"});
  GenerationClient client(c->router_address());
  auto expect = [&](const kl::v1::GenerateRequest& req, grpc::StatusCode code, const std::string& field) {
    StreamResult r = client.Generate(req, 10);
    EXPECT_EQ(r.status.error_code(), code) << field << ": " << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(field), std::string::npos) << r.status.error_message();
  };
  kl::v1::GenerateRequest empty = Req("", 4);
  expect(empty, grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  kl::v1::GenerateRequest bad_id;
  bad_id.mutable_token_ids()->add_ids(1);
  bad_id.mutable_token_ids()->add_ids(1 << 20);
  expect(bad_id, grpc::StatusCode::INVALID_ARGUMENT, "token");
  expect(Req(LongPrompt(400, 6), 4), grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  auto t = Req("x", 4);
  t.mutable_sampling()->set_temperature(-1);
  expect(t, grpc::StatusCode::INVALID_ARGUMENT, "temperature");
  auto p = Req("x", 4);
  p.mutable_sampling()->set_top_p(2);
  expect(p, grpc::StatusCode::INVALID_ARGUMENT, "top_p");
  expect(Req("x", 0), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  expect(Req("x", 5000), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  StreamResult ok = client.Generate(Req("still fine", 4), 60);
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_TRUE(DecodeIdle(*c, 1, 5));
}

// Prometheus text of one process's /metrics, fetched over a plain socket.
std::string Scrape(const std::string& address) {
  absl::StatusOr<HttpResponse> r = HttpGet(address, "/metrics");
  EXPECT_TRUE(r.ok()) << address << ": " << r.status();
  if (!r.ok()) return "";
  EXPECT_EQ(r->status, 200) << r->headers;
  return r->body;
}

// The value of the sample line `series` (name plus labels exactly as
// prometheus-cpp writes them), or -1 when absent.
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

// Polls the sample `series` of the process at `metrics` until it equals
// `want` (true) or `seconds` pass (false).
bool SampleBecomes(const std::string& metrics, const std::string& series, double want,
                   double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  do {
    absl::StatusOr<HttpResponse> r = HttpGet(metrics, "/metrics");
    if (r.ok() && Sample(r->body, series) == want) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (Clock::now() < until);
  return false;
}

TEST(Cluster, FullQueueIsRejectedAtOnceAndNoWorkerIsUnavailable) {
  auto c = StartCluster(1, 1, {"--max_queue=1", "--max_inflight=1"});
  GenerationClient client(c->router_address());
  const std::string metrics = c->metrics_address(ClusterRole::kRouter);
  // One request runs, one waits in the queue (each ends at its 5 s deadline).
  std::thread busy([&] { client.Generate(Req(LongPrompt(30, 7), 100000, true), 5); });
  ASSERT_TRUE(SampleBecomes(metrics, "kl_num_requests_running{stage=\"router\"}", 1, 5));
  std::thread busy2([&] { client.Generate(Req(LongPrompt(30, 8), 100000, true), 5); });
  ASSERT_TRUE(SampleBecomes(metrics, "kl_num_requests_waiting{stage=\"router_queue\"}", 1, 5));
  const auto t0 = Clock::now();
  StreamResult r = client.Generate(Req("one too many", 4), 10);
  const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << r.status.error_message();
  // At once: not after waiting for a place (the busy streams hold theirs for
  // seconds). The bound leaves room for a loaded 2-core machine under ASan.
  EXPECT_LT(dt, 2.0);
  busy.join();
  busy2.join();
  c->KillDecode(0);
  // Once the router's health check notices, new requests get UNAVAILABLE.
  grpc::StatusCode code = grpc::StatusCode::OK;
  for (int i = 0; i < 50 && code != grpc::StatusCode::UNAVAILABLE; ++i) {
    code = client.Generate(Req("x", 2), 5).status.error_code();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(code, grpc::StatusCode::UNAVAILABLE);
}

// `promtool check metrics` on the text (Debian's prometheus package, installed
// by tools/install_deps.sh; missing, the check fails).
void PromtoolCheck(const std::string& text, const std::string& what) {
  if (const char* out = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR")) {  // kept for inspection
    std::ofstream(std::string(out) + "/metrics_" + what + ".txt") << text;
  }
  const char* promtool = "/usr/bin/promtool";
  ASSERT_EQ(access(promtool, X_OK), 0)
      << promtool << " is missing: run tools/install_deps.sh (Debian package prometheus)";
  const std::string path = std::string(std::getenv("TEST_TMPDIR")) + "/scrape_" + what + ".txt";
  std::ofstream(path) << text;
  const std::string cmd = std::string(promtool) + " check metrics < " + path + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[512];
  while (fgets(buf, sizeof(buf), p) != nullptr) out += buf;
  const int rc = pclose(p);
  EXPECT_EQ(rc, 0) << what << ": " << out;
}

// A conversation through the router: each turn's prompt is the previous
// prompt, the reply and a new message. Of two prefill workers the router
// sends every turn to the one that prefilled the previous turn (prefix
// affinity), which starts from the state it kept; the client sees that in
// Usage.cached_prompt_tokens, SREs in kl_prefix_cache_* and
// kl_prefix_affinity_total, and the tokens are the single-process engine's.
TEST(Cluster, ConversationTurnsReuseThePrefillWorkersCachedState) {
  auto c = StartCluster(2, 1);
  GenerationClient client(c->router_address());
  auto ids = [](int n, int salt) {
    std::vector<int32_t> v;
    for (int i = 0; i < n; ++i) v.push_back(100 + (i * 31 + salt * 57) % 2900);
    return v;
  };
  std::vector<int32_t> prompt = ids(40, 1);
  int64_t previous = 0, cached_total = 0;
  for (int turn = 0; turn < 3; ++turn) {
    kl::v1::GenerateRequest req;
    for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
    req.mutable_sampling()->set_temperature(0);
    req.mutable_sampling()->set_max_tokens(6);
    req.mutable_sampling()->set_ignore_eos(true);
    StreamResult r = client.Generate(req, 60);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle::Get().GreedyIds(prompt, 6, true)) << "turn " << turn;
    EXPECT_EQ(r.usage.cached_prompt_tokens(), previous) << "turn " << turn;
    EXPECT_EQ(r.usage.prompt_tokens(), static_cast<int64_t>(prompt.size()));
    cached_total += previous;
    // The worker keeps the state once it has replied: wait for it.
    const auto until = Clock::now() + std::chrono::seconds(10);
    int64_t entries = 0;
    while (entries != turn + 1 && Clock::now() < until) {
      auto all = c->WorkerStatsAll();
      entries = 0;
      if (all.ok()) {
        for (int p = 0; p < 2; ++p) entries += (*all)[p].second.prefix_cache_entries();
      }
      if (entries != turn + 1) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ASSERT_EQ(entries, turn + 1);
    previous = static_cast<int64_t>(prompt.size());
    prompt.insert(prompt.end(), r.tokens.begin(), r.tokens.end());
    const std::vector<int32_t> message = ids(15 + 10 * turn, 10 + turn);
    prompt.insert(prompt.end(), message.begin(), message.end());
  }
  // Every turn went to one worker.
  const std::string p0 = Scrape(c->metrics_address(ClusterRole::kPrefill, 0));
  const std::string text = Sample(p0, "kl_prefix_cache_entries") == 3
                               ? p0
                               : Scrape(c->metrics_address(ClusterRole::kPrefill, 1));
  EXPECT_EQ(Sample(text, "kl_prefix_cache_hits_total"), cached_total) << text;
  EXPECT_EQ(Sample(text, "kl_prefix_cache_requests_total{result=\"hit\"}"), 2);
  EXPECT_EQ(Sample(text, "kl_prefix_cache_requests_total{result=\"miss\"}"), 1);
  EXPECT_EQ(Sample(text, "kl_prefix_cache_entries"), 3);
  EXPECT_GT(Sample(text, "kl_prefix_cache_bytes"), 0);
  const std::string router = Scrape(c->metrics_address(ClusterRole::kRouter));
  EXPECT_EQ(Sample(router, "kl_prefix_affinity_total{result=\"followed\"}"), 2) << router;
  EXPECT_EQ(Sample(router, "kl_prefix_affinity_total{result=\"overridden\"}"), 0);
}

TEST(Cluster, EveryProcessServesPrometheusMetricsThatAddUp) {
  auto c = StartCluster(1, 2);
  GenerationClient client(c->router_address());
  const int n = 3;
  int64_t streamed = 0, prompt_tokens = 0;
  for (int i = 0; i < n; ++i) {
    StreamResult r = client.Generate(Req(LongPrompt(10 + 40 * i, i), 10 + i, true), 60);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    streamed += static_cast<int64_t>(r.tokens.size());
    prompt_tokens += r.usage.prompt_tokens();
  }
  ASSERT_TRUE(DecodeIdle(*c, 2, 5));
  // The router counts a request out of "running" just after its stream ends.
  ASSERT_TRUE(SampleBecomes(c->metrics_address(ClusterRole::kRouter),
                            "kl_num_requests_running{stage=\"router\"}", 0, 5));

  const std::string router = Scrape(c->metrics_address(ClusterRole::kRouter));
  PromtoolCheck(router, "router");
  EXPECT_NE(router.find("# TYPE kl_time_to_first_token_seconds histogram"), std::string::npos)
      << router;
  EXPECT_NE(router.find("# HELP kl_generation_tokens_total"), std::string::npos);
  EXPECT_EQ(Sample(router, "kl_generation_tokens_total"), streamed) << router;
  EXPECT_EQ(Sample(router, "kl_prompt_tokens_total"), prompt_tokens);
  EXPECT_EQ(Sample(router, "kl_time_to_first_token_seconds_count"), n);
  EXPECT_GT(Sample(router, "kl_time_to_first_token_seconds_sum"), 0);
  EXPECT_EQ(Sample(router, "kl_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), n);
  EXPECT_EQ(Sample(router, "kl_e2e_request_latency_seconds_count"), n);
  EXPECT_EQ(Sample(router, "kl_request_queue_time_seconds_count"), n);
  EXPECT_EQ(Sample(router, "kl_time_per_output_token_seconds_count"), n);
  EXPECT_GT(Sample(router, "kl_inter_token_latency_seconds_count"), 0);
  EXPECT_LE(Sample(router, "kl_inter_token_latency_seconds_count"), streamed - n);
  EXPECT_EQ(Sample(router, "kl_request_success_total{finished_reason=\"length\"}"), n);
  EXPECT_EQ(Sample(router, "kl_request_success_total{finished_reason=\"stop\"}"), 0);
  EXPECT_EQ(Sample(router, "kl_num_requests_running{stage=\"router\"}"), 0);
  EXPECT_EQ(Sample(router, "kl_num_requests_waiting{stage=\"router_queue\"}"), 0);
  EXPECT_EQ(Sample(router, "kl_rejections_total{reason=\"queue_full\"}"), 0);
  EXPECT_EQ(Sample(router, "kl_retries_total"), 0);
  EXPECT_EQ(Sample(router, "kl_migrations_total"), 0);
  EXPECT_EQ(Sample(router, "kl_cancellations_total"), 0);

  const std::string prefill = Scrape(c->metrics_address(ClusterRole::kPrefill, 0));
  PromtoolCheck(prefill, "prefill");
  EXPECT_EQ(Sample(prefill, "kl_prefill_time_seconds_count"), n) << prefill;
  EXPECT_EQ(Sample(prefill, "kl_prefill_queue_time_seconds_count"), n);
  EXPECT_GE(Sample(prefill, "kl_prefill_batch_tokens_count"), 1);
  EXPECT_EQ(Sample(prefill, "kl_prefill_batch_tokens_sum"), prompt_tokens);
  EXPECT_GT(Sample(prefill, "kl_state_transfer_bytes_total{kind=\"kda_state\"}"), 0);
  EXPECT_GT(Sample(prefill, "kl_state_transfer_bytes_total{kind=\"mla_latent\"}"), 0);
  EXPECT_EQ(Sample(prefill, "kl_state_transfer_seconds_count{kind=\"bundle\"}"), n);
  EXPECT_EQ(Sample(prefill, "kl_state_transfer_seconds_count{kind=\"kda_state\"}"), n);
  EXPECT_EQ(Sample(prefill, "kl_num_requests_waiting{stage=\"prefill\"}"), 0);
  EXPECT_EQ(Sample(prefill, "kl_state_transfers_in_flight{stage=\"prefill\"}"), 0);

  double steps = 0, completed = 0;
  for (int i = 0; i < 2; ++i) {
    const std::string decode = Scrape(c->metrics_address(ClusterRole::kDecode, i));
    PromtoolCheck(decode, "decode" + std::to_string(i));
    EXPECT_EQ(Sample(decode, "kl_state_slots_used"), 0) << decode;
    EXPECT_EQ(Sample(decode, "kl_state_slots_capacity"), 8);
    EXPECT_EQ(Sample(decode, "kl_leases_active"), 0);
    EXPECT_EQ(Sample(decode, "kl_latent_cache_usage_perc"), 0);
    EXPECT_EQ(Sample(decode, "kl_state_integrity_failures_total"), 0);
    EXPECT_EQ(Sample(decode, "kl_state_transfers_in_flight{stage=\"decode\"}"), 0);
    EXPECT_EQ(Sample(decode, "kl_num_requests_running{stage=\"decode\"}"), 0);
    EXPECT_EQ(Sample(decode, "kl_decode_batch_size_count"),
              Sample(decode, "kl_decode_step_seconds_count"));
    steps += Sample(decode, "kl_decode_step_seconds_count");
    completed += Sample(decode, "kl_decode_requests_completed_total");
  }
  // Decode produces every token but the first (prefill samples it).
  EXPECT_EQ(completed, n);
  EXPECT_GE(steps, (streamed - n) / static_cast<double>(n));
}

TEST(Cluster, PythonClientStreamsUsingOnlyTheProtoFiles) {
  auto c = StartCluster(1, 1);
  const std::string root = std::string(std::getenv("TEST_SRCDIR")) + "/kimi_serve";
  const std::string out = std::string(std::getenv("TEST_TMPDIR")) + "/py.json";
  const std::string cmd = "/usr/bin/python3 " + root + "/tests/integration/python_client.py --router " +
                          c->router_address() + " --proto_dir " + root + "/proto --prompt 'Once upon a time' > " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream f(out);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string json = ss.str();
  // The same greedy tokens as the oracle, as JSON text.
  EXPECT_NE(json.find("\"tokens\": ["), std::string::npos) << json;
  EXPECT_NE(json.find("\"finish\": \"FINISH_REASON_"), std::string::npos) << json;
  std::string expect_tokens = "\"tokens\": [";
  const auto greedy = Oracle::Get().Greedy("Once upon a time", 12, false);
  for (size_t i = 0; i < greedy.size(); ++i) expect_tokens += (i ? ", " : "") + std::to_string(greedy[i]);
  EXPECT_NE(json.find(expect_tokens + "]"), std::string::npos) << json << "\nwant " << expect_tokens;
}

}  // namespace
}  // namespace kl
