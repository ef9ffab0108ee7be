// The least-loaded policy as a pure function: choice, tiers, round-robin ties,
// and how reserving load at pick time spreads a burst of picks.
#include "services/router/least_loaded_picker.h"

#include <map>

#include "gtest/gtest.h"

namespace kl {
namespace {

PoolSnapshot Pool(std::vector<int64_t> loads) {
  PoolSnapshot s;
  for (size_t i = 0; i < loads.size(); ++i) {
    WorkerLoad w;
    w.address = "w" + std::to_string(i);
    w.ready = true;
    w.load = loads[i];
    s.workers.push_back(w);
  }
  return s;
}

TEST(LeastLoadedPickerTest, PicksTheLeastLoaded) {
  EXPECT_EQ(PickWorker(Pool({5, 2, 7}), {}), 1u);
  PoolSnapshot s = Pool({5, 2, 7});
  s.workers[0].reserved = 0;
  s.workers[1].reserved = 4;  // 2 + 4 = 6 > 5
  EXPECT_EQ(PickWorker(s, {}), 0u);
}

TEST(LeastLoadedPickerTest, NothingReadyGivesNullopt) {
  EXPECT_EQ(PickWorker(PoolSnapshot{}, {}), std::nullopt);
  PoolSnapshot s = Pool({0, 0});
  s.workers[0].ready = false;
  s.workers[1].incompatible = true;  // another model: never, not even as a last resort
  EXPECT_EQ(PickWorker(s, {}), std::nullopt);
  EXPECT_EQ(PickWorker(s, {"w0", "w1"}), std::nullopt);
}

TEST(LeastLoadedPickerTest, SkipsNotReadyAndIncompatible) {
  PoolSnapshot s = Pool({9, 0, 0});
  s.workers[1].ready = false;
  s.workers[2].incompatible = true;
  EXPECT_EQ(PickWorker(s, {}), 0u);
}

TEST(LeastLoadedPickerTest, ExclusionsAndSuspectsAreLastResorts) {
  PoolSnapshot s = Pool({0, 5, 9});
  EXPECT_EQ(PickWorker(s, {"w0"}), 1u);
  s.workers[1].suspect = true;  // unsuspected beats less loaded
  EXPECT_EQ(PickWorker(s, {"w0"}), 2u);
  // Every candidate excluded or suspect: suspect but not excluded first...
  EXPECT_EQ(PickWorker(s, {"w0", "w2"}), 1u);
  // ... then anything ready, least loaded.
  EXPECT_EQ(PickWorker(s, {"w0", "w1", "w2"}), 0u);
}

TEST(LeastLoadedPickerTest, TiesGoRoundRobin) {
  PoolSnapshot s = Pool({1, 0, 3, 0, 0});
  std::vector<size_t> picks;
  for (uint64_t c = 0; c < 6; ++c) {
    s.rr_cursor = c;
    picks.push_back(*PickWorker(s, {}));
  }
  EXPECT_EQ(picks, (std::vector<size_t>{1, 3, 4, 1, 3, 4}));
}

TEST(LeastLoadedPickerTest, ReservingAtPickTimeSpreadsABurst) {
  // What WorkerPool::Pick does under its lock: pick, reserve, advance the cursor.
  PoolSnapshot s = Pool({3, 0, 1, 0});
  std::map<size_t, int> count;
  for (int i = 0; i < 12; ++i) {
    const size_t p = *PickWorker(s, {});
    ++count[p];
    ++s.workers[p].reserved;
    ++s.rr_cursor;
  }
  // 4 + 12 units over 4 workers: every worker ends at effective load 4.
  for (const WorkerLoad& w : s.workers) EXPECT_EQ(w.effective_load(), 4) << w.address;
  EXPECT_EQ(count[0], 1);
  EXPECT_EQ(count[1], 4);
  EXPECT_EQ(count[2], 3);
  EXPECT_EQ(count[3], 4);
}

TEST(LeastLoadedPickerTest, WithoutReservationABurstPilesUp) {
  // The failure mode reservation prevents: a stale snapshot sends every pick
  // of a burst to the same worker.
  PoolSnapshot s = Pool({0, 1, 1});
  for (int i = 0; i < 5; ++i) EXPECT_EQ(PickWorker(s, {}), 0u);
}

TEST(LeastLoadedPickerTest, APreferredWorkerWinsWithinTheSlackOnly) {
  const PoolSnapshot s = Pool({3, 1, 4});
  EXPECT_EQ(PickWorker(s, {}, "w0", 2), 0u);  // 3 <= 1 + 2
  EXPECT_EQ(PickWorker(s, {}, "w2", 2), 1u);  // 4 > 1 + 2: the least loaded instead
  EXPECT_EQ(PickWorker(s, {}, "w2", 3), 2u);
  EXPECT_EQ(PickWorker(s, {}, "w0", 0), 1u);  // no slack: only when it is the least loaded
  EXPECT_EQ(PickWorker(s, {}, "gone", 5), 1u);
  // Never one that failed this request, is suspect or not ready.
  EXPECT_EQ(PickWorker(s, {"w0"}, "w0", 9), 1u);
  PoolSnapshot t = s;
  t.workers[0].suspect = true;
  EXPECT_EQ(PickWorker(t, {}, "w0", 9), 1u);
  t = s;
  t.workers[0].ready = false;
  EXPECT_EQ(PickWorker(t, {}, "w0", 9), 1u);
  // Reservations count: a burst spreads once the preferred one is `slack` ahead.
  PoolSnapshot b = Pool({0, 0});
  std::map<size_t, int> picks;
  for (int i = 0; i < 10; ++i) {
    const size_t w = *PickWorker(b, {}, "w0", 2);
    ++b.workers[w].reserved;
    ++b.rr_cursor;
    ++picks[w];
  }
  EXPECT_EQ(picks[0], 6);
  EXPECT_EQ(picks[1], 4);
}

}  // namespace
}  // namespace kl
