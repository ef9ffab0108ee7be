// BPE merges on hand-made rank tables with worked-out expected ids, and the
// scan and heap strategies agreeing on random tables.
#include "engine/tokenizer/bpe.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kl {
namespace {

RankMap ByteRanks() {
  RankMap ranks;
  for (int b = 0; b < 256; ++b) ranks.emplace(std::string(1, char(b)), b);
  return ranks;
}

std::vector<int32_t> Encode(absl::string_view piece, const RankMap& ranks) {
  std::vector<int32_t> out;
  BytePairEncode(piece, ranks, &out);
  return out;
}

TEST(BpeTest, MergesLowestRankFirst) {
  RankMap ranks = ByteRanks();
  ranks.emplace("ab", 256);
  ranks.emplace("bc", 257);
  ranks.emplace("abc", 258);
  ranks.emplace("cd", 259);
  // ab(256) < bc(257) < cd(259): [ab c d] -> abc(258) < cd(259): [abc d].
  EXPECT_EQ(Encode("abcd", ranks), (std::vector<int32_t>{258, 'd'}));
  // Order decides: with bc cheaper than ab, "abc" splits as a|bc.
  RankMap other = ByteRanks();
  other.emplace("bc", 256);
  other.emplace("ab", 257);
  EXPECT_EQ(Encode("abc", other), (std::vector<int32_t>{'a', 256}));
  other.emplace("abc", 258);
  other.emplace("abcd", 259);
  // [x a bc d] -> a+bc = abc(258) -> [x abc d] -> abc+d = abcd(259).
  EXPECT_EQ(Encode("xabcd", other), (std::vector<int32_t>{'x', 259}));
}

TEST(BpeTest, TiesGoToTheLeftmostPair) {
  RankMap ranks = ByteRanks();
  ranks.emplace("aa", 256);
  // aaaaa: [aa a a a] -> [aa aa a] -> no more.
  EXPECT_EQ(Encode("aaaaa", ranks), (std::vector<int32_t>{256, 256, 'a'}));
  ranks.emplace("aaaa", 257);
  EXPECT_EQ(Encode("aaaaa", ranks), (std::vector<int32_t>{257, 'a'}));
}

TEST(BpeTest, APieceThatIsARankMapsDirectly) {
  RankMap ranks = ByteRanks();
  ranks.emplace("xyz", 256);  // no "xy" or "yz": merging alone cannot reach it
  EXPECT_EQ(Encode("xyz", ranks), (std::vector<int32_t>{256}));
  std::vector<int32_t> merged;
  BytePairMergeScan("xyz", ranks, &merged);
  EXPECT_EQ(merged, (std::vector<int32_t>{'x', 'y', 'z'}));
  EXPECT_EQ(Encode("", ranks), std::vector<int32_t>{});
  EXPECT_EQ(Encode("q", ranks), (std::vector<int32_t>{'q'}));
}

TEST(BpeTest, HeapAndScanAgreeOnRandomTables) {
  std::mt19937_64 rng(1234);
  for (int table = 0; table < 20; ++table) {
    // Random merges over a 4-letter alphabet, so many overlap and tie.
    RankMap ranks = ByteRanks();
    std::vector<std::string> tokens;
    for (int b = 0; b < 4; ++b) tokens.emplace_back(1, char('a' + b));
    for (int m = 0; m < 60; ++m) {
      const std::string t = tokens[rng() % tokens.size()] + tokens[rng() % tokens.size()];
      if (ranks.emplace(t, 256 + m).second) tokens.push_back(t);
    }
    for (int trial = 0; trial < 50; ++trial) {
      std::string piece;
      const size_t len = 1 + rng() % 300;
      for (size_t i = 0; i < len; ++i) piece.push_back(char('a' + rng() % 4));
      std::vector<int32_t> scan, heap;
      BytePairMergeScan(piece, ranks, &scan);
      BytePairMergeHeap(piece, ranks, &heap);
      ASSERT_EQ(scan, heap) << "table " << table << " piece " << piece;
      std::string joined;
      for (int32_t id : heap) {
        for (const auto& [bytes, rank] : ranks) {
          if (rank == id) joined += bytes;
        }
      }
      ASSERT_EQ(joined, piece);
    }
  }
}

TEST(BpeTest, LongPiecesAreFast) {
  RankMap ranks = ByteRanks();
  ranks.emplace("ab", 256);
  ranks.emplace("abab", 257);
  std::string piece;
  for (int i = 0; i < 100000; ++i) piece += "ab";
  std::vector<int32_t> out;
  BytePairEncode(piece, ranks, &out);  // O(n^2) would take minutes
  ASSERT_EQ(out.size(), 50000u);
  EXPECT_EQ(out.front(), 257);
}

}  // namespace
}  // namespace kl
