// RouterService at its edges: validation (INVALID_ARGUMENT naming the field),
// bounded admission, no ready worker, incompatible workers, Tokenize and
// ModelInfo, drain, and concurrent picks on a real WorkerPool.
#include "services/router/router_service.h"

#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/common/metrics.h"
#include "services/router/router_metrics.h"
#include "services/router/router_test_util.h"

namespace kl {
namespace {

class RouterServiceTest : public ::testing::Test {
 protected:
  RouterHarness h_{1, 1};
};

// Every bad request names its field and reaches no worker.
TEST_F(RouterServiceTest, ValidationErrorsNameTheField) {
  h_.StartRouter();
  struct Case {
    const char* name;
    std::function<void(v1::GenerateRequest*)> mutate;
    const char* field;
  };
  const std::vector<Case> cases = {
      {"no prompt", [](v1::GenerateRequest* r) { r->clear_prompt(); }, "prompt"},
      {"empty text", [](v1::GenerateRequest* r) { r->set_text(""); }, "prompt.text"},
      {"empty ids", [](v1::GenerateRequest* r) { r->mutable_token_ids()->clear_ids(); },
       "prompt.token_ids"},
      {"unknown id", [](v1::GenerateRequest* r) { r->mutable_token_ids()->add_ids(1 << 20); },
       "prompt.token_ids[5]"},
      {"negative id", [](v1::GenerateRequest* r) { r->mutable_token_ids()->set_ids(0, -1); },
       "prompt.token_ids[0]"},
      {"prompt too long",
       [](v1::GenerateRequest* r) {
         for (int i = 0; i < 600; ++i) r->mutable_token_ids()->add_ids(97);
       },
       "prompt.token_ids"},
      {"long text",
       [](v1::GenerateRequest* r) {
         std::string text;
         for (int i = 0; i < 600; ++i) text += "a, ";  // >= 2 tokens per repeat
         r->set_text(text);
       },
       "prompt.text"},
      {"empty chat", [](v1::GenerateRequest* r) { r->mutable_chat(); }, "prompt.chat.messages"},
      {"bad role",
       [](v1::GenerateRequest* r) {
         auto* m = r->mutable_chat()->add_messages();
         m->set_role("robot");
         m->set_content("hi");
       },
       "prompt.chat.messages[0].role"},
      {"temperature", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_temperature(-1); },
       "sampling.temperature"},
      {"top_p", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_p(1.5); },
       "sampling.top_p"},
      {"top_k", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_top_k(-3); },
       "sampling.top_k"},
      {"max_tokens 0", [](v1::GenerateRequest* r) { r->mutable_sampling()->set_max_tokens(0); },
       "sampling.max_tokens"},
      {"max_tokens big",
       [](v1::GenerateRequest* r) { r->mutable_sampling()->set_max_tokens(1025); },
       "sampling.max_tokens"},
      {"stop id", [](v1::GenerateRequest* r) { r->mutable_sampling()->add_stop_token_ids(-2); },
       "sampling.stop_token_ids"},
      {"empty stop", [](v1::GenerateRequest* r) { r->mutable_sampling()->add_stop(""); },
       "sampling.stop"},
      {"long id", [](v1::GenerateRequest* r) { r->set_request_id(std::string(129, 'a')); },
       "request_id"},
      {"nonprintable id", [](v1::GenerateRequest* r) { r->set_request_id("abc\n"); },
       "request_id"},
  };
  for (const Case& c : cases) {
    v1::GenerateRequest r = TokenRequest(1, 4);
    c.mutate(&r);
    GenerateResult g = h_.Generate(r);
    EXPECT_EQ(g.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_TRUE(absl::StartsWith(g.status.error_message(), c.field))
        << c.name << ": " << g.status.error_message();
    EXPECT_TRUE(g.chunks.empty()) << c.name;
  }
  EXPECT_EQ(h_.decode(0).decode()->reserves, 0);
  EXPECT_EQ(h_.prefill(0).prefill()->calls, 0);
}

TEST_F(RouterServiceTest, TextAndChatPromptsAreTokenized) {
  h_.StartRouter();
  v1::GenerateRequest text = TokenRequest(3, 4);
  text.set_text("Hello, world");
  GenerateResult g = h_.Generate(text);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  const std::vector<int32_t> ids = TinyModel()->tokenizer().Encode("Hello, world", false);
  EXPECT_EQ(g.chunks.back().usage().prompt_tokens(), static_cast<int64_t>(ids.size()));

  v1::GenerateRequest chat = TokenRequest(3, 4);
  auto* m = chat.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content("Hello");
  g = h_.Generate(chat);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, ExpectedTokens(3, 4));
}

TEST_F(RouterServiceTest, TokenizeAndModelInfo) {
  h_.StartRouter();
  grpc::ClientContext c1;
  v1::TokenizeRequest tr;
  tr.set_text("Hello there");
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(h_.stub().Tokenize(&c1, tr, &tresp).ok());
  const std::vector<int32_t> want = TinyModel()->tokenizer().Encode("Hello there", false);
  EXPECT_EQ(std::vector<int32_t>(tresp.token_ids().begin(), tresp.token_ids().end()), want);

  grpc::ClientContext c2;
  v1::TokenizeRequest empty;
  EXPECT_EQ(h_.stub().Tokenize(&c2, empty, &tresp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  grpc::ClientContext c3;
  v1::ModelInfoResponse info;
  ASSERT_TRUE(h_.stub().ModelInfo(&c3, v1::ModelInfoRequest(), &info).ok());
  const ModelConfig& cfg = TinyModel()->config();
  EXPECT_EQ(info.model_type(), "kimi_linear");
  EXPECT_EQ(info.vocab_size(), cfg.vocab_size);
  EXPECT_EQ(info.num_layers(), cfg.num_hidden_layers);
  EXPECT_EQ(info.num_kda_layers() + info.num_mla_layers(), cfg.num_hidden_layers);
  EXPECT_EQ(info.max_prompt_tokens(), 512);
  EXPECT_EQ(info.max_tokens_limit(), 1024);
  EXPECT_EQ(info.default_max_tokens(), 16);
  EXPECT_EQ(info.eos_token_id(), cfg.eos_token_id);
  EXPECT_EQ(info.state_fingerprint(), FormatFingerprint(StateFingerprint(cfg)));
}

// max_inflight 1, max_queue 1: one request hangs in prefill, one waits, the
// third is refused at once.
TEST_F(RouterServiceTest, FullQueueRejectsFast) {
  RouterOptions o = h_.DefaultOptions();
  o.max_inflight = 1;
  o.max_queue = 1;
  h_.StartRouter(o);
  h_.prefill(0).prefill()->hang = true;
  grpc::ClientContext running_ctx, queued_ctx;
  auto running = h_.stub().Generate(&running_ctx, TokenRequest(1, 4));
  ASSERT_TRUE(PollUntil([&] { return h_.service().Stats().in_flight == 1; }));
  // In flight counts from placement on; the cancel below must find the call hung in the
  // prefill worker (else it ends during placement and the worker never sees it).
  ASSERT_TRUE(PollUntil([&] { return h_.prefill(0).prefill()->calls.load() == 1; }));
  auto queued = h_.stub().Generate(&queued_ctx, TokenRequest(1, 4));
  ASSERT_TRUE(PollUntil([&] { return h_.service().Stats().queue_depth == 1; }));

  GenerateResult refused = h_.Generate(TokenRequest(1, 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  // At once, not after a wait for a place (which never comes while the first
  // request hangs); the bound leaves room for a loaded machine under ASan.
  EXPECT_LT(refused.seconds, 1.0);
  EXPECT_EQ(h_.service().Stats().rejected_full, 1);

  running_ctx.TryCancel();
  queued_ctx.TryCancel();
  v1::GenerateResponse ignored;
  while (running->Read(&ignored)) {
  }
  while (queued->Read(&ignored)) {
  }
  EXPECT_EQ(running->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(queued->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(PollUntil([&] {
    RouterStats s = h_.service().Stats();
    return s.in_flight == 0 && s.queue_depth == 0 && s.cancelled == 2;
  }));
  EXPECT_TRUE(PollUntil([&] { return h_.prefill(0).prefill()->hang_cancelled >= 1; }));
  // The hung request's lease was released.
  EXPECT_TRUE(PollUntil([&] { return h_.decode(0).decode()->active_leases() == 0; }));
}

TEST_F(RouterServiceTest, NoReadyWorkerIsUnavailable) {
  RouterOptions o = h_.DefaultOptions();
  o.decode.addresses = {"127.0.0.1:1"};  // nothing listens there
  h_.StartRouter(o);
  GenerateResult g = h_.Generate(TokenRequest(1, 4));
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(g.status.error_message(), "no ready decode worker"))
      << g.status.error_message();
  EXPECT_EQ(h_.prefill(0).prefill()->calls, 0);
}

TEST_F(RouterServiceTest, EmptyPoolIsUnavailable) {
  RouterOptions o = h_.DefaultOptions();
  o.prefill.addresses.clear();
  h_.StartRouter(o);
  GenerateResult g = h_.Generate(TokenRequest(1, 4));
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(g.status.error_message(), "prefill")) << g.status.error_message();
  // The lease reserved before the prefill pick failed is released.
  EXPECT_TRUE(PollUntil([&] { return h_.decode(0).decode()->releases == 1; }));
  EXPECT_EQ(h_.decode(0).decode()->active_leases(), 0);
}

TEST_F(RouterServiceTest, WorkersOfAnotherModelAreRefused) {
  h_.decode(0).decode()->state_fingerprint = "0xdeadbeef";
  h_.StartRouter();
  GenerateResult g = h_.Generate(TokenRequest(1, 4));
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
      << g.status.error_message();
  EXPECT_EQ(h_.decode(0).decode()->reserves, 0);
}

TEST_F(RouterServiceTest, WorkersOfTheSameModelAreAccepted) {
  // The decode worker writes "0x%016x"; any case or without "0x" matches too.
  const uint64_t fp = StateFingerprint(TinyModel()->config());
  h_.decode(0).decode()->state_fingerprint = FormatFingerprint(fp);
  h_.StartRouter();
  GenerateResult g = h_.Generate(TokenRequest(1, 4));
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  uint64_t parsed = 0;
  EXPECT_TRUE(ParseFingerprint(absl::AsciiStrToUpper(FormatFingerprint(fp)), &parsed));
  EXPECT_EQ(parsed, fp);
  EXPECT_FALSE(ParseFingerprint("0x", &parsed));
  EXPECT_FALSE(ParseFingerprint("xyz", &parsed));
}

TEST_F(RouterServiceTest, DrainRefusesNewAndFinishesRunning) {
  h_.StartRouter();
  h_.decode(0).decode()->token_delay_ms = 20;
  GenerateResult running;
  std::thread t([&] { running = h_.Generate(TokenRequest(5, 10)); });
  ASSERT_TRUE(PollUntil([&] { return h_.decode(0).decode()->streamed >= 1; }));
  h_.service().StartDrain();
  h_.server().SetServing(false);
  GenerateResult refused = h_.Generate(TokenRequest(5, 10));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(h_.service().Drain(absl::Seconds(10)));
  t.join();
  ASSERT_TRUE(running.status.ok()) << running.status.error_message();
  EXPECT_EQ(running.tokens, ExpectedTokens(5, 10));
  EXPECT_EQ(h_.service().Stats().rejected_draining, 1);
}

TEST_F(RouterServiceTest, DrainCancelsWhatOutlivesTheGrace) {
  h_.StartRouter();
  h_.decode(0).decode()->token_delay_ms = 50;
  GenerateResult running;
  std::thread t([&] { running = h_.Generate(TokenRequest(5, 500)); });
  ASSERT_TRUE(PollUntil([&] { return h_.decode(0).decode()->streamed >= 1; }));
  EXPECT_FALSE(h_.service().Drain(absl::Milliseconds(100)));
  t.join();
  EXPECT_EQ(running.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(PollUntil([&] { return h_.decode(0).decode()->active_leases() == 0; }));
}

TEST_F(RouterServiceTest, RequestIdIsEchoedAndPropagated) {
  h_.StartRouter();
  v1::GenerateRequest r = TokenRequest(2, 3);
  r.set_request_id("client-req-7");
  GenerateResult g = h_.Generate(r);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  for (const auto& c : g.chunks) EXPECT_EQ(c.request_id(), "client-req-7");
  for (const std::string& id : h_.prefill(0).prefill()->seen_request_ids()) {
    EXPECT_EQ(id, "client-req-7");
  }
  std::vector<std::string> decode_ids = h_.decode(0).decode()->seen_request_ids();
  EXPECT_GE(decode_ids.size(), 2u);  // Reserve + Decode
  for (const std::string& id : decode_ids) EXPECT_EQ(id, "client-req-7");

  EXPECT_EQ(g.request_id, "client-req-7");  // initial metadata

  g = h_.Generate(TokenRequest(2, 3));  // no id: one is generated
  ASSERT_TRUE(g.status.ok());
  EXPECT_TRUE(absl::StartsWith(g.chunks[0].request_id(), "r-")) << g.chunks[0].request_id();
  EXPECT_EQ(g.request_id, g.chunks[0].request_id());
}

TEST_F(RouterServiceTest, RequestIdFromMetadataIsUsedEchoedAndPropagated) {
  h_.StartRouter();
  GenerateResult g = h_.Generate(TokenRequest(2, 3), absl::Seconds(20), "md-req-9");
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.request_id, "md-req-9");
  for (const auto& c : g.chunks) EXPECT_EQ(c.request_id(), "md-req-9");
  std::vector<std::string> ids = h_.prefill(0).prefill()->seen_request_ids();
  ASSERT_FALSE(ids.empty());
  for (const std::string& id : ids) EXPECT_EQ(id, "md-req-9");
  ids = h_.decode(0).decode()->seen_request_ids();
  EXPECT_GE(ids.size(), 2u);  // Reserve + Decode
  for (const std::string& id : ids) EXPECT_EQ(id, "md-req-9");
}

TEST_F(RouterServiceTest, InvalidMetadataRequestIdIsRefusedWithAFreshIdEchoed) {
  h_.StartRouter();
  GenerateResult g = h_.Generate(TokenRequest(2, 3), absl::Seconds(20), std::string(200, 'z'));
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(g.status.error_message().find("x-request-id metadata is 200 bytes"),
            std::string::npos)
      << g.status.error_message();
  EXPECT_TRUE(absl::StartsWith(g.request_id, "r-")) << g.request_id;
  EXPECT_TRUE(h_.prefill(0).prefill()->seen_request_ids().empty());
}

// Picks from many threads at once reserve load atomically: a burst spreads
// evenly over equally loaded workers.
// With metrics on, outcomes land in their families (README "Metrics").
TEST(RouterMetricsTest, OutcomesAreCounted) {
  std::unique_ptr<Metrics> metrics = Metrics::Unserved();
  RouterMetrics m(metrics->registry());
  RouterHarness h(1, 1);  // destroyed before the metrics
  RouterOptions o = h.DefaultOptions();
  o.metrics = &m;
  h.StartRouter(o);
  RegisterRouterCallbacks(*metrics, &h.service());

  GenerateResult ok = h.Generate(TokenRequest(1, 4));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  v1::GenerateRequest bad = TokenRequest(1, 4);
  bad.mutable_sampling()->set_temperature(-1);
  EXPECT_EQ(h.Generate(bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  h.prefill(0).prefill()->fail_code = grpc::StatusCode::OUT_OF_RANGE;  // not retried
  h.prefill(0).prefill()->fail_next = 1;
  EXPECT_EQ(h.Generate(TokenRequest(2, 4)).status.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  // The client sees the status before the driver thread returns its slot.
  EXPECT_TRUE(PollUntil([&] { return h.service().Stats().in_flight == 0; }));

  const std::string t = metrics->Text();
  auto has = [&t](const std::string& line) {
    EXPECT_TRUE(absl::StrContains(t, "\n" + line + "\n")) << line << "\n" << t;
  };
  has("kl_generation_tokens_total " + std::to_string(ok.tokens.size()));
  has("kl_request_success_total{finished_reason=\"length\"} 1");
  has("kl_request_failure_total{code=\"OUT_OF_RANGE\"} 1");
  has("kl_rejections_total{reason=\"invalid\"} 1");
  has("kl_time_to_first_token_seconds_count 1");
  has("kl_e2e_request_latency_seconds_count 2");  // admitted: the good one and the failed one
  has("kl_request_queue_time_seconds_count 2");
  has("kl_time_per_output_token_seconds_count 1");
  has("kl_num_requests_running{stage=\"router\"} 0");
  has("kl_retries_total 0");
  metrics->ClearCallbacks();
}

TEST(WorkerPoolTest, ConcurrentPicksSpread) {
  std::vector<std::unique_ptr<FakeWorkerServer>> workers;
  WorkerPoolOptions o;
  o.role = WorkerRole::kDecode;
  o.health_interval = absl::Hours(1);  // no Stats sample resets the reservations
  for (int i = 0; i < 4; ++i) {
    workers.push_back(FakeWorkerServer::StartDecode());
    o.addresses.push_back(workers.back()->address());
  }
  std::unique_ptr<WorkerPool> pool = WorkerPool::Start(o);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5; ++i) ASSERT_TRUE(pool->Pick({}).ok());
    });
  }
  for (auto& t : threads) t.join();
  for (const WorkerLoad& w : pool->Snapshot().workers) {
    EXPECT_TRUE(w.ready) << w.address;
    EXPECT_EQ(w.reserved, 10) << w.address;
  }
}

}  // namespace
}  // namespace kl
