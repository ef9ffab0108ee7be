// The synthetic tokenizer writer: deterministic, loadable, Kimi's special
// layout, BPE-reachable tokens, and fast enough for the 163,840 vocabulary.
#include "engine/tokenizer/synthetic.h"

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "engine/tokenizer/kimi_special_tokens.h"
#include "engine/tokenizer/test_util.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(SyntheticTest, SpecialIdsFollowKimisLayout) {
  const SyntheticSpecialIds kimi = SpecialIdsForVocab(163840);
  EXPECT_EQ(kimi.bos, 163584);
  EXPECT_EQ(kimi.eos, 163586);
  EXPECT_EQ(kimi.pad, 163839);
  const SyntheticSpecialIds small = SpecialIdsForVocab(1024);
  EXPECT_EQ(small.bos, 768);
  EXPECT_EQ(small.eos, 770);
  EXPECT_EQ(small.pad, 1023);
}

TEST(SyntheticTest, DeterministicFromTheSeed) {
  const std::string a = testing::MakeTempDir("syn_a");
  const std::string b = testing::MakeTempDir("syn_b");
  const std::string c = testing::MakeTempDir("syn_c");
  ASSERT_TRUE(WriteSyntheticTokenizer(a, 5000, 99).ok());
  ASSERT_TRUE(WriteSyntheticTokenizer(b, 5000, 99).ok());
  ASSERT_TRUE(WriteSyntheticTokenizer(c, 5000, 100).ok());
  for (const char* file :
       {"/tiktoken.model", "/tokenizer_config.json", "/special_tokens_map.json"}) {
    EXPECT_EQ(ReadAll(a + file), ReadAll(b + file)) << file;
    EXPECT_FALSE(ReadAll(a + file).empty()) << file;
  }
  EXPECT_NE(ReadAll(a + "/tiktoken.model"), ReadAll(c + "/tiktoken.model"));
}

TEST(SyntheticTest, LoadsWithKimisSpecialTokens) {
  const std::string dir = testing::MakeTempDir("syn_load");
  constexpr int64_t kVocab = 3000;
  ASSERT_TRUE(WriteSyntheticTokenizer(dir, kVocab, 1).ok());
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Tokenizer& t = **tok;
  EXPECT_EQ(t.vocab_size(), kVocab);
  EXPECT_EQ(t.num_ranks(), kVocab - 256);
  const SyntheticSpecialIds ids = SpecialIdsForVocab(kVocab);
  EXPECT_EQ(t.bos_id(), ids.bos);
  EXPECT_EQ(t.im_end_id(), ids.eos);
  EXPECT_EQ(t.pad_id(), ids.pad);
  EXPECT_EQ(t.eos_id(), ids.bos + 1);  // tokenizer-level "[EOS]", as in Kimi
  for (const KimiNamedSpecialToken& s : kKimiNamedSpecialTokens) {
    EXPECT_EQ(*t.SpecialTokenId(s.content), t.num_ranks() + s.offset) << s.content;
    EXPECT_EQ(t.IsMarkedSpecial(t.num_ranks() + s.offset), s.special);
  }
  EXPECT_EQ(*t.TokenBytes(t.num_ranks() + 5),
            "<|reserved_token_" + std::to_string(t.num_ranks() + 5) + "|>");
  EXPECT_NE(ReadAll(dir + "/special_tokens_map.json").find("\"[PAD]\""),
            std::string::npos);
}

TEST(SyntheticTest, RealTextUsesMultiByteTokens) {
  const std::string dir = testing::MakeTempDir("syn_text");
  ASSERT_TRUE(WriteSyntheticTokenizer(dir, 8192, 2).ok());
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok());
  // Byte-level BPE would give 1 byte per token; code cannot beat ~2 because
  // the regex already cuts it into short pieces.
  const std::pair<std::string, double> cases[] = {
      {"The scheduler waits when the cache is full, and the worker streams "
       "the text back to the client.", 4.0},
      {"今天天气很好，我们去公园散步吧。大型语言模型可以回答问题。", 3.0},
      {"  for (int i = 0; i < 10; ++i) buffer.Push(i * i);", 2.0},
  };
  for (const auto& [text, min_bytes_per_token] : cases) {
    const size_t n = (*tok)->Encode(text, false).size();
    EXPECT_GE(static_cast<double>(text.size()) / n, min_bytes_per_token)
        << n << " tokens for '" << text << "'";
  }
}

TEST(SyntheticTest, EveryTokenIsAMergeOfTwoLowerRanks) {
  auto ranks = BuildSyntheticRanks(20000, 3);
  ASSERT_TRUE(ranks.ok()) << ranks.status();
  ASSERT_EQ(ranks->size(), 20000u);
  absl::flat_hash_map<std::string, int32_t> rank_of;
  for (int32_t r = 0; r < static_cast<int32_t>(ranks->size()); ++r) {
    ASSERT_TRUE(rank_of.emplace((*ranks)[r], r).second) << "duplicate at " << r;
  }
  for (int b = 0; b < 256; ++b) EXPECT_EQ((*ranks)[b], std::string(1, char(b)));
  for (int32_t r = 256; r < static_cast<int32_t>(ranks->size()); ++r) {
    const std::string& t = (*ranks)[r];
    bool found = false;
    for (size_t k = 1; k < t.size() && !found; ++k) {
      const auto left = rank_of.find(t.substr(0, k));
      const auto right = rank_of.find(t.substr(k));
      found = left != rank_of.end() && right != rank_of.end() &&
              left->second < r && right->second < r;
    }
    ASSERT_TRUE(found) << "rank " << r << " is not a merge of lower ranks";
  }
}

TEST(SyntheticTest, KimiSizedVocabularyIsFast) {
  const std::string dir = testing::MakeTempDir("syn_big");
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(WriteSyntheticTokenizer(dir, 163840, 0).ok());
  const double write_s = std::chrono::duration<double>(
      std::chrono::steady_clock::now() - start).count();
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const double total_s = std::chrono::duration<double>(
      std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ((*tok)->vocab_size(), 163840);
  EXPECT_EQ(*(*tok)->SpecialTokenId("<|im_end|>"), 163586);
  EXPECT_EQ(*(*tok)->SpecialTokenId("[PAD]"), 163839);
  std::cout << "write " << write_s << " s, write+load " << total_s << " s\n";
  EXPECT_LT(write_s, 20.0);  // seconds in practice; generous for slow CI
}

TEST(SyntheticTest, RejectsBadArguments) {
  const std::string dir = testing::MakeTempDir("syn_bad");
  EXPECT_EQ(WriteSyntheticTokenizer(dir, 511, 0).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSyntheticTokenizer(dir, kMaxSyntheticVocabSize + 1, 0).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(testing::WriteFile(dir + "/file", "x").ok());
  EXPECT_FALSE(WriteSyntheticTokenizer(dir + "/file/sub", 1024, 0).ok());
  EXPECT_TRUE(WriteSyntheticTokenizer(dir + "/new/nested", 512, 0).ok());
}

}  // namespace
}  // namespace kl
