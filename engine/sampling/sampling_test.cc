#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "engine/sampling/sampler.h"
#include "engine/sampling/stop_matcher.h"

namespace kl {
namespace {

TEST(Sampler, GreedyPicksArgmaxLowestIdOnTies) {
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p);
  const float logits[] = {0.5f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(s.Sample(logits, 4), 1);
  p.temperature = 1.0;
  p.top_k = 1;
  Sampler s2(p);
  EXPECT_EQ(s2.Sample(logits, 4), 1);
}

// No finite maximum: the first candidate in order (as greedy), and the draw is still
// consumed, so a stream resumed at a later index stays aligned.
TEST(Sampler, NonFiniteMaximumPicksTheFirstCandidate) {
  const float inf = INFINITY;
  const float all_neg_inf[] = {-inf, -inf, -inf};
  const float pos_inf[] = {0.0f, inf, 1.0f, inf};
  SamplingParams p;
  p.seed = 5;
  Sampler s(p);
  EXPECT_EQ(s.Sample(all_neg_inf, 3), 0);
  EXPECT_EQ(s.Sample(pos_inf, 4), 1);
  const float finite[] = {0.1f, 0.7f, -0.3f, 0.2f};
  Sampler resumed(p, 2);
  std::vector<int> a, b;
  for (int i = 0; i < 40; ++i) {
    a.push_back(s.Sample(finite, 4));
    b.push_back(resumed.Sample(finite, 4));
  }
  EXPECT_EQ(a, b);
}

TEST(Sampler, SeededIsReproducibleAndSeedsDiffer) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = std::sin(i * 0.7f);
  SamplingParams p;
  p.seed = 1234;
  Sampler a(p), b(p);
  std::vector<int> ta, tb;
  for (int i = 0; i < 200; ++i) {
    ta.push_back(a.Sample(logits.data(), 50));
    tb.push_back(b.Sample(logits.data(), 50));
  }
  EXPECT_EQ(ta, tb);
  p.seed = 1235;
  Sampler c(p);
  std::vector<int> tc;
  for (int i = 0; i < 200; ++i) tc.push_back(c.Sample(logits.data(), 50));
  EXPECT_NE(ta, tc);
}

TEST(Sampler, ResumingAtAnIndexContinuesTheSameStream) {
  std::vector<float> logits(30);
  for (int i = 0; i < 30; ++i) logits[i] = std::cos(i * 1.3f);
  SamplingParams p;
  p.seed = 99;
  Sampler full(p);
  std::vector<int> seq;
  for (int i = 0; i < 50; ++i) seq.push_back(full.Sample(logits.data(), 30));
  for (int start : {1, 17, 49}) {
    Sampler resumed(p, start);
    for (int i = start; i < 50; ++i) ASSERT_EQ(resumed.Sample(logits.data(), 30), seq[i]) << start;
  }
}

TEST(Sampler, MatchesSoftmaxDistribution) {
  const float logits[] = {0.0f, 1.0f, 2.0f, -1.0f};
  SamplingParams p;
  p.seed = 7;
  p.temperature = 0.8;
  Sampler s(p);
  const int n = 200000;
  std::map<int, int> counts;
  for (int i = 0; i < n; ++i) counts[s.Sample(logits, 4)]++;
  double z = 0;
  for (float l : logits) z += std::exp(l / 0.8);
  for (int i = 0; i < 4; ++i) {
    const double expect = std::exp(logits[i] / 0.8) / z;
    EXPECT_NEAR(counts[i] / static_cast<double>(n), expect, 0.006) << i;
  }
}

TEST(Sampler, TopKAndTopPRestrictSupport) {
  const float logits[] = {3.0f, 2.9f, 1.0f, 0.0f, -5.0f};
  SamplingParams p;
  p.seed = 3;
  p.top_k = 2;
  Sampler s(p);
  std::set<int> seen;
  for (int i = 0; i < 2000; ++i) seen.insert(s.Sample(logits, 5));
  EXPECT_EQ(seen, (std::set<int>{0, 1}));
  // top_p: probabilities ≈ [0.47, 0.43, 0.064, 0.024, ...]; p = 0.5 keeps {0, 1}.
  SamplingParams q;
  q.seed = 3;
  q.top_p = 0.5;
  Sampler t(q);
  seen.clear();
  for (int i = 0; i < 2000; ++i) seen.insert(t.Sample(logits, 5));
  EXPECT_EQ(seen, (std::set<int>{0, 1}));
  q.top_p = 0.3;  // only the top token reaches 0.3
  Sampler u(q);
  seen.clear();
  for (int i = 0; i < 500; ++i) seen.insert(u.Sample(logits, 5));
  EXPECT_EQ(seen, (std::set<int>{0}));
}

TEST(Sampler, ValidationNamesTheField) {
  SamplingLimits lim;
  lim.vocab_size = 100;
  lim.max_tokens = 1000;
  SamplingParams p;
  EXPECT_TRUE(ValidateSamplingParams(p, lim).ok());
  auto check = [&](SamplingParams bad, const std::string& field) {
    absl::Status st = ValidateSamplingParams(bad, lim);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(st.message().find(field), std::string::npos) << st.message();
  };
  SamplingParams b = p;
  b.temperature = -1;
  check(b, "temperature");
  b = p;
  b.temperature = NAN;
  check(b, "temperature");
  b = p;
  b.top_p = 0;
  check(b, "top_p");
  b = p;
  b.top_p = 1.5;
  check(b, "top_p");
  b = p;
  b.top_k = -2;
  check(b, "top_k");
  b = p;
  b.max_tokens = 0;
  check(b, "max_tokens");
  b = p;
  b.max_tokens = 1001;
  check(b, "max_tokens");
  b = p;
  b.stop_token_ids = {100};
  check(b, "stop_token_ids");
  b = p;
  b.stop_strings = {""};
  check(b, "stop_strings");
}

TEST(StopMatcher, HoldsBackPossiblePrefixesAndCutsAtMatch) {
  StopMatcher m({"END", "\n\n"});
  bool stopped = false;
  EXPECT_EQ(m.Push("hello E", &stopped), "hello ");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(m.Push("N", &stopped), "");
  EXPECT_EQ(m.Push("X more", &stopped), "ENX more");
  EXPECT_EQ(m.Push(" fin\n", &stopped), " fin");
  EXPECT_EQ(m.Push("\nafter", &stopped), "");
  EXPECT_TRUE(stopped);
}

TEST(StopMatcher, EarliestMatchAcrossDeltasAndFlush) {
  StopMatcher m({"bc", "abcd"});
  bool stopped = false;
  EXPECT_EQ(m.Push("xa", &stopped), "x");
  // "abcd" starts before "bc": the earliest match start wins.
  EXPECT_EQ(m.Push("bcd", &stopped), "");
  EXPECT_TRUE(stopped);
  StopMatcher n({"zz"});
  EXPECT_EQ(n.Push("abz", &stopped), "ab");
  EXPECT_EQ(n.Flush(), "z");
  StopMatcher none({});
  EXPECT_EQ(none.Push("anything", &stopped), "anything");
}

}  // namespace
}  // namespace kl
