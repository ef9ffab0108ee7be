// tls.h: flag-file errors, and real handshakes against in-process servers
// with throwaway certificates (tools/certs/gen_test_certs.sh): the cluster's
// mutual TLS refuses callers without a cluster certificate, the public API's
// TLS refuses clients that do not trust its CA.
#include "services/common/tls.h"

#include <sys/stat.h>

#include <cstdlib>
#include <fstream>

#include "gtest/gtest.h"
#include "proto/health.grpc.pb.h"
#include "services/common/server_util.h"
#include "tools/certs/test_certs.h"

namespace kl {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

const TestCerts& Certs() {
  static const TestCerts* certs = [] {
    absl::StatusOr<TestCerts> c = TestCerts::Make(std::string(std::getenv("TEST_TMPDIR")) + "/pki");
    EXPECT_TRUE(c.ok()) << c.status();
    return new TestCerts(c.ok() ? *c : TestCerts{});
  }();
  return *certs;
}

// A server with only grpc.health.v1 (SERVING) and `credentials`.
RunningServer Serve(std::shared_ptr<grpc::ServerCredentials> credentials) {
  ServerOptions o;
  o.credentials = std::move(credentials);
  absl::StatusOr<RunningServer> s = StartServer(o, {});
  EXPECT_TRUE(s.ok()) << s.status();
  s->SetServing(true);
  return *std::move(s);
}

// One health Check over `security` (fresh channel, 5 s deadline).
grpc::Status Check(const RunningServer& server, const ChannelSecurity& security,
                   const std::string& host = "127.0.0.1") {
  auto stub = Health::NewStub(security.Dial(host + ":" + std::to_string(server.port)));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, HealthCheckRequest(), &resp);
  if (s.ok()) {
    EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING);
  }
  return s;
}

ClusterTls Cluster(const std::string& cert, const std::string& key, const std::string& ca,
                   const std::string& server_name = "") {
  absl::StatusOr<ClusterTls> t = LoadClusterTls({cert, key, ca, server_name});
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : ClusterTls{};
}

// A TLS client trusting `ca` but presenting no certificate.
ChannelSecurity NoClientCert(const std::string& ca, const std::string& server_name = "") {
  absl::StatusOr<ChannelSecurity> s = LoadPublicClientTls(true, ca, "", "", server_name);
  EXPECT_TRUE(s.ok()) << s.status();
  return *s;
}

TEST(ReadPemFileTest, MissingFileNamesFlagAndPath) {
  absl::StatusOr<std::string> r = ReadPemFile("cluster_cert", "/nonexistent/cert.pem");
  ASSERT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("--cluster_cert=/nonexistent/cert.pem"), std::string::npos)
      << r.status();
}

TEST(ReadPemFileTest, NotPem) {
  const std::string path = std::string(std::getenv("TEST_TMPDIR")) + "/garbage.pem";
  std::ofstream(path) << "not a certificate\n";
  absl::StatusOr<std::string> r = ReadPemFile("tls_cert", path);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("--tls_cert="), std::string::npos) << r.status();
  EXPECT_TRUE(ReadPemFile("tls_cert", Certs().node).ok());
}

TEST(LoadClusterTlsTest, NoneIsPlaintextPartialIsAnError) {
  absl::StatusOr<ClusterTls> none = LoadClusterTls({});
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->enabled());
  EXPECT_FALSE(none->client.tls());

  absl::StatusOr<ClusterTls> partial = LoadClusterTls({Certs().node, "", Certs().ca, ""});
  ASSERT_EQ(partial.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(partial.status().message().find("--cluster_key"), std::string::npos)
      << partial.status();

  absl::StatusOr<ClusterTls> missing =
      LoadClusterTls({Certs().node, Certs().node_key, "/nonexistent/ca.pem", ""});
  ASSERT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("--cluster_ca=/nonexistent/ca.pem"),
            std::string::npos);

  EXPECT_EQ(LoadPublicServerTls("", "", Certs().ca).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadPublicServerTls(Certs().node, "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ClusterTlsTest, WorkerRequiresAClusterCertificate) {
  const ClusterTls worker = Cluster(Certs().node, Certs().node_key, Certs().ca);
  RunningServer server = Serve(worker.server);

  // The router / prefill side: its cluster certificate, verified both ways.
  EXPECT_TRUE(Check(server, worker.client).ok());

  // Plaintext: the handshake never happens.
  grpc::Status plain = Check(server, ChannelSecurity{});
  EXPECT_EQ(plain.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.error_message();

  // TLS that trusts the worker but presents no client certificate.
  grpc::Status anonymous = Check(server, NoClientCert(Certs().ca));
  EXPECT_EQ(anonymous.error_code(), grpc::StatusCode::UNAVAILABLE) << anonymous.error_message();

  // A certificate from another CA (trusting the worker's CA, so only the
  // worker's check of the client certificate can refuse it).
  absl::StatusOr<ChannelSecurity> impostor =
      LoadPublicClientTls(true, Certs().ca, Certs().other, Certs().other_key, "");
  ASSERT_TRUE(impostor.ok()) << impostor.status();
  grpc::Status foreign = Check(server, *impostor);
  EXPECT_EQ(foreign.error_code(), grpc::StatusCode::UNAVAILABLE) << foreign.error_message();

  // The server still serves the legitimate caller afterwards.
  EXPECT_TRUE(Check(server, worker.client).ok());
  server.server->Shutdown();
}

TEST(ClusterTlsTest, DialerRefusesAWorkerFromAnotherCa) {
  // A "worker" whose certificate the cluster CA did not sign.
  const ClusterTls fake = Cluster(Certs().other, Certs().other_key, Certs().ca);
  RunningServer server = Serve(fake.server);
  const ClusterTls router = Cluster(Certs().node, Certs().node_key, Certs().ca);
  grpc::Status s = Check(server, router.client);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  server.server->Shutdown();
}

TEST(ClusterTlsTest, ServerNameOverrideChecksTheSharedWorkerName) {
  const ClusterTls worker = Cluster(Certs().node, Certs().node_key, Certs().ca);
  RunningServer server = Serve(worker.server);
  // Dialed as "localhost" (in the SANs) but checked as kl-worker: accepted.
  EXPECT_TRUE(Check(server, Cluster(Certs().node, Certs().node_key, Certs().ca, "kl-worker").client,
                    "localhost")
                  .ok());
  // A name the certificate does not carry: refused.
  grpc::Status s =
      Check(server, Cluster(Certs().node, Certs().node_key, Certs().ca, "kl-elsewhere").client);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  server.server->Shutdown();
}

TEST(PublicTlsTest, ClientsMustTrustTheCa) {
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds =
      LoadPublicServerTls(Certs().node, Certs().node_key, "");
  ASSERT_TRUE(creds.ok()) << creds.status();
  RunningServer server = Serve(*creds);
  EXPECT_TRUE(Check(server, NoClientCert(Certs().ca)).ok());
  // Trusting another CA, or plaintext: refused.
  grpc::Status wrong_ca = Check(server, NoClientCert(Certs().other_ca));
  EXPECT_EQ(wrong_ca.error_code(), grpc::StatusCode::UNAVAILABLE) << wrong_ca.error_message();
  grpc::Status plain = Check(server, ChannelSecurity{});
  EXPECT_EQ(plain.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.error_message();
  server.server->Shutdown();
}

TEST(PublicTlsTest, OptionalClientCertificates) {
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds =
      LoadPublicServerTls(Certs().node, Certs().node_key, Certs().ca);
  ASSERT_TRUE(creds.ok()) << creds.status();
  RunningServer server = Serve(*creds);
  absl::StatusOr<ChannelSecurity> with_cert =
      LoadPublicClientTls(true, Certs().ca, Certs().client, Certs().client_key, "");
  ASSERT_TRUE(with_cert.ok()) << with_cert.status();
  EXPECT_TRUE(Check(server, *with_cert).ok());
  grpc::Status without = Check(server, NoClientCert(Certs().ca));
  EXPECT_EQ(without.error_code(), grpc::StatusCode::UNAVAILABLE) << without.error_message();
  server.server->Shutdown();
}

}  // namespace
}  // namespace kl
