#include "services/prefill/prefix_cache.h"

#include <memory>
#include <vector>

#include "gtest/gtest.h"

namespace kl {
namespace {

// A state of `n` tokens whose every float is `fill` (one KDA layer of 16
// floats, one MLA layer of 4 floats per token).
SequenceState State(int64_t n, float fill) {
  SequenceState s;
  s.num_tokens = n;
  s.kda.resize(1);
  s.kda[0].recurrent.assign(16, fill);
  s.mla.resize(1);
  s.mla[0].latent.assign(n * 4, fill);
  return s;
}

std::vector<int32_t> Seq(int n, int32_t start = 0) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(start + i);
  return t;
}

int64_t Bytes(int64_t n) { return PrefixCache::StateBytes(State(n, 0)) + n * 4; }

TEST(PrefixCache, TheLongestProperPrefixWins) {
  PrefixCache c(1 << 20);
  ASSERT_TRUE(c.Insert(Seq(4), State(4, 1)));
  ASSERT_TRUE(c.Insert(Seq(8), State(8, 2)));
  ASSERT_TRUE(c.Insert(Seq(6, 100), State(6, 3)));  // another conversation
  auto hit = c.Lookup(Seq(20));
  ASSERT_NE(hit, nullptr);
  EXPECT_EQ(hit->tokens, Seq(8));
  EXPECT_EQ(hit->state.num_tokens, 8);
  EXPECT_EQ(hit->state.mla[0].latent.size(), 32u);
  EXPECT_EQ(hit->state.kda[0].recurrent[0], 2.0f);
  hit = c.Lookup(Seq(6));  // only the 4-token entry is a proper prefix
  ASSERT_NE(hit, nullptr);
  EXPECT_EQ(hit->tokens, Seq(4));
  hit = c.Lookup(Seq(8));  // the 8-token entry is not a proper prefix of itself
  ASSERT_NE(hit, nullptr);
  EXPECT_EQ(hit->tokens, Seq(4));
  hit = c.Lookup(Seq(5));
  ASSERT_NE(hit, nullptr);
  EXPECT_EQ(hit->tokens, Seq(4));
  EXPECT_EQ(c.Lookup(Seq(4)), nullptr);  // the same prompt: nothing left to prefill
  EXPECT_EQ(c.Lookup(Seq(10, 1)), nullptr);
  std::vector<int32_t> other = Seq(9);
  other[2] = 999;  // differs inside the cached prefixes
  EXPECT_EQ(c.Lookup(other), nullptr);
  const PrefixCacheStats s = c.Stats();
  EXPECT_EQ(s.entries, 3);
  EXPECT_EQ(s.inserts, 3);
  EXPECT_EQ(s.queries, 7);
  EXPECT_EQ(s.hits, 4);  // Seq(20), Seq(6), Seq(8), Seq(5)
  EXPECT_EQ(s.hit_tokens, 8 + 4 + 4 + 4);
  EXPECT_EQ(s.bytes, Bytes(4) + Bytes(8) + Bytes(6));
}

TEST(PrefixCache, TheLeastRecentlyUsedGoFirstAndTheBudgetHolds) {
  PrefixCache c(3 * Bytes(10));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c.Insert(Seq(10, 1000 * i), State(10, i)));
  ASSERT_NE(c.Lookup(Seq(12, 0)), nullptr);  // entry 0 is now the most recently used
  ASSERT_TRUE(c.Insert(Seq(10, 5000), State(10, 5)));
  EXPECT_NE(c.Lookup(Seq(12, 0)), nullptr);
  EXPECT_EQ(c.Lookup(Seq(12, 1000)), nullptr);  // evicted: least recently used
  EXPECT_NE(c.Lookup(Seq(12, 2000)), nullptr);
  EXPECT_NE(c.Lookup(Seq(12, 5000)), nullptr);
  PrefixCacheStats s = c.Stats();
  EXPECT_EQ(s.entries, 3);
  EXPECT_EQ(s.evictions, 1);
  EXPECT_LE(s.bytes, s.capacity_bytes);
  // Larger than the whole budget: not kept, nothing evicted for it.
  EXPECT_FALSE(c.Insert(Seq(100), State(100, 9)));
  EXPECT_EQ(c.Stats().entries, 3);
  // A state that is not of these tokens is refused.
  EXPECT_FALSE(c.Insert(Seq(10), State(9, 0)));
}

TEST(PrefixCache, SameTokensReplaceTheEntryAndAHeldEntryOutlivesEviction) {
  PrefixCache c(Bytes(10));
  ASSERT_TRUE(c.Insert(Seq(10), State(10, 1)));
  std::shared_ptr<const PrefixCache::Entry> held = c.Lookup(Seq(11));
  ASSERT_NE(held, nullptr);
  ASSERT_TRUE(c.Insert(Seq(10), State(10, 2)));  // replaces, no eviction needed
  EXPECT_EQ(c.Stats().entries, 1);
  EXPECT_EQ(c.Stats().evictions, 0);
  EXPECT_EQ(c.Lookup(Seq(11))->state.kda[0].recurrent[0], 2.0f);
  EXPECT_EQ(held->state.kda[0].recurrent[0], 1.0f);  // still whole
  ASSERT_TRUE(c.Insert(Seq(10, 50), State(10, 3)));  // evicts the only entry
  EXPECT_EQ(c.Lookup(Seq(11)), nullptr);
  EXPECT_EQ(held->tokens, Seq(10));
}

TEST(PrefixCache, KeepsOnlyHostVectors) {
  PrefixCache c(1 << 20);
  SequenceState s = State(3, 1);
  s.device = std::make_shared<StateResidency>();
  ASSERT_TRUE(c.Insert(Seq(3), s));
  EXPECT_EQ(c.Lookup(Seq(4))->state.device, nullptr);
}

}  // namespace
}  // namespace kl
