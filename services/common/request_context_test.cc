#include "services/common/request_context.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>

#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "engine/common/log.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

TEST(CheckRequestId, AcceptsEmptyAndPrintableUpToTheLimit) {
  EXPECT_TRUE(CheckRequestId("").ok());
  EXPECT_TRUE(CheckRequestId("r-0123456789abcdef").ok());
  EXPECT_TRUE(CheckRequestId(std::string(kRequestIdMaxBytes, '~')).ok());
}

TEST(CheckRequestId, RefusesLongAndNonPrintable) {
  absl::Status s = CheckRequestId(std::string(kRequestIdMaxBytes + 1, 'a'));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("129 bytes"), std::string::npos) << s;
  s = CheckRequestId("abc\ndef");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("0x0a at offset 3"), std::string::npos) << s;
  EXPECT_FALSE(CheckRequestId(std::string("a\0b", 3)).ok());
  EXPECT_FALSE(CheckRequestId("caf\xc3\xa9").ok());
}

// A server that answers every method with what RequestIdFromMetadata read,
// through a real gRPC call: the helpers must agree with gRPC's metadata.
class IdEcho final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    class Done final : public grpc::ServerGenericBidiReactor {
      void OnDone() override { delete this; }
    };
    auto* r = new Done();
    absl::StatusOr<std::string> id = RequestIdFromMetadata(*ctx);
    {
      absl::MutexLock l(&mu_);
      seen_ = id.ok() ? *id : "<invalid>";
      lenient_ = RequestIdOf(*ctx);
    }
    r->Finish(id.ok() ? grpc::Status::OK
                      : grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                     std::string(id.status().message())));
    return r;
  }
  std::string seen() {
    absl::MutexLock l(&mu_);
    return seen_;
  }
  std::string lenient() {
    absl::MutexLock l(&mu_);
    return lenient_;
  }

 private:
  absl::Mutex mu_;
  std::string seen_ ABSL_GUARDED_BY(mu_), lenient_ ABSL_GUARDED_BY(mu_);
};

class RequestContextTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterCallbackGenericService(&echo_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                   grpc::InsecureChannelCredentials());
  }
  void TearDown() override { server_->Shutdown(); }

  // One unary call with `id` attached (or none for nullptr).
  grpc::Status Call(const char* id) {
    grpc::GenericStub stub(channel_);
    grpc::ClientContext ctx;
    if (id != nullptr) AttachRequestId(&ctx, id);
    grpc::CompletionQueue cq;
    grpc::ByteBuffer request, response;
    auto call = stub.PrepareUnaryCall(&ctx, "/kl.test.Echo/Call", request, &cq);
    call->StartCall();
    grpc::Status status;
    call->Finish(&response, &status, reinterpret_cast<void*>(1));
    void* tag = nullptr;
    bool ok = false;
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_TRUE(ok);
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
    return status;
  }

  IdEcho echo_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(RequestContextTest, AnAttachedIdIsReadBack) {
  ASSERT_TRUE(Call("client-req-42").ok());
  EXPECT_EQ(echo_.seen(), "client-req-42");
  EXPECT_EQ(echo_.lenient(), "client-req-42");
}

TEST_F(RequestContextTest, NoIdReadsEmpty) {
  ASSERT_TRUE(Call(nullptr).ok());
  EXPECT_EQ(echo_.seen(), "");
  ASSERT_TRUE(Call("").ok());  // AttachRequestId adds nothing for ""
  EXPECT_EQ(echo_.seen(), "");
}

TEST_F(RequestContextTest, AnOversizedIdIsInvalidAndWorkersIgnoreIt) {
  const std::string big(300, 'x');
  grpc::Status s = Call(big.c_str());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("x-request-id metadata is 300 bytes"), std::string::npos)
      << s.error_message();
  EXPECT_EQ(echo_.seen(), "<invalid>");
  EXPECT_EQ(echo_.lenient(), "");  // what a worker logs: nothing rather than garbage
}

TEST(ScopedRequestId, NestsAndRestores) {
  EXPECT_EQ(CurrentRequestId(), "");
  {
    ScopedRequestId a("outer");
    EXPECT_EQ(CurrentRequestId(), "outer");
    {
      ScopedRequestId b("inner");
      EXPECT_EQ(CurrentRequestId(), "inner");
    }
    EXPECT_EQ(CurrentRequestId(), "outer");
  }
  EXPECT_EQ(CurrentRequestId(), "");
}

}  // namespace
}  // namespace kl
