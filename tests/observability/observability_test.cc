// Observability end to end (issue 5): a local cluster (router, prefill,
// decode: real processes, tiny model) scraped every second by a real
// Prometheus server (/usr/bin/prometheus, Debian's package) that also loads
// deploy/monitoring/kimi-serve.rules.yaml. After a few generations the test
// asks Prometheus's HTTP API for the expected series and values, runs
// `promtool check metrics` on every endpoint and `promtool check|test rules`
// on the rules, checks that every Grafana panel query names only series the
// services export (or the rules record) and runs, and that one request's id
// (sent as x-request-id metadata) is in the router's, the prefill worker's
// and the decode worker's log lines about it.
//
// Prometheus and promtool come from tools/install_deps.sh: missing, the test
// fails (it does not skip).
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gtest/gtest.h"
#include "proto/generation.grpc.pb.h"
#include "services/common/http_get.h"
#include "tools/kl/client.h"
#include "tools/kl/local_cluster.h"
#include "tools/make_checkpoint/maker.h"

namespace kl {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr char kPrometheus[] = "/usr/bin/prometheus";
constexpr char kPromtool[] = "/usr/bin/promtool";
constexpr int kDecodeSlots = 8;

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}
std::string Tmp() { return Env("TEST_TMPDIR"); }
std::string LogDir() {
  const std::string out = Env("TEST_UNDECLARED_OUTPUTS_DIR");
  return out.empty() ? Tmp() : out;
}
std::string Runfile(const std::string& rel) {
  return Env("TEST_SRCDIR") + "/" + (Env("TEST_WORKSPACE").empty() ? "kimi_serve" : Env("TEST_WORKSPACE")) +
         "/" + rel;
}
std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct CmdResult {
  int rc = -1;
  std::string out;
};
// `cmd` through /bin/sh, stderr folded into the output.
CmdResult Shell(const std::string& cmd) {
  CmdResult r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Polls `check` until it returns true or `seconds` pass (a bounded wait on a
// condition, not a sleep standing in for one).
bool Eventually(const std::function<bool()>& check, double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (true) {
    if (check()) return true;
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

std::string UrlEncode(const std::string& s) {
  std::string out;
  const char* hex = "0123456789ABCDEF";
  for (unsigned char c : s) {
    if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// A Prometheus server as a child process; killed (and reaped) on destruction.
class PrometheusServer {
 public:
  ~PrometheusServer() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }

  // Starts it on `config`, storing into `storage`, and waits for /-/ready.
  absl::Status Start(const std::string& config, const std::string& storage, const std::string& log) {
    if (access(kPrometheus, X_OK) != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          kPrometheus, " is missing: run tools/install_deps.sh (Debian package prometheus)"));
    }
    port_ = PickFreePort();
    const std::string listen = absl::StrCat("--web.listen-address=127.0.0.1:", port_);
    const std::string cfg = "--config.file=" + config;
    const std::string tsdb = "--storage.tsdb.path=" + storage;
    pid_ = fork();
    if (pid_ < 0) return absl::InternalError("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives the test
      FILE* f = std::freopen(log.c_str(), "w", stderr);
      if (f != nullptr) dup2(fileno(stderr), 1);
      execl(kPrometheus, kPrometheus, cfg.c_str(), tsdb.c_str(), listen.c_str(),
            "--log.level=warn", static_cast<char*>(nullptr));
      _exit(127);
    }
    const bool ready = Eventually(
        [&] {
          if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
            pid_ = -1;
            return true;
          }
          absl::StatusOr<HttpResponse> r = HttpGet(address(), "/-/ready");
          return r.ok() && r->status == 200;
        },
        60);
    if (pid_ < 0) {
      return absl::InternalError("prometheus exited during start-up; its log:\n" + ReadFile(log));
    }
    if (!ready) return absl::DeadlineExceededError("prometheus not ready after 60 s:\n" + ReadFile(log));
    return absl::OkStatus();
  }

  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }

  // GET of an API path; the decoded JSON when it says "status": "success".
  absl::StatusOr<json> Api(const std::string& path) const {
    absl::StatusOr<HttpResponse> r = HttpGet(address(), path);
    if (!r.ok()) return r.status();
    json j = json::parse(r->body, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || j.value("status", "") != "success") {
      return absl::InternalError(absl::StrCat("GET ", path, ": HTTP ", r->status, ": ", r->body));
    }
    return j;
  }
  absl::StatusOr<json> Query(const std::string& expr) const {
    absl::StatusOr<json> j = Api("/api/v1/query?query=" + UrlEncode(expr));
    if (!j.ok()) return absl::Status(j.status().code(), expr + ": " + std::string(j.status().message()));
    return (*j)["data"];
  }
  // The value of an instant query with exactly one sample, else nullopt.
  std::optional<double> Value(const std::string& expr) const {
    absl::StatusOr<json> d = Query(expr);
    if (!d.ok() || (*d)["resultType"] != "vector" || (*d)["result"].size() != 1) return std::nullopt;
    return std::strtod((*d)["result"][0]["value"][1].get<std::string>().c_str(), nullptr);
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
};

// ---------------------------------------------------------------- PromQL names

// The metric names a PromQL expression selects: identifiers outside strings,
// label matchers, ranges and grouping clauses that are neither functions nor
// keywords. Good enough for the dashboard's queries (checked below on
// examples); a name it missed would make the test pass wrongly, so the
// dashboard test also requires every query to name at least one series.
std::set<std::string> MetricNames(std::string e) {
  e = std::regex_replace(e, std::regex(R"("(\\.|[^"\\])*")"), " ");
  e = std::regex_replace(e, std::regex(R"(\{[^}]*\})"), " ");
  e = std::regex_replace(e, std::regex(R"(\[[^\]]*\])"), " ");
  e = std::regex_replace(
      e, std::regex(R"(\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\))"), " ");
  static const std::set<std::string> kKeywords = {
      "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
      "or", "unless", "offset", "inf", "nan", "Inf", "NaN", "atan2"};
  std::set<std::string> names;
  const std::regex ident(R"([A-Za-z_:][A-Za-z0-9_:]*)");
  for (auto it = std::sregex_iterator(e.begin(), e.end(), ident); it != std::sregex_iterator(); ++it) {
    const size_t pos = it->position(), end = pos + it->length();
    if (pos > 0 && (isdigit(static_cast<unsigned char>(e[pos - 1])) || e[pos - 1] == '.' ||
                    e[pos - 1] == '$')) {
      continue;  // an exponent (1e-9) or a variable
    }
    size_t next = end;
    while (next < e.size() && isspace(static_cast<unsigned char>(e[next]))) ++next;
    if (next < e.size() && e[next] == '(') continue;  // a function or an aggregation
    if (kKeywords.count(it->str())) continue;
    names.insert(it->str());
  }
  return names;
}

TEST(MetricNames, FindsSeriesNotFunctionsLabelsOrVariables) {
  EXPECT_EQ(MetricNames(R"(histogram_quantile(0.99, sum by (le, kind) (rate(kl_x_bucket{instance=~"$instance", a="b{c}"}[$__rate_interval]))))"),
            std::set<std::string>{"kl_x_bucket"});
  EXPECT_EQ(MetricNames("sum(a_total) / clamp_min(sum(b), 1e-9) > bool 0 or on (job) kl:c:p99"),
            (std::set<std::string>{"a_total", "b", "kl:c:p99"}));
  EXPECT_EQ(MetricNames("(sum(up{job=\"kl-decode\"}) or vector(0)) == 0"), std::set<std::string>{"up"});
}

// The sample names of a family: what PromQL can select.
void AddSampleNames(const std::string& name, const std::string& type, std::set<std::string>* names) {
  if (type == "histogram") {
    for (const char* s : {"_bucket", "_sum", "_count"}) names->insert(name + s);
  } else if (type == "summary") {
    for (const char* s : {"", "_sum", "_count"}) names->insert(name + s);
  } else {
    names->insert(name);
  }
}

// Sample names a /metrics text exports, from its # TYPE lines.
void AddExported(const std::string& text, std::set<std::string>* names, std::set<std::string>* families) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream l(line);
    std::string hash, word, name, type;
    if (!(l >> hash >> word >> name >> type) || hash != "#" || word != "TYPE") continue;
    families->insert(name);
    AddSampleNames(name, type, names);
  }
}

// The README's metrics table: family -> {type, labels column}.
std::map<std::string, std::pair<std::string, std::string>> ReadmeFamilies() {
  std::map<std::string, std::pair<std::string, std::string>> out;
  std::istringstream in(ReadFile(Runfile("README.md")));
  std::string line;
  const std::regex row(R"(^\| `(kl_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|)");
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_search(line, m, row)) out[m[1]] = {m[2], m[3]};
  }
  return out;
}

// ---------------------------------------------------------------- the fixture

struct Traffic {
  int requests = 0;
  int64_t completion_tokens = 0;
  int64_t prompt_tokens = 0;
  std::string metadata_id;        // the id sent as x-request-id metadata
  std::string echoed_id;          // what the router's initial metadata said
};

class ObservabilityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string model = Tmp() + "/tiny";
    MakerOptions mo;
    mo.seed = 11;
    ASSERT_TRUE(MakeCheckpoint(TinyConfig(), model, mo).ok());
    LocalClusterOptions o;
    o.model_dir = model;
    o.prefill_workers = 1;
    o.decode_workers = 1;
    o.decode_slots = kDecodeSlots;
    o.log_dir = LogDir();
    cluster_ = new LocalCluster(o);
    absl::Status s = cluster_->Start();
    ASSERT_TRUE(s.ok()) << s;

    // Scrape every process each second; evaluate the rules each second.
    const std::string config = Tmp() + "/prometheus.yml";
    std::ofstream(config) << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          << "rule_files:\n  - " << Runfile("deploy/monitoring/kimi-serve.rules.yaml")
                          << "\nscrape_configs:\n"
                          << Job("kl-router", cluster_->metrics_address(ClusterRole::kRouter))
                          << Job("kl-prefill", cluster_->metrics_address(ClusterRole::kPrefill, 0))
                          << Job("kl-decode", cluster_->metrics_address(ClusterRole::kDecode, 0));
    prometheus_ = new PrometheusServer();
    s = prometheus_->Start(config, Tmp() + "/tsdb", LogDir() + "/prometheus.log");
    ASSERT_TRUE(s.ok()) << s;
    SendTraffic();
    ready_ = !::testing::Test::HasFailure();
  }

  // A failed set-up (reported above) fails every test instead of letting it
  // query a server that is not there.
  void SetUp() override {
    if (!ready_) GTEST_FAIL() << "the cluster / Prometheus set-up failed; see the first failure";
  }

  static void TearDownTestSuite() {
    delete prometheus_;
    prometheus_ = nullptr;
    delete cluster_;
    cluster_ = nullptr;
  }

  static std::string Job(const std::string& name, const std::string& target) {
    return absl::StrCat("  - job_name: ", name, "\n    static_configs:\n      - targets: ['", target,
                        "']\n");
  }

  static v1::GenerateRequest Request(const std::string& text, int64_t max_tokens) {
    v1::GenerateRequest r;
    r.set_text(text);
    r.mutable_sampling()->set_temperature(0);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    return r;
  }

  static void SendTraffic() {
    // Prometheus must see every counter at 0 before the traffic, or a rate()
    // over the first samples would read 0.
    for (const char* zero : {R"(kl_generation_tokens_total{job="kl-router"} == 0)",
                             R"(kl_prefill_time_seconds_count{job="kl-prefill"} == 0)",
                             R"(kl_decode_requests_completed_total{job="kl-decode"} == 0)"}) {
      ASSERT_TRUE(Eventually([&] { return prometheus_->Value(zero).has_value(); }, 60))
          << "Prometheus did not scrape " << zero << " within 60 s";
    }
    Traffic& t = traffic_;
    // One request with its id in x-request-id metadata, on a raw stub (to see
    // the initial metadata), then two through the kl client.
    t.metadata_id = absl::StrCat("obs-test-", getpid());
    auto stub = v1::Generation::NewStub(
        grpc::CreateChannel(cluster_->router_address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    ctx.AddMetadata("x-request-id", t.metadata_id);
    auto reader = stub->Generate(&ctx, Request("observability of alpha beta", 6));
    v1::GenerateResponse chunk;
    while (reader->Read(&chunk)) {
      t.completion_tokens += chunk.token_ids_size();
      if (chunk.has_usage()) t.prompt_tokens += chunk.usage().prompt_tokens();
    }
    const grpc::Status st = reader->Finish();
    ASSERT_TRUE(st.ok()) << st.error_message();
    const auto& md = ctx.GetServerInitialMetadata();
    if (auto it = md.find("x-request-id"); it != md.end()) {
      t.echoed_id.assign(it->second.data(), it->second.size());
    }
    ++t.requests;
    GenerationClient client(cluster_->router_address());
    for (int i = 0; i < 2; ++i) {
      StreamResult r = client.Generate(Request(absl::StrCat("prompt number ", i, " of the test"), 4 + i), 120);
      ASSERT_TRUE(r.status.ok()) << r.status.error_message();
      t.completion_tokens += static_cast<int64_t>(r.tokens.size());
      t.prompt_tokens += r.usage.prompt_tokens();
      ++t.requests;
    }
  }

  // Waits until `expr` reads `want` (Prometheus lags the processes by a
  // scrape); reports the last value read otherwise.
  static void ExpectValue(const std::string& expr, double want, double seconds = 30) {
    std::optional<double> got;
    Eventually([&] { return (got = prometheus_->Value(expr)) && *got == want; }, seconds);
    EXPECT_TRUE(got.has_value()) << expr << ": no single sample after " << seconds << " s";
    if (got) {
      EXPECT_EQ(*got, want) << expr;
    }
  }
  static void ExpectPositive(const std::string& expr, double seconds = 30) {
    std::optional<double> got;
    Eventually([&] { return (got = prometheus_->Value(expr)) && *got > 0; }, seconds);
    EXPECT_TRUE(got.has_value() && *got > 0)
        << expr << ": " << (got ? std::to_string(*got) : "no single sample") << " after " << seconds << " s";
  }

  static std::string Scrape(ClusterRole role) {
    absl::StatusOr<HttpResponse> r = HttpGet(cluster_->metrics_address(role, 0), "/metrics");
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->body : "";
  }

  static LocalCluster* cluster_;
  static PrometheusServer* prometheus_;
  static Traffic traffic_;
  static bool ready_;
};

LocalCluster* ObservabilityTest::cluster_ = nullptr;
PrometheusServer* ObservabilityTest::prometheus_ = nullptr;
Traffic ObservabilityTest::traffic_;
bool ObservabilityTest::ready_ = false;

TEST_F(ObservabilityTest, PrometheusScrapesEveryProcessAndCountsTheTraffic) {
  const Traffic& t = traffic_;
  ASSERT_EQ(t.requests, 3);
  ASSERT_GT(t.completion_tokens, 0);
  ExpectValue(R"(count(up{job=~"kl-router|kl-prefill|kl-decode"} == 1))", 3);
  // Router: every request, token and latency observation.
  ExpectValue(R"(sum(kl_request_success_total{job="kl-router"}))", t.requests);
  ExpectValue(R"(kl_request_success_total{job="kl-router", finished_reason="length"})", t.requests);
  ExpectValue(R"(kl_generation_tokens_total{job="kl-router"})", t.completion_tokens);
  ExpectValue(R"(kl_prompt_tokens_total{job="kl-router"})", t.prompt_tokens);
  ExpectValue(R"(kl_time_to_first_token_seconds_count{job="kl-router"})", t.requests);
  ExpectValue(R"(kl_e2e_request_latency_seconds_count{job="kl-router"})", t.requests);
  ExpectValue(R"(kl_time_to_first_token_seconds_bucket{job="kl-router", le="+Inf"})", t.requests);
  ExpectPositive(R"(kl_time_to_first_token_seconds_sum{job="kl-router"})");
  ExpectPositive(R"(kl_inter_token_latency_seconds_count{job="kl-router"})");
  ExpectValue(R"(sum(kl_request_failure_total) or vector(0))", 0);
  // Prefill: one prefill and one state push per request, bytes of both kinds.
  ExpectValue(R"(kl_prefill_time_seconds_count{job="kl-prefill"})", t.requests);
  ExpectValue(R"(kl_prefill_batch_tokens_sum{job="kl-prefill"})", t.prompt_tokens);
  ExpectValue(R"(kl_state_transfer_seconds_count{job="kl-prefill", kind="bundle"})", t.requests);
  ExpectPositive(R"(kl_state_transfer_bytes_total{job="kl-prefill", kind="kda_state"})");
  ExpectPositive(R"(kl_state_transfer_bytes_total{job="kl-prefill", kind="mla_latent"})");
  // Decode: every sequence finished there; slots as configured.
  ExpectValue(R"(kl_decode_requests_completed_total{job="kl-decode"})", t.requests);
  ExpectPositive(R"(kl_decode_step_seconds_count{job="kl-decode"})");
  ExpectValue(R"(kl_state_slots_capacity{job="kl-decode"})", kDecodeSlots);
  ExpectValue(R"(kl_state_integrity_failures_total{job="kl-decode"})", 0);
  // Idle again: every gauge of work in progress back to 0, in every stage.
  ExpectValue(R"(sum(kl_num_requests_running) + sum(kl_num_requests_waiting))", 0);
  ExpectValue(R"(count(kl_num_requests_running))", 3);  // router, prefill, decode stages
  ExpectValue(R"(sum(kl_state_slots_used) + sum(kl_leases_active) + sum(kl_state_transfers_in_flight))", 0);
  // The recording rules evaluate on the live series.
  ExpectPositive("kl:requests:rate5m");
  ExpectPositive("kl:generation_tokens:rate5m");
  ExpectPositive("kl:time_to_first_token_seconds:p99");
  ExpectPositive(R"(kl:state_transfer_bytes:rate5m{kind="mla_latent"})");
  ExpectValue("kl:state_slots_usage:ratio", 0);
}

TEST_F(ObservabilityTest, PromtoolChecksEveryEndpoint) {
  ASSERT_EQ(access(kPromtool, X_OK), 0)
      << kPromtool << " is missing: run tools/install_deps.sh (Debian package prometheus)";
  for (auto [role, name] : {std::pair{ClusterRole::kRouter, "router"},
                            std::pair{ClusterRole::kPrefill, "prefill"},
                            std::pair{ClusterRole::kDecode, "decode"}}) {
    const std::string text = Scrape(role);
    ASSERT_FALSE(text.empty()) << name;
    const std::string path = LogDir() + "/metrics_" + name + ".txt";  // kept for inspection
    std::ofstream(path) << text;
    const CmdResult r = Shell(absl::StrCat(kPromtool, " check metrics < '", path, "'"));
    EXPECT_EQ(r.rc, 0) << name << ": promtool check metrics:\n" << r.out;
  }
}

TEST_F(ObservabilityTest, RulesPassPromtoolAndEvaluateWithoutErrors) {
  ASSERT_EQ(access(kPromtool, X_OK), 0)
      << kPromtool << " is missing: run tools/install_deps.sh (Debian package prometheus)";
  const std::string dir = Runfile("deploy/monitoring");
  CmdResult r = Shell(absl::StrCat(kPromtool, " check rules '", dir, "/kimi-serve.rules.yaml'"));
  EXPECT_EQ(r.rc, 0) << r.out;
  // Relative rule_files in the test file: run from its folder.
  r = Shell(absl::StrCat("cd '", dir, "' && ", kPromtool, " test rules kimi-serve.rules.test.yaml"));
  EXPECT_EQ(r.rc, 0) << r.out;

  // The live server loaded both groups and every rule evaluated healthily.
  json groups;
  const bool evaluated = Eventually(
      [&] {
        absl::StatusOr<json> j = prometheus_->Api("/api/v1/rules");
        if (!j.ok()) return false;
        groups = (*j)["data"]["groups"];
        int rules = 0;
        for (const json& g : groups) {
          for (const json& rule : g["rules"]) {
            if (rule.value("health", "") != "ok") return false;
            ++rules;
          }
        }
        return groups.size() == 2 && rules > 0;
      },
      30);
  EXPECT_TRUE(evaluated) << "rules not loaded or unhealthy after 30 s: " << groups.dump(1);
}

TEST_F(ObservabilityTest, DashboardQueriesNameOnlyExportedSeriesAndRun) {
  // Exported sample names: from every process's live /metrics, plus the
  // series the rules record and `up` (Prometheus's own, per target).
  std::set<std::string> exported, families;
  for (ClusterRole role : {ClusterRole::kRouter, ClusterRole::kPrefill, ClusterRole::kDecode}) {
    AddExported(Scrape(role), &exported, &families);
  }
  ASSERT_GT(families.size(), 20u);
  // The README's table and the live families agree. Families labelled by
  // `code` have no series (hence no # TYPE line) until that code first
  // occurs, which a healthy run never sees: those count as exported from the
  // table.
  const auto readme = ReadmeFamilies();
  ASSERT_GT(readme.size(), 20u);
  for (const auto& [name, type_labels] : readme) {
    if (type_labels.second.find("`code`") != std::string::npos) {
      AddSampleNames(name, type_labels.first, &exported);
    } else {
      EXPECT_TRUE(families.count(name)) << name << " is in README.md's table but no process exports it";
    }
  }
  for (const std::string& f : families) {
    if (f.rfind("kl_", 0) == 0) {
      EXPECT_TRUE(readme.count(f)) << f << " is exported but not in README.md";
    }
  }
  const std::string rules = ReadFile(Runfile("deploy/monitoring/kimi-serve.rules.yaml"));
  const std::regex record(R"(record:\s*(\S+))");
  for (auto it = std::sregex_iterator(rules.begin(), rules.end(), record); it != std::sregex_iterator(); ++it) {
    exported.insert((*it)[1].str());
  }
  exported.insert("up");

  const std::string text = ReadFile(Runfile("deploy/monitoring/kimi-serve.dashboard.json"));
  json dash = json::parse(text, nullptr, false);
  ASSERT_FALSE(dash.is_discarded()) << "the dashboard is not valid JSON";
  bool has_ds_variable = false;
  for (const json& v : dash["templating"]["list"]) has_ds_variable |= v.value("type", "") == "datasource";
  EXPECT_TRUE(has_ds_variable) << "the dashboard needs a data source variable";

  std::vector<json> panels;
  std::function<void(const json&)> collect = [&](const json& list) {
    for (const json& p : list) {
      if (p.contains("panels")) collect(p["panels"]);
      if (p.value("type", "") != "row") panels.push_back(p);
    }
  };
  collect(dash["panels"]);
  ASSERT_GE(panels.size(), 10u);
  std::set<std::string> used;
  for (const json& p : panels) {
    const std::string title = p.value("title", "?");
    ASSERT_TRUE(p.contains("targets") && !p["targets"].empty()) << title << ": no query";
    for (const json& target : p["targets"]) {
      const std::string expr = target.value("expr", "");
      const std::set<std::string> names = MetricNames(expr);
      EXPECT_FALSE(names.empty()) << title << ": no series in " << expr;
      for (const std::string& n : names) {
        EXPECT_TRUE(exported.count(n)) << title << ": " << n << " is not exported by any process "
                                       << "nor recorded by the rules (" << expr << ")";
        used.insert(n);
      }
      // It runs on the live server, Grafana's variables filled in.
      std::string q = absl::StrReplaceAll(expr, {{"$__rate_interval", "1m"}, {"$instance", ".*"}});
      absl::StatusOr<json> result = prometheus_->Query(q);
      EXPECT_TRUE(result.ok()) << title << ": " << result.status();
    }
  }
  // The issue's panels: latency percentiles, throughput, queues, slots,
  // cache, transfer by kind, errors.
  for (const char* want : {"kl_time_to_first_token_seconds_bucket", "kl_inter_token_latency_seconds_bucket",
                           "kl_e2e_request_latency_seconds_bucket", "kl_generation_tokens_total",
                           "kl_num_requests_waiting", "kl_state_slots_used", "kl_latent_cache_usage_perc",
                           "kl_state_transfer_bytes_total", "kl_request_failure_total"}) {
    EXPECT_TRUE(used.count(want)) << "no dashboard panel queries " << want;
  }
}

TEST_F(ObservabilityTest, OneRequestIdInEveryProcessLog) {
  const Traffic& t = traffic_;
  EXPECT_EQ(t.echoed_id, t.metadata_id) << "the router's initial metadata x-request-id";
  const std::string tag = "req=" + t.metadata_id;
  // The lines about the request, by process (the decode stream's last line
  // may trail the client's final chunk: bounded wait).
  const std::vector<std::pair<std::string, std::vector<std::string>>> want = {
      {"router", {"msg=\"request started\"", "msg=\"request done\""}},
      {"prefill-0", {"msg=\"prefill done\""}},
      {"decode-0", {"msg=\"lease reserved\"", "msg=\"state received\"", "msg=\"decode stream done\""}},
  };
  for (const auto& [proc, msgs] : want) {
    const std::string path = LogDir() + "/" + proc + ".log";
    for (const std::string& msg : msgs) {
      auto has = [&] {
        std::istringstream in(ReadFile(path));
        std::string line;
        while (std::getline(in, line)) {
          if (line.find(msg) != std::string::npos && line.find(tag + " ") != std::string::npos) return true;
        }
        return false;
      };
      EXPECT_TRUE(Eventually(has, 10)) << proc << ": no line " << msg << " with " << tag << " in "
                                       << path << ":\n" << ReadFile(path);
    }
  }
  // Every per-request line of the workers carries some id (3 requests each).
  for (const auto& [proc, msg] : {std::pair{"prefill-0", "msg=\"prefill done\""},
                                  std::pair{"decode-0", "msg=\"decode stream done\""},
                                  std::pair{"decode-0", "msg=\"lease reserved\""}}) {
    std::istringstream in(ReadFile(LogDir() + "/" + proc + ".log"));
    std::string line;
    int n = 0;
    while (std::getline(in, line)) {
      if (line.find(msg) == std::string::npos) continue;
      ++n;
      EXPECT_NE(line.find(" req="), std::string::npos) << proc << ": " << line;
    }
    EXPECT_EQ(n, t.requests) << proc << " " << msg;
  }
}

}  // namespace
}  // namespace kl
