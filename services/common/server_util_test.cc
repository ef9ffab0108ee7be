#include "services/common/server_util.h"

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "proto/health.grpc.pb.h"

namespace kl {
namespace {

TEST(StartServer, BindsAFreePortWhenGivenPortZeroAndServesHealth) {
  absl::StatusOr<RunningServer> s = StartServer(ServerOptions{}, {});
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_GT(s->port, 0);
  s->SetServing(true);
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", s->port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckResponse resp;
  ASSERT_TRUE(stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &resp).ok());
  EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  s->server->Shutdown();
}

// gRPC's default (SO_REUSEPORT on) would let a second server bind the same
// port and take some of the first one's connections without a word.
TEST(StartServer, APortAnotherServerHoldsIsRefused) {
  absl::StatusOr<RunningServer> first = StartServer(ServerOptions{}, {});
  ASSERT_TRUE(first.ok()) << first.status();
  ServerOptions again;
  again.address = absl::StrCat("127.0.0.1:", first->port);
  absl::StatusOr<RunningServer> second = StartServer(again, {});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
  EXPECT_NE(second.status().message().find(again.address), std::string::npos);
  first->server->Shutdown();
  // Once the first is gone the port can be served again.
  absl::StatusOr<RunningServer> third = StartServer(again, {});
  EXPECT_TRUE(third.ok()) << third.status();
  if (third.ok()) third->server->Shutdown();
}

}  // namespace
}  // namespace kl
