// One request's lifecycle against fake workers (docs/cluster.md): the happy
// path and Usage, retries before the first token, migration after it (the
// client stream stays contiguous and identical to an unbroken run), stop
// strings, client cancellation, deadlines, and DNS discovery.
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/router/router_service.h"
#include "services/router/router_test_util.h"

namespace kl {
namespace {

std::vector<int64_t> Iota(int n) {
  std::vector<int64_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  return v;
}

std::string TextOf(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += static_cast<char>(id);  // fake tokens are single bytes
  return s;
}

TEST(RouterLifecycleTest, StreamsTokensWithUsage) {
  RouterHarness h(1, 1);
  h.StartRouter();
  const absl::Time start = absl::Now();
  GenerateResult g = h.Generate(TokenRequest(11, 8));
  const double wall = absl::ToDoubleSeconds(absl::Now() - start);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, ExpectedTokens(11, 8));
  EXPECT_EQ(g.indices, Iota(8));
  EXPECT_EQ(g.text, TextOf(ExpectedTokens(11, 8)));
  // The first token goes out alone, straight from prefill.
  ASSERT_GE(g.chunks.size(), 2u);
  EXPECT_EQ(g.chunks[0].token_ids_size(), 1);
  const v1::GenerateResponse& last = g.chunks.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  for (size_t i = 0; i + 1 < g.chunks.size(); ++i) {
    EXPECT_EQ(g.chunks[i].finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
    EXPECT_FALSE(g.chunks[i].has_usage());
  }
  EXPECT_EQ(last.usage().prompt_tokens(), 5);
  EXPECT_EQ(last.usage().completion_tokens(), 8);
  EXPECT_EQ(last.usage().seed(), 11u);
  EXPECT_EQ(last.usage().migrations(), 0);
  EXPECT_GT(last.usage().ttft_seconds(), 0);
  EXPECT_LE(last.usage().ttft_seconds(), last.usage().e2e_seconds());
  EXPECT_LE(last.usage().e2e_seconds(), wall);
  // The decode stream ended by itself: no Release needed, no lease left.
  EXPECT_EQ(h.decode(0).decode()->active_leases(), 0);
  EXPECT_EQ(h.service().Stats().completed, 1);
}

TEST(RouterLifecycleTest, RandomSeedIsReportedAndSingleTokenReleasesTheLease) {
  RouterHarness h(1, 1);
  h.StartRouter();
  v1::GenerateRequest r = TokenRequest(0, 1);
  r.mutable_sampling()->clear_seed();
  GenerateResult g = h.Generate(r);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  ASSERT_EQ(g.tokens.size(), 1u);
  const uint64_t seed = g.chunks.back().usage().seed();
  EXPECT_EQ(g.tokens, ExpectedTokens(seed, 1));
  EXPECT_EQ(h.decode(0).decode()->decodes, 0);  // max_tokens 1: no decode stream
  EXPECT_TRUE(PollUntil([&] { return h.decode(0).decode()->releases == 1; }));
  EXPECT_EQ(h.decode(0).decode()->active_leases(), 0);
}

TEST(RouterLifecycleTest, StopTokenIdFinishesWithStop) {
  RouterHarness h(1, 1);
  h.StartRouter();
  const std::vector<int32_t> want = ExpectedTokens(4, 20);
  v1::GenerateRequest r = TokenRequest(4, 20);
  r.mutable_sampling()->add_stop_token_ids(want[6]);
  GenerateResult g = h.Generate(r);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, std::vector<int32_t>(want.begin(), want.begin() + 7));
  EXPECT_EQ(g.text, TextOf(std::vector<int32_t>(want.begin(), want.begin() + 6)));
  EXPECT_EQ(g.chunks.back().finish_reason(), v1::FINISH_REASON_STOP);
}

TEST(RouterLifecycleTest, RetriesAFailedPrefillAndReleasesItsLease) {
  RouterHarness h(1, 1);
  h.StartRouter();
  h.prefill(0).prefill()->fail_next = 1;
  GenerateResult g = h.Generate(TokenRequest(21, 6));
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, ExpectedTokens(21, 6));
  EXPECT_EQ(h.prefill(0).prefill()->calls, 2);
  EXPECT_EQ(h.decode(0).decode()->reserves, 2);
  EXPECT_EQ(h.service().Stats().retries, 1);
  EXPECT_TRUE(PollUntil([&] { return h.decode(0).decode()->releases == 1; }));
  EXPECT_EQ(h.decode(0).decode()->active_leases(), 0);
}

TEST(RouterLifecycleTest, RetriesMoveToTheOtherPrefillWorker) {
  RouterHarness h(2, 1);
  h.StartRouter();
  h.prefill(0).prefill()->fail_next = 1000;  // always fails
  for (int i = 0; i < 6 && h.prefill(0).prefill()->calls == 0; ++i) {
    GenerateResult g = h.Generate(TokenRequest(30 + i, 3));
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.tokens, ExpectedTokens(30 + i, 3));
  }
  ASSERT_GE(h.prefill(0).prefill()->calls, 1);  // the bad worker was tried...
  EXPECT_EQ(h.service().Stats().retries, h.prefill(0).prefill()->calls.load());  // ...and left
}

TEST(RouterLifecycleTest, ReserveExhaustedMovesToTheNextDecodeWorker) {
  RouterHarness h(1, 2);
  RouterOptions o = h.DefaultOptions();
  o.decode_slot_wait = absl::ZeroDuration();  // refuse at once when every worker is full
  h.StartRouter(o);
  h.decode(0).decode()->reserve_exhausted = 1000;
  h.decode(1).decode()->reserve_exhausted = 1000;
  GenerateResult full = h.Generate(TokenRequest(8, 4));
  EXPECT_EQ(full.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << full.status.error_message();
  h.decode(0).decode()->reserve_exhausted = 0;
  GenerateResult g = h.Generate(TokenRequest(8, 4));
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, ExpectedTokens(8, 4));
  EXPECT_EQ(h.prefill(0).prefill()->calls, 1);
}

// Every decode worker full: the request waits for a slot (counted in the
// decode_slot gauge, not as a retry) and runs once one frees up; past
// --decode_slot_wait_seconds it gets RESOURCE_EXHAUSTED.
TEST(RouterLifecycleTest, EveryDecodeWorkerFullWaitsForASlot) {
  RouterHarness h(1, 2);
  RouterOptions o = h.DefaultOptions();
  o.decode_slot_wait = absl::Seconds(20);
  h.StartRouter(o);
  h.decode(0).decode()->reserve_exhausted = 1000;
  h.decode(1).decode()->reserve_exhausted = 1000;
  GenerateResult g;
  std::thread t([&] { g = h.Generate(TokenRequest(8, 4)); });
  EXPECT_TRUE(PollUntil([&] { return h.service().Stats().waiting_decode_slot == 1; }));
  EXPECT_TRUE(PollUntil([&] { return h.decode(1).decode()->reserves.load() >= 4; }));
  h.decode(1).decode()->reserve_exhausted = 0;  // a slot frees up
  t.join();
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, ExpectedTokens(8, 4));
  const RouterStats s = h.service().Stats();
  EXPECT_EQ(s.waiting_decode_slot, 0);
  EXPECT_EQ(s.retries, 0);  // waiting is not a failed attempt
  EXPECT_EQ(h.prefill(0).prefill()->calls, 1);
}

TEST(RouterLifecycleTest, WaitingForADecodeSlotEndsAtItsLimit) {
  RouterHarness h(1, 1);
  RouterOptions o = h.DefaultOptions();
  o.decode_slot_wait = absl::Milliseconds(400);
  h.StartRouter(o);
  h.decode(0).decode()->reserve_exhausted = 1 << 30;
  const absl::Time start = absl::Now();
  GenerateResult g = h.Generate(TokenRequest(8, 4));
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << g.status.error_message();
  EXPECT_GE(took, absl::Milliseconds(400));
  EXPECT_LT(took, absl::Seconds(10));
  EXPECT_GT(h.decode(0).decode()->reserves.load(), 2);  // tried again while waiting
  EXPECT_EQ(h.prefill(0).prefill()->calls, 0);
  EXPECT_TRUE(PollUntil([&] { return h.service().Stats().in_flight == 0; }));
}

// A sequence no decode worker can hold (longer than its latent cache allows):
// OUT_OF_RANGE at once, no waiting.
TEST(RouterLifecycleTest, ASequenceNoDecodeWorkerCanHoldIsOutOfRange) {
  RouterHarness h(1, 2);
  h.StartRouter();
  h.decode(0).decode()->reserve_out_of_range = true;
  h.decode(1).decode()->reserve_out_of_range = true;
  GenerateResult g = h.Generate(TokenRequest(8, 4));
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::OUT_OF_RANGE) << g.status.error_message();
  // Each worker asked once (and one again as the picker's last resort), no waiting.
  const int asked = h.decode(0).decode()->reserves.load() + h.decode(1).decode()->reserves.load();
  EXPECT_GE(asked, 2);
  EXPECT_LE(asked, 3);
  EXPECT_EQ(h.prefill(0).prefill()->calls, 0);
  h.decode(1).decode()->reserve_out_of_range = false;  // one that can: used
  GenerateResult ok = h.Generate(TokenRequest(8, 4));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
}

// One decode worker can never hold the request, the other is only full: the
// request waits for the second (not OUT_OF_RANGE, whichever was asked last).
TEST(RouterLifecycleTest, TooLongForOneWorkerAndTheOtherFullWaits) {
  RouterHarness h(1, 2);
  RouterOptions o = h.DefaultOptions();
  o.decode_slot_wait = absl::Seconds(20);
  h.StartRouter(o);
  h.decode(0).decode()->reserve_out_of_range = true;
  h.decode(1).decode()->reserve_exhausted = 1000;
  GenerateResult g;
  std::thread t([&] { g = h.Generate(TokenRequest(9, 4)); });
  EXPECT_TRUE(PollUntil([&] { return h.decode(1).decode()->reserves.load() >= 4; }));
  EXPECT_TRUE(PollUntil([&] { return h.decode(0).decode()->reserves.load() >= 2; }));
  h.decode(1).decode()->reserve_exhausted = 0;
  t.join();
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, ExpectedTokens(9, 4));
  EXPECT_EQ(h.service().Stats().retries, 0);
}

void ExpectMigration(bool kill_server) {
  RouterHarness h(1, 2);
  h.StartRouter();
  for (int i = 0; i < 2; ++i) {
    h.decode(i).decode()->die_after_tokens = 3;  // shared budget: one death in all
    h.decode(i).decode()->kill_server = kill_server;
  }
  const int n = 12;
  GenerateResult g = h.Generate(TokenRequest(42, n));
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  // Indices 0..n-1 exactly once, the tokens of an unbroken run.
  EXPECT_EQ(g.indices, Iota(n));
  EXPECT_EQ(g.tokens, ExpectedTokens(42, n));
  EXPECT_EQ(g.text, TextOf(ExpectedTokens(42, n)));
  EXPECT_EQ(g.chunks.back().usage().migrations(), 1);
  EXPECT_EQ(g.chunks.back().usage().completion_tokens(), n);
  EXPECT_EQ(h.service().Stats().migrations, 1);
  // First prefill at 0; the re-prefill of prompt + 4 tokens samples index 4.
  EXPECT_EQ(h.prefill(0).prefill()->sample_indices(), (std::vector<int64_t>{0, 4}));
  const int dead = h.decode(0).decode()->dead ? 0 : 1;
  EXPECT_TRUE(h.decode(dead).decode()->dead);
  EXPECT_EQ(h.decode(dead).decode()->streamed, 3);
  EXPECT_EQ(h.decode(1 - dead).decode()->streamed, n - 5);
}

TEST(RouterLifecycleTest, MigratesWhenDecodeDiesMidStream) { ExpectMigration(false); }

TEST(RouterLifecycleTest, MigratesWhenDecodeServerIsKilled) { ExpectMigration(true); }

TEST(RouterLifecycleTest, NoMigrationBudgetFailsUnavailable) {
  RouterHarness h(1, 2);
  RouterOptions o = h.DefaultOptions();
  o.max_migrations = 0;
  h.StartRouter(o);
  for (int i = 0; i < 2; ++i) h.decode(i).decode()->die_after_tokens = 2;
  GenerateResult g = h.Generate(TokenRequest(42, 10));
  EXPECT_EQ(g.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(g.indices, Iota(3));  // what was sent stays valid
}

TEST(RouterLifecycleTest, StopStringCutsTextAndCancelsDecode) {
  RouterHarness h(1, 1);
  h.StartRouter();
  h.decode(0).decode()->token_delay_ms = 5;
  const std::vector<int32_t> want = ExpectedTokens(9, 50);
  const std::string full = TextOf(want);
  const std::string stop = full.substr(4, 2);
  ASSERT_EQ(full.find(stop), 4u);  // consecutive letters differ by 5: no earlier match
  v1::GenerateRequest r = TokenRequest(9, 50);
  r.mutable_sampling()->add_stop(stop);
  GenerateResult g = h.Generate(r);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.text, full.substr(0, 4));
  EXPECT_EQ(g.tokens, std::vector<int32_t>(want.begin(), want.begin() + 6));
  EXPECT_EQ(g.chunks.back().finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(g.chunks.back().usage().completion_tokens(), 6);
  EXPECT_TRUE(PollUntil([&] { return h.decode(0).decode()->decode_cancelled == 1; }));
  EXPECT_LT(h.decode(0).decode()->streamed, 50);
  EXPECT_EQ(h.service().Stats().stop_cancels, 1);
  EXPECT_TRUE(PollUntil([&] { return h.decode(0).decode()->active_leases() == 0; }));
}

TEST(RouterLifecycleTest, ClientCancelCancelsDecodeAndReleasesTheLease) {
  RouterHarness h(1, 1);
  h.StartRouter();
  h.decode(0).decode()->token_delay_ms = 20;
  grpc::ClientContext ctx;
  auto reader = h.stub().Generate(&ctx, TokenRequest(3, 500));
  v1::GenerateResponse chunk;
  int64_t tokens = 0;
  while (tokens < 3 && reader->Read(&chunk)) tokens += chunk.token_ids_size();
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  FakeDecode* d = h.decode(0).decode();
  EXPECT_TRUE(PollUntil([&] { return d->decode_cancelled == 1; }));
  EXPECT_TRUE(PollUntil([&] { return d->releases == 1; }));
  EXPECT_EQ(d->active_leases(), 0);
  EXPECT_TRUE(PollUntil([&] {
    RouterStats s = h.service().Stats();
    return s.cancelled == 1 && s.in_flight == 0;
  }));
  EXPECT_LT(d->streamed, 100);
}

TEST(RouterLifecycleTest, DeadlineEndsTheStreamAndReleases) {
  RouterHarness h(1, 1);
  RouterOptions o = h.DefaultOptions();
  // The client sets none below. 500 tokens take 10 s; the first arrives well
  // within the deadline even on a loaded machine.
  o.default_deadline = absl::Milliseconds(1500);
  h.StartRouter(o);
  h.decode(0).decode()->token_delay_ms = 20;
  grpc::ClientContext ctx;
  auto reader = h.stub().Generate(&ctx, TokenRequest(3, 500));
  v1::GenerateResponse chunk;
  int64_t tokens = 0;
  const absl::Time start = absl::Now();
  while (reader->Read(&chunk)) tokens += chunk.token_ids_size();
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(6));
  EXPECT_GT(tokens, 0);
  EXPECT_TRUE(PollUntil([&] { return h.decode(0).decode()->active_leases() == 0; }));
  EXPECT_TRUE(PollUntil([&] { return h.service().Stats().failed == 1; }));
}

TEST(RouterLifecycleTest, DiscoversWorkersByDns) {
  RouterHarness h(1, 1);
  RouterOptions o = h.DefaultOptions();
  o.prefill.addresses.clear();
  o.decode.addresses.clear();
  o.prefill.dns_targets = {absl::StrCat("localhost:", h.prefill(0).port())};
  o.decode.dns_targets = {absl::StrCat("localhost:", h.decode(0).port())};
  h.StartRouter(o);
  bool found = false;
  for (const WorkerLoad& w : h.service().decode_pool().Snapshot().workers) {
    if (w.address == h.decode(0).address()) found = w.ready;
  }
  EXPECT_TRUE(found);
  GenerateResult g = h.Generate(TokenRequest(17, 5));
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens, ExpectedTokens(17, 5));
}

TEST(RouterLifecycleTest, ConcurrentRequestsAllComplete) {
  RouterHarness h(2, 2);
  h.StartRouter();
  std::vector<GenerateResult> results(8);
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] { results[i] = h.Generate(TokenRequest(100 + i, 6)); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, ExpectedTokens(100 + i, 6));
  }
  // Reservation at pick time spreads the burst over both decode workers.
  EXPECT_GT(h.decode(0).decode()->reserves, 0);
  EXPECT_GT(h.decode(1).decode()->reserves, 0);
}

}  // namespace
}  // namespace kl
