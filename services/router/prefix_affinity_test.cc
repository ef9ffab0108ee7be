#include "services/router/prefix_affinity.h"

#include <vector>

#include "gtest/gtest.h"

namespace kl {
namespace {

std::vector<int32_t> Seq(int n, int32_t start = 0) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(start + i);
  return t;
}

TEST(PrefixAffinity, TheWorkerOfTheLongestRecordedProperPrefix) {
  PrefixAffinity a(100);
  EXPECT_EQ(a.Lookup(Seq(10)), "");
  a.Record(Seq(4), "p0");
  a.Record(Seq(8), "p1");
  a.Record(Seq(6, 50), "p2");
  EXPECT_EQ(a.Lookup(Seq(20)), "p1");
  EXPECT_EQ(a.Lookup(Seq(8)), "p0");  // itself is not a proper prefix
  EXPECT_EQ(a.Lookup(Seq(4)), "");
  EXPECT_EQ(a.Lookup(Seq(7, 50)), "p2");
  std::vector<int32_t> other = Seq(20);
  other[1] = 999;
  EXPECT_EQ(a.Lookup(other), "");
  a.Record(Seq(8), "p3");  // prefilled again elsewhere: the newer worker
  EXPECT_EQ(a.Lookup(Seq(9)), "p3");
  EXPECT_EQ(a.size(), 3);
}

TEST(PrefixAffinity, BoundedLeastRecentlyRecordedFirstOut) {
  PrefixAffinity a(2);
  a.Record(Seq(5, 0), "a");
  a.Record(Seq(5, 100), "b");
  a.Record(Seq(5, 0), "a");  // refreshed
  a.Record(Seq(5, 200), "c");
  EXPECT_EQ(a.size(), 2);
  EXPECT_EQ(a.Lookup(Seq(6, 0)), "a");
  EXPECT_EQ(a.Lookup(Seq(6, 100)), "");
  EXPECT_EQ(a.Lookup(Seq(6, 200)), "c");
  PrefixAffinity off(0);
  off.Record(Seq(5), "x");
  EXPECT_EQ(off.Lookup(Seq(6)), "");
}

}  // namespace
}  // namespace kl
