// LeaseManager without gRPC: capacity, expiry on a fake clock, idempotent
// release, draining, and the push/claim hand-over.
#include "services/decode/lease_manager.h"

#include <memory>
#include <optional>
#include <set>
#include <string>

#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

constexpr absl::Duration kTtl = absl::Seconds(30);

struct FakeClock {
  absl::Time now = absl::FromUnixSeconds(1000);
  LeaseManager::Clock fn() {
    return [this] { return now; };
  }
};

// Records what the manager tells it.
class Recorder : public StateConsumer {
 public:
  void OnStateReady(SequenceState state) override { state_ = std::move(state); }
  void OnLeaseRevoked(const absl::Status& why) override {
    ++revocations_;
    why_ = why;
  }
  std::optional<SequenceState> state_;
  std::optional<absl::Status> why_;
  int revocations_ = 0;
};

SequenceState StateWithTokens(int64_t n) {
  SequenceState s;
  s.num_tokens = n;
  return s;
}

class LeaseManagerTest : public ::testing::Test {
 protected:
  FakeClock clock_;
};

TEST_F(LeaseManagerTest, CapacityIsEnforcedAndFreedSlotsAreReusable) {
  LeaseManagerOptions o;
  o.slots = 3;
  o.ttl = kTtl;
  LeaseManager m(o, clock_.fn());
  std::set<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    auto g = m.Reserve("r", 10);
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ(g->lease_id.size(), 32u);
    EXPECT_EQ(g->ttl, kTtl);
    ids.insert(g->lease_id);
  }
  EXPECT_EQ(ids.size(), 3u);
  auto full = m.Reserve("r", 10);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(m.Stats().slots_used, 3);
  EXPECT_TRUE(m.Release(*ids.begin()));
  EXPECT_EQ(m.Stats().slots_used, 2);
  EXPECT_TRUE(m.Reserve("r", 10).ok());
}

TEST_F(LeaseManagerTest, LatentRowBudgetIsEnforced) {
  LeaseManagerOptions o;
  o.slots = 8;
  o.latent_rows_capacity = 100;
  LeaseManager m(o, clock_.fn());
  auto a = m.Reserve("a", 60);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(m.Reserve("b", 41).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(m.Reserve("c", 40).ok());
  EXPECT_EQ(m.Reserve("d", -1).status().code(), absl::StatusCode::kInvalidArgument);
  m.Release(a->lease_id);
  EXPECT_TRUE(m.Reserve("b", 41).ok());
}

// A GPU pool hands out whole pages: reservations count in pages, and a
// sequence longer than one slot may hold can never be admitted here.
TEST_F(LeaseManagerTest, LatentRowsAreReservedInWholePagesUpToTheSequenceLimit) {
  LeaseManagerOptions o;
  o.slots = 8;
  o.latent_rows_capacity = 4 * 64;  // four pages of 64 rows
  o.latent_row_granularity = 64;
  o.max_rows_per_lease = 3 * 64;
  LeaseManager m(o, clock_.fn());
  auto a = m.Reserve("a", 65);  // two pages
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(m.Stats().slots_used, 1);
  auto b = m.Reserve("b", 64);  // one page
  ASSERT_TRUE(b.ok());
  // 129 rows free in rows, one page in pages: 2 pages do not fit.
  const absl::Status c = m.Reserve("c", 65).status();
  EXPECT_EQ(c.code(), absl::StatusCode::kResourceExhausted) << c;
  EXPECT_TRUE(m.Reserve("d", 1).ok());  // the last page
  EXPECT_EQ(m.Reserve("e", 1).status().code(), absl::StatusCode::kResourceExhausted);
  const absl::Status too_long = m.Reserve("f", 3 * 64 + 1).status();
  EXPECT_EQ(too_long.code(), absl::StatusCode::kOutOfRange) << too_long;
  EXPECT_NE(too_long.message().find("192 rows at most"), std::string::npos) << too_long;
  m.Release(a->lease_id);
  EXPECT_TRUE(m.Reserve("c", 65).ok());  // its two pages are back
}

// A lease released (router, expiry) while the decode engine still holds its
// state keeps its rows until the holder lets the state go: its pages are in
// use until then. A length the worker can never hold is OUT_OF_RANGE; a lease
// without a bound takes the most one sequence may.
TEST_F(LeaseManagerTest, RowsOfAHeldStateStayReservedUntilItsHolderReleases) {
  LeaseManagerOptions o;
  o.slots = 8;
  o.latent_rows_capacity = 4 * 64;
  o.latent_row_granularity = 64;
  LeaseManager m(o, clock_.fn());
  auto g = m.Reserve("a", 3 * 64);
  ASSERT_TRUE(g.ok());
  auto consumer = std::make_shared<Recorder>();
  ASSERT_TRUE(m.Claim(g->lease_id, consumer).ok());
  auto t = m.BeginPush(g->lease_id, std::make_shared<Recorder>());
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(m.AdoptState(g->lease_id, t->push_id, StateWithTokens(100)).ok());
  ASSERT_TRUE(consumer->state_.has_value());  // handed to the decode stream / engine
  EXPECT_TRUE(m.Release(g->lease_id));        // e.g. the router, at a stop string
  EXPECT_EQ(m.Stats().slots_used, 0);
  // Its three pages are still the engine's: only one is free.
  EXPECT_EQ(m.Reserve("b", 2 * 64).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(m.ReleaseHeld(g->lease_id, absl::CancelledError("done")));  // the engine lets go
  EXPECT_TRUE(m.Reserve("b", 2 * 64).ok());
  EXPECT_FALSE(m.ReleaseHeld(g->lease_id, absl::CancelledError("again")));  // counted once
  EXPECT_EQ(m.Reserve("c", 3 * 64).status().code(), absl::StatusCode::kResourceExhausted);

  // Released by the holder itself: the rows come back at once.
  LeaseManager n(o, clock_.fn());
  auto h = n.Reserve("a", 4 * 64);
  ASSERT_TRUE(h.ok());
  auto c2 = std::make_shared<Recorder>();
  ASSERT_TRUE(n.Claim(h->lease_id, c2).ok());
  auto t2 = n.BeginPush(h->lease_id, std::make_shared<Recorder>());
  ASSERT_TRUE(n.AdoptState(h->lease_id, t2->push_id, StateWithTokens(10)).ok());
  EXPECT_TRUE(n.ReleaseHeld(h->lease_id, absl::CancelledError("finished")));
  EXPECT_TRUE(n.Reserve("b", 4 * 64).ok());

  // Never fits / no bound.
  LeaseManager k(o, clock_.fn());
  EXPECT_EQ(k.Reserve("long", 4 * 64 + 1).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(k.Reserve("unbounded", 0).ok());  // takes the whole pool (no per-sequence limit)
  EXPECT_EQ(k.Reserve("x", 1).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(LeaseManagerTest, ReleaseIsIdempotentAndRevokesListeners) {
  LeaseManagerOptions o;
  LeaseManager m(o, clock_.fn());
  auto g = m.Reserve("r", 0);
  ASSERT_TRUE(g.ok());
  auto push = std::make_shared<Recorder>();
  auto consumer = std::make_shared<Recorder>();
  ASSERT_TRUE(m.BeginPush(g->lease_id, push).ok());
  ASSERT_TRUE(m.Claim(g->lease_id, consumer).ok());
  EXPECT_TRUE(m.Release(g->lease_id));
  EXPECT_FALSE(m.Release(g->lease_id));
  EXPECT_FALSE(m.Release("no-such-lease"));
  EXPECT_EQ(push->revocations_, 1);
  EXPECT_EQ(consumer->revocations_, 1);
  EXPECT_FALSE(consumer->state_.has_value());
  EXPECT_EQ(m.Stats().slots_used, 0);
  EXPECT_EQ(m.Stats().pushes_in_flight, 0);
}

TEST_F(LeaseManagerTest, LeasesExpireAfterTtlWithoutProgress) {
  LeaseManagerOptions o;
  o.ttl = kTtl;
  LeaseManager m(o, clock_.fn());
  auto idle = m.Reserve("idle", 0);
  auto pushing = m.Reserve("pushing", 0);
  ASSERT_TRUE(idle.ok() && pushing.ok());
  auto waiter = std::make_shared<Recorder>();
  ASSERT_TRUE(m.Claim(idle->lease_id, waiter).ok());  // waiting does not renew
  auto push = std::make_shared<Recorder>();
  auto ticket = m.BeginPush(pushing->lease_id, push);
  ASSERT_TRUE(ticket.ok());

  clock_.now += kTtl - absl::Milliseconds(1);
  EXPECT_EQ(m.ExpireOverdue(), 0);
  ASSERT_TRUE(m.RenewPush(pushing->lease_id, ticket->push_id).ok());  // a frame arrived
  clock_.now += absl::Milliseconds(1);
  EXPECT_EQ(m.ExpireOverdue(), 1);  // only the idle one
  ASSERT_TRUE(waiter->why_.has_value());
  EXPECT_EQ(waiter->why_->code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m.Stats().slots_used, 1);
  EXPECT_EQ(m.Release(idle->lease_id), false);

  clock_.now += kTtl;
  EXPECT_EQ(m.ExpireOverdue(), 1);
  EXPECT_EQ(push->revocations_, 1);
  EXPECT_EQ(m.RenewPush(pushing->lease_id, ticket->push_id).code(), absl::StatusCode::kNotFound);
  const LeaseStats s = m.Stats();
  EXPECT_EQ(s.slots_used, 0);
  EXPECT_EQ(s.expired_total, 2);
}

TEST_F(LeaseManagerTest, DecodeProgressRenewsAndCountsRows) {
  LeaseManagerOptions o;
  o.ttl = kTtl;
  LeaseManager m(o, clock_.fn());
  auto g = m.Reserve("r", 0);
  ASSERT_TRUE(g.ok());
  auto t = m.BeginPush(g->lease_id, std::make_shared<Recorder>());
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(m.AdoptState(g->lease_id, t->push_id, StateWithTokens(7)).ok());
  EXPECT_EQ(m.Stats().latent_rows_used, 7);
  auto consumer = std::make_shared<Recorder>();
  ASSERT_TRUE(m.Claim(g->lease_id, consumer).ok());
  ASSERT_TRUE(consumer->state_.has_value());
  EXPECT_EQ(consumer->state_->num_tokens, 7);
  EXPECT_EQ(m.Stats().decoding, 1);
  for (int i = 0; i < 5; ++i) {
    clock_.now += kTtl / 2;
    ASSERT_TRUE(m.Renew(g->lease_id, 8 + i).ok());
    EXPECT_EQ(m.ExpireOverdue(), 0);
  }
  EXPECT_EQ(m.Stats().latent_rows_used, 12);
  clock_.now += kTtl;
  EXPECT_EQ(m.ExpireOverdue(), 1);
  EXPECT_EQ(consumer->revocations_, 1);
  EXPECT_EQ(m.Renew(g->lease_id, 13).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m.Stats().latent_rows_used, 0);
}

TEST_F(LeaseManagerTest, DrainingRefusesNewLeasesButKeepsExistingOnes) {
  LeaseManagerOptions o;
  LeaseManager m(o, clock_.fn());
  auto g = m.Reserve("r", 0);
  ASSERT_TRUE(g.ok());
  m.SetDraining(true);
  EXPECT_TRUE(m.Stats().draining);
  EXPECT_EQ(m.Reserve("r2", 0).status().code(), absl::StatusCode::kUnavailable);
  auto t = m.BeginPush(g->lease_id, std::make_shared<Recorder>());
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(m.AdoptState(g->lease_id, t->push_id, StateWithTokens(3)).ok());
  auto consumer = std::make_shared<Recorder>();
  EXPECT_TRUE(m.Claim(g->lease_id, consumer).ok());
  EXPECT_TRUE(consumer->state_.has_value());
  m.SetDraining(false);
  EXPECT_TRUE(m.Reserve("r3", 0).ok());
}

TEST_F(LeaseManagerTest, ClaimBeforeTheStateArrivesWaitsForIt) {
  LeaseManagerOptions o;
  LeaseManager m(o, clock_.fn());
  auto g = m.Reserve("r", 0);
  ASSERT_TRUE(g.ok());
  auto consumer = std::make_shared<Recorder>();
  ASSERT_TRUE(m.Claim(g->lease_id, consumer).ok());
  EXPECT_FALSE(consumer->state_.has_value());
  EXPECT_EQ(m.Claim(g->lease_id, std::make_shared<Recorder>()).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m.Claim("nope", std::make_shared<Recorder>()).code(), absl::StatusCode::kNotFound);
  auto t = m.BeginPush(g->lease_id, std::make_shared<Recorder>());
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(m.AdoptState(g->lease_id, t->push_id, StateWithTokens(5)).ok());
  ASSERT_TRUE(consumer->state_.has_value());
  EXPECT_EQ(consumer->state_->num_tokens, 5);
  EXPECT_EQ(consumer->revocations_, 0);
}

TEST_F(LeaseManagerTest, PushLifecycleRetriesSupersedesAndRefusesRefill) {
  LeaseManagerOptions o;
  LeaseManager m(o, clock_.fn());
  auto g = m.Reserve("r", 10);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(m.BeginPush("unknown", std::make_shared<Recorder>()).status().code(),
            absl::StatusCode::kNotFound);

  // A failed push leaves the lease reserved and empty.
  auto first = std::make_shared<Recorder>();
  auto t1 = m.BeginPush(g->lease_id, first);
  ASSERT_TRUE(t1.ok());
  EXPECT_EQ(t1->max_total_tokens, 10);
  EXPECT_EQ(m.Stats().pushes_in_flight, 1);
  m.EndPush(g->lease_id, t1->push_id);
  EXPECT_EQ(m.Stats().pushes_in_flight, 0);
  EXPECT_EQ(m.Stats().slots_used, 1);
  EXPECT_EQ(first->revocations_, 0);

  // A retry supersedes a push still registered.
  auto second = std::make_shared<Recorder>();
  auto t2 = m.BeginPush(g->lease_id, second);
  ASSERT_TRUE(t2.ok());
  auto third = std::make_shared<Recorder>();
  auto t3 = m.BeginPush(g->lease_id, third);
  ASSERT_TRUE(t3.ok());
  ASSERT_TRUE(second->why_.has_value());
  EXPECT_EQ(second->why_->code(), absl::StatusCode::kAborted);
  EXPECT_EQ(m.RenewPush(g->lease_id, t2->push_id).code(), absl::StatusCode::kAborted);
  EXPECT_EQ(m.AdoptState(g->lease_id, t2->push_id, StateWithTokens(3)).code(),
            absl::StatusCode::kAborted);

  // More tokens than reserved is refused; the push may still be retried.
  EXPECT_EQ(m.AdoptState(g->lease_id, t3->push_id, StateWithTokens(11)).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(m.AdoptState(g->lease_id, t3->push_id, StateWithTokens(10)).ok());
  EXPECT_EQ(m.BeginPush(g->lease_id, std::make_shared<Recorder>()).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(third->revocations_, 0);
}

TEST(NewRandomIdTest, IdsAreHexAndDistinct) {
  std::set<std::string> ids;
  for (int i = 0; i < 1000; ++i) {
    std::string id = NewRandomId();
    ASSERT_EQ(id.size(), 32u);
    EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos);
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), 1000u);
}

}  // namespace
}  // namespace kl
