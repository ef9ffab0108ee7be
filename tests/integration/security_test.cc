// Security end to end (docs/security.md): real kl-router, kl-prefill and
// kl-decode processes with the cluster's mutual TLS, public TLS and API keys,
// using throwaway certificates made with openssl at test time
// (tools/certs/gen_test_certs.sh). Checks that the secured cluster generates
// exactly what the single-process engine does (the prefill -> decode state
// push runs over mTLS too), that workers refuse callers without the cluster
// certificate, that the public API refuses plaintext, untrusting and
// key-less clients, and that a bad certificate flag stops a process at once.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "gtest/gtest.h"
#include "engine/runtime/generator.h"
#include "engine/runtime/local_engine.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/tls.h"
#include "tools/certs/test_certs.h"
#include "tools/kl/client.h"
#include "tools/kl/local_cluster.h"
#include "tests/common/tiny_oracle.h"

namespace kl {
namespace {

std::string TmpDir() { return std::getenv("TEST_TMPDIR"); }
std::string ModelDir() { return TmpDir() + "/tiny"; }
constexpr char kAliceKey[] = "alice-0123456789abcdef";

// The model, the certificates, the keys file and one secured cluster, shared
// by every test (start-up is the expensive part).
class SecuredCluster {
 public:
  static SecuredCluster& Get() {
    static SecuredCluster* c = new SecuredCluster();
    return *c;
  }
  LocalCluster& cluster() { return *cluster_; }
  const TestCerts& certs() const { return certs_; }
  testing::TinyOracle& oracle() { return *oracle_; }

  ClientSecurity Client(const std::string& api_key) const {
    ClientSecurity s;
    s.channel = LoadPublicClientTls(true, certs_.ca, "", "", "").value();
    s.api_key = api_key;
    return s;
  }

 private:
  SecuredCluster() {
    oracle_ = std::make_unique<testing::TinyOracle>(ModelDir(), /*seed=*/7);
    absl::StatusOr<TestCerts> certs = TestCerts::Make(TmpDir() + "/pki");
    EXPECT_TRUE(certs.ok()) << certs.status();
    certs_ = *certs;
    const std::string keys = TmpDir() + "/api_keys";
    std::ofstream(keys) << "# clients\nalice:" << kAliceKey << "\nbob:bob-key-42\n";

    LocalClusterOptions o;
    o.model_dir = ModelDir();
    o.decode_slots = 4;
    const char* outputs = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR");
    o.log_dir = outputs != nullptr ? outputs : TmpDir();
    // Every process presents node.pem; workers are checked as "kl-worker"
    // though dialed by IP, as in a Kubernetes deployment.
    o.cluster_tls = {certs_.node, certs_.node_key, certs_.ca, "kl-worker"};
    o.tls_cert = certs_.node;
    o.tls_key = certs_.node_key;
    o.tls_ca = certs_.ca;
    o.api_keys_file = keys;
    cluster_ = std::make_unique<LocalCluster>(o);
    absl::Status s = cluster_->Start();
    EXPECT_TRUE(s.ok()) << s;
  }
  TestCerts certs_;
  std::unique_ptr<testing::TinyOracle> oracle_;
  std::unique_ptr<LocalCluster> cluster_;
};

v1::GenerateRequest Req(const std::string& prompt, int64_t max_tokens) {
  v1::GenerateRequest r;
  r.set_text(prompt);
  r.mutable_sampling()->set_temperature(0);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

// One Stats call to a worker over `security` (checked as "kl-worker").
grpc::Status WorkerStats(const std::string& address, bool decode, const ChannelSecurity& security) {
  std::shared_ptr<grpc::Channel> ch = security.Dial(address);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::WorkerStats stats;
  if (decode) return v1::Decode::NewStub(ch)->Stats(&ctx, v1::WorkerStatsRequest(), &stats);
  return v1::Prefill::NewStub(ch)->Stats(&ctx, v1::WorkerStatsRequest(), &stats);
}

TEST(SecurityTest, TlsClientWithKeyStreamsWhatTheEngineGenerates) {
  SecuredCluster& sc = SecuredCluster::Get();
  GenerationClient client(sc.cluster().router_address(), sc.Client(kAliceKey));
  const std::string prompt = "Once upon a time, over mutual TLS";
  StreamResult r = client.Generate(Req(prompt, 12), 60);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();

  EXPECT_EQ(r.tokens, sc.oracle().Greedy(prompt, 12, /*ignore_eos=*/true));
  EXPECT_EQ(r.finish, v1::FINISH_REASON_LENGTH);
}

TEST(SecurityTest, PublicApiRefusesMissingOrWrongKeysAndPlaintext) {
  SecuredCluster& sc = SecuredCluster::Get();
  const std::string router = sc.cluster().router_address();
  StreamResult none = GenerationClient(router, sc.Client("")).Generate(Req("hi", 2), 20);
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << none.status.error_message();
  StreamResult wrong =
      GenerationClient(router, sc.Client("alice-0123456789abcdeX")).Generate(Req("hi", 2), 20);
  EXPECT_EQ(wrong.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << wrong.status.error_message();

  ClientSecurity plain;  // the right key, but no TLS
  plain.api_key = kAliceKey;
  StreamResult p = GenerationClient(router, plain).Generate(Req("hi", 2), 20);
  EXPECT_EQ(p.status.error_code(), grpc::StatusCode::UNAVAILABLE) << p.status.error_message();

  ClientSecurity untrusting;  // TLS trusting another CA
  untrusting.channel = LoadPublicClientTls(true, sc.certs().other_ca, "", "", "").value();
  untrusting.api_key = kAliceKey;
  StreamResult u = GenerationClient(router, untrusting).Generate(Req("hi", 2), 20);
  EXPECT_EQ(u.status.error_code(), grpc::StatusCode::UNAVAILABLE) << u.status.error_message();

  // And bob's key works on the same router.
  StreamResult bob = GenerationClient(router, sc.Client("bob-key-42")).Generate(Req("hi", 3), 60);
  ASSERT_TRUE(bob.status.ok()) << bob.status.error_message();
  EXPECT_EQ(bob.tokens.size(), 3u);
}

TEST(SecurityTest, WorkersRefuseCallersWithoutTheClusterCertificate) {
  SecuredCluster& sc = SecuredCluster::Get();
  const TestCerts& c = sc.certs();
  const ChannelSecurity plaintext;
  const ChannelSecurity anonymous = LoadPublicClientTls(true, c.ca, "", "", "kl-worker").value();
  const ChannelSecurity foreign =
      LoadPublicClientTls(true, c.ca, c.other, c.other_key, "kl-worker").value();
  const ChannelSecurity member = LoadClusterTls({c.node, c.node_key, c.ca, "kl-worker"})->client;
  for (bool decode : {true, false}) {
    SCOPED_TRACE(decode ? "decode" : "prefill");
    const std::string addr =
        decode ? sc.cluster().decode_address(0) : sc.cluster().prefill_address(0);
    grpc::Status s = WorkerStats(addr, decode, plaintext);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
    s = WorkerStats(addr, decode, anonymous);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
    s = WorkerStats(addr, decode, foreign);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
    s = WorkerStats(addr, decode, member);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  // The router, holding the cluster certificate, still streams a full generation.
  StreamResult r = GenerationClient(sc.cluster().router_address(), sc.Client(kAliceKey))
                       .Generate(Req("after the probes", 6), 60);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 6u);
}

// Runs `cmd` (stderr folded into the output); returns the exit status.
int RunCapture(const std::string& cmd, std::string* out) {
  FILE* f = popen((cmd + " 2>&1").c_str(), "r");
  if (f == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out->append(buf, n);
  const int status = pclose(f);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(SecurityTest, UnreadableCertificateFlagStopsTheProcess) {
  SecuredCluster& sc = SecuredCluster::Get();
  const TestCerts& c = sc.certs();
  const std::string cluster_flags = " --cluster_cert=/nonexistent/node.pem --cluster_key=" +
                                    c.node_key + " --cluster_ca=" + c.ca + " --metrics_listen=";
  for (const std::string bin : {"services/decode/kl-decode", "services/prefill/kl-prefill"}) {
    std::string out;
    EXPECT_EQ(RunCapture(bin + " --model=" + ModelDir() + " --listen=127.0.0.1:0" + cluster_flags,
                         &out),
              2)
        << out;
    EXPECT_NE(out.find("--cluster_cert=/nonexistent/node.pem"), std::string::npos) << out;
  }
  std::string out;
  EXPECT_EQ(RunCapture("services/router/kl-router --model=" + ModelDir() +
                           " --listen=127.0.0.1:0 --prefill=127.0.0.1:1 --decode=127.0.0.1:1"
                           " --metrics_listen= --tls_cert=" + c.node + " --tls_key=/nonexistent/k",
                       &out),
            2)
      << out;
  EXPECT_NE(out.find("--tls_key=/nonexistent/k"), std::string::npos) << out;
  out.clear();
  EXPECT_EQ(RunCapture("services/router/kl-router --model=" + ModelDir() +
                           " --listen=127.0.0.1:0 --prefill=127.0.0.1:1 --decode=127.0.0.1:1"
                           " --metrics_listen= --api_keys_file=/nonexistent/keys",
                       &out),
            2)
      << out;
  EXPECT_NE(out.find("--api_keys_file=/nonexistent/keys"), std::string::npos) << out;
}

}  // namespace
}  // namespace kl
