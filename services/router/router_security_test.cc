// The router's public-API guards (docs/security.md) against fake workers:
// API keys (UNAUTHENTICATED, counted, never admitted), the request size limit
// (RESOURCE_EXHAUSTED, the server keeps serving) and the per-client stream
// limit (RESOURCE_EXHAUSTED for the extra stream, other clients unaffected,
// the slot released on finish, error, cancel and deadline).
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "proto/health.grpc.pb.h"
#include "services/common/metrics.h"
#include "services/router/api_keys.h"
#include "services/router/client_limiter.h"
#include "services/router/router_metrics.h"
#include "services/router/router_test_util.h"

namespace kl {
namespace {

constexpr char kKeys[] =
    "# test keys\n"
    "alice: alice-secret-1\n"
    "\n"
    "bob:bob-secret-2\n"
    "anonymous-key-3\n";

std::shared_ptr<const ApiKeys> TestKeys() {
  absl::StatusOr<ApiKeys> k = ApiKeys::Parse(kKeys, "test");
  EXPECT_TRUE(k.ok()) << k.status();
  return std::make_shared<const ApiKeys>(*std::move(k));
}

// A Generate call with optional metadata, to its end.
GenerateResult GenerateWith(RouterHarness& h, const v1::GenerateRequest& request,
                            const std::string& key, const std::string& value,
                            absl::Duration timeout = absl::Seconds(20)) {
  GenerateResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  if (!key.empty()) ctx.AddMetadata(key, value);
  auto reader = h.stub().Generate(&ctx, request);
  v1::GenerateResponse chunk;
  while (reader->Read(&chunk)) {
    for (int32_t t : chunk.token_ids()) r.tokens.push_back(t);
  }
  r.status = reader->Finish();
  return r;
}

GenerateResult Bearer(RouterHarness& h, const v1::GenerateRequest& request,
                      const std::string& api_key) {
  return GenerateWith(h, request, "authorization", "Bearer " + api_key);
}

// ---------------------------------------------------------------- API keys

TEST(ApiKeysTest, ParsesNamesCommentsAndRejectsBadFiles) {
  std::shared_ptr<const ApiKeys> keys = TestKeys();
  ASSERT_EQ(keys->size(), 3u);
  EXPECT_EQ(keys->AuthenticateKey("alice-secret-1").value(), "alice");
  EXPECT_EQ(keys->AuthenticateKey("bob-secret-2").value(), "bob");
  EXPECT_EQ(keys->AuthenticateKey("anonymous-key-3").value(), "key-5");
  EXPECT_EQ(keys->AuthenticateKey("alice-secret-").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(keys->AuthenticateKey("alice-secret-12").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(keys->AuthenticateKey("").status().code(), absl::StatusCode::kUnauthenticated);

  EXPECT_EQ(ApiKeys::Parse("# only a comment\n\n", "f").status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<ApiKeys> dup = ApiKeys::Parse("a:k1\nb:k1\n", "f");
  ASSERT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(dup.status().message().find("f:2"), std::string::npos) << dup.status();
  EXPECT_EQ(ApiKeys::Parse("a:\n", "f").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ApiKeys::Parse("a:k1\na:k2\n", "f").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ApiKeys::Load("/nonexistent/keys").status().code(), absl::StatusCode::kNotFound);
}

TEST(RouterAuthTest, GenerateNeedsAValidKey) {
  std::unique_ptr<Metrics> metrics = Metrics::Unserved();
  RouterMetrics m(metrics->registry());
  {
    RouterHarness h(1, 1);
    RouterOptions o = h.DefaultOptions();
    o.api_keys = TestKeys();
    o.metrics = &m;
    h.StartRouter(o);
    RegisterRouterCallbacks(*metrics, &h.service());
    const v1::GenerateRequest req = TokenRequest(/*seed=*/3, /*max_tokens=*/4);

    GenerateResult none = h.Generate(req);
    EXPECT_EQ(none.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_NE(none.status.error_message().find("missing API key"), std::string::npos)
        << none.status.error_message();
    EXPECT_EQ(Bearer(h, req, "wrong-key").status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(GenerateWith(h, req, "authorization", "Basic YWxpY2U6eA==").status.error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(GenerateWith(h, req, "x-api-key", "bob-secret-").status.error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    // Rejected calls never reached admission or a worker.
    RouterStats s = h.service().Stats();
    EXPECT_EQ(s.rejected_unauthenticated, 4);
    EXPECT_EQ(s.admitted, 0);
    EXPECT_EQ(h.prefill(0).prefill()->calls.load(), 0);

    GenerateResult ok = Bearer(h, req, "alice-secret-1");
    ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
    EXPECT_EQ(ok.tokens, ExpectedTokens(3, 4));
    GenerateResult ok2 = GenerateWith(h, req, "x-api-key", "anonymous-key-3");
    EXPECT_TRUE(ok2.status.ok()) << ok2.status.error_message();
    s = h.service().Stats();
    EXPECT_EQ(s.admitted, 2);
    EXPECT_EQ(s.rejected_unauthenticated, 4);

    // The other public RPCs are guarded too; health stays open.
    grpc::ClientContext tctx;
    v1::TokenizeRequest treq;
    treq.set_text("hi");
    v1::TokenizeResponse tresp;
    EXPECT_EQ(h.stub().Tokenize(&tctx, treq, &tresp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext tctx2;
    tctx2.AddMetadata("authorization", "bearer bob-secret-2");  // the scheme is case-insensitive
    EXPECT_TRUE(h.stub().Tokenize(&tctx2, treq, &tresp).ok());
    grpc::ClientContext mctx;
    v1::ModelInfoResponse mresp;
    EXPECT_EQ(h.stub().ModelInfo(&mctx, v1::ModelInfoRequest(), &mresp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    auto health = grpc::health::v1::Health::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(h.server().port), grpc::InsecureChannelCredentials()));
    grpc::ClientContext hctx;
    grpc::health::v1::HealthCheckResponse hresp;
    EXPECT_TRUE(health->Check(&hctx, grpc::health::v1::HealthCheckRequest(), &hresp).ok());

    const std::string text = metrics->Text();
    EXPECT_NE(text.find("kl_rejections_total{reason=\"unauthenticated\"} 6"), std::string::npos)
        << text;
    metrics->ClearCallbacks();
  }
}

// ---------------------------------------------------------------- size limit

TEST(RouterLimitsTest, OversizedRequestIsRefusedAndTheServerKeepsServing) {
  RouterHarness h(1, 1);
  ServerOptions so;
  so.max_receive_message_bytes = 64 << 10;
  h.StartRouter(h.DefaultOptions(), so);
  v1::GenerateRequest big;
  big.set_text(std::string(100 << 10, 'a'));
  big.mutable_sampling()->set_max_tokens(4);
  GenerateResult r = h.Generate(big);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << r.status.error_message();
  EXPECT_EQ(h.service().Stats().admitted, 0);
  // Same channel, same server: an ordinary request still works.
  GenerateResult ok = h.Generate(TokenRequest(5, 4));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens, ExpectedTokens(5, 4));
}

// ---------------------------------------------------------------- per-client limit

// One stream held open: the fake prefill hangs until the call is cancelled.
struct HeldStream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
};

std::unique_ptr<HeldStream> Hold(RouterHarness& h, const std::string& api_key,
                                 absl::Duration deadline = absl::Seconds(30)) {
  auto s = std::make_unique<HeldStream>();
  s->ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  if (!api_key.empty()) s->ctx.AddMetadata("x-api-key", api_key);
  s->reader = h.stub().Generate(&s->ctx, TokenRequest(9, 4));
  return s;
}

class ClientLimitTest : public ::testing::Test {
 protected:
  void StartRouter(bool with_keys) {
    RouterOptions o = h_.DefaultOptions();
    if (with_keys) o.api_keys = TestKeys();
    o.max_concurrent_per_client = 1;
    o.retries = 0;
    h_.StartRouter(o);
  }
  // Holds alice's one allowed stream (in a hung prefill); returns it.
  std::unique_ptr<HeldStream> HoldOne(const std::string& key, absl::Duration deadline) {
    const int before = h_.prefill(0).prefill()->calls.load();
    h_.prefill(0).prefill()->hang = true;
    std::unique_ptr<HeldStream> s = Hold(h_, key, deadline);
    EXPECT_TRUE(PollUntil([&] { return h_.prefill(0).prefill()->calls.load() == before + 1; }));
    // Later prefills run normally; the held one stays hung until cancelled.
    h_.prefill(0).prefill()->hang = false;
    EXPECT_EQ(h_.service().Stats().client_streams, 1);
    return s;
  }
  bool SlotsFree() {
    return PollUntil([&] { return h_.service().Stats().client_streams == 0; });
  }
  RouterHarness h_{1, 1};
};

TEST_F(ClientLimitTest, ExtraStreamIsRefusedOthersUnaffectedSlotFreedOnCancel) {
  StartRouter(/*with_keys=*/true);
  std::unique_ptr<HeldStream> held = HoldOne("alice-secret-1", absl::Seconds(30));

  GenerateResult extra = GenerateWith(h_, TokenRequest(1, 4), "x-api-key", "alice-secret-1");
  EXPECT_EQ(extra.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(extra.status.error_message().find("client alice"), std::string::npos)
      << extra.status.error_message();
  EXPECT_EQ(h_.service().Stats().rejected_client_limit, 1);

  GenerateResult bob = Bearer(h_, TokenRequest(2, 4), "bob-secret-2");
  ASSERT_TRUE(bob.status.ok()) << bob.status.error_message();
  EXPECT_EQ(bob.tokens, ExpectedTokens(2, 4));
  EXPECT_EQ(h_.service().Stats().client_streams, 1);  // bob's slot already returned

  held->ctx.TryCancel();
  EXPECT_EQ(held->reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(SlotsFree());
  GenerateResult again = Bearer(h_, TokenRequest(4, 4), "alice-secret-1");
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.tokens, ExpectedTokens(4, 4));
  EXPECT_EQ(h_.service().client_limiter().InUse("alice"), 0);
  EXPECT_TRUE(SlotsFree());
}

TEST_F(ClientLimitTest, SlotFreedOnDeadlineAndOnError) {
  StartRouter(/*with_keys=*/true);
  // Deadline: the held stream runs out of time.
  // Long enough to reach the hung prefill on a loaded machine, short enough to wait out.
  std::unique_ptr<HeldStream> held = HoldOne("alice-secret-1", absl::Seconds(2));
  EXPECT_EQ(held->reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(SlotsFree());

  // Error: the prefill fails and no retry is left.
  h_.prefill(0).prefill()->fail_code = grpc::StatusCode::INTERNAL;
  h_.prefill(0).prefill()->fail_next = 1;
  GenerateResult failed = Bearer(h_, TokenRequest(6, 4), "alice-secret-1");
  EXPECT_FALSE(failed.status.ok());
  EXPECT_NE(failed.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << failed.status.error_message();
  EXPECT_TRUE(SlotsFree());

  // Finish: back-to-back requests at the limit never trip it.
  for (int i = 0; i < 5; ++i) {
    GenerateResult ok = Bearer(h_, TokenRequest(10 + i, 3), "alice-secret-1");
    ASSERT_TRUE(ok.status.ok()) << i << ": " << ok.status.error_message();
  }
  EXPECT_EQ(h_.service().Stats().rejected_client_limit, 0);
  EXPECT_TRUE(SlotsFree());
}

TEST_F(ClientLimitTest, WithoutKeysTheClientIsThePeerAddress) {
  StartRouter(/*with_keys=*/false);
  std::unique_ptr<HeldStream> held = HoldOne("", absl::Seconds(30));
  // Another connection from the same host counts against the same budget.
  auto other = v1::Generation::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(h_.server().port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  auto reader = other->Generate(&ctx, TokenRequest(1, 4));
  v1::GenerateResponse chunk;
  while (reader->Read(&chunk)) {
  }
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("ipv4:127.0.0.1 "), std::string::npos) << s.error_message();
  held->ctx.TryCancel();
  held->reader->Finish();
  EXPECT_TRUE(SlotsFree());
}

TEST(PeerClientKeyTest, DropsThePort) {
  EXPECT_EQ(PeerClientKey("ipv4:10.0.0.7:53211"), "ipv4:10.0.0.7");
  EXPECT_EQ(PeerClientKey("ipv6:[::1]:4000"), "ipv6:[::1]");
  EXPECT_EQ(PeerClientKey("unix:/tmp/sock"), "unix:/tmp/sock");
}

}  // namespace
}  // namespace kl
