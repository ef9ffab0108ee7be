// Streaming detokenization: characters split across tokens are held back,
// output is always valid UTF-8, and the stream equals a one-shot
// decode(errors="replace") however the bytes are cut into tokens.
#include "engine/tokenizer/streaming_detokenizer.h"

#include <random>
#include <string>
#include <vector>

#include "engine/tokenizer/synthetic.h"
#include "engine/tokenizer/test_util.h"
#include "engine/tokenizer/utf8.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

constexpr char kFffd[] = "\xEF\xBF\xBD";

// 256 byte ranks plus tokens that cut characters: 中 = E4 B8 AD, 文 = E6 96 87.
class StreamingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = testing::MakeTempDir("stream");
    ASSERT_TRUE(testing::WriteFile(
        dir + "/tiktoken.model",
        testing::RankFileText(testing::ByteRanksPlus(
            {"\xE4\xB8", "\xAD\xE6", "\x96\x87", "\xF0\x9F"}))).ok());
    ASSERT_TRUE(testing::WriteFile(
        dir + "/tokenizer_config.json",
        R"({"added_tokens_decoder": {"260": {"content": "<|im_end|>"}}})").ok());
    auto tok = Tokenizer::Load(dir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = *std::move(tok);
  }
  static constexpr int32_t kE4B8 = 256, kADE6 = 257, k9687 = 258, kF09F = 259;
  static constexpr int32_t kImEnd = 260;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(StreamingTest, HoldsBackSplitCharacters) {
  StreamingDetokenizer d(tok_.get());
  EXPECT_EQ(d.Push(kE4B8), "");
  EXPECT_EQ(d.pending_bytes(), 2u);
  EXPECT_EQ(d.Push(kADE6), "中");  // completes 中, starts 文
  EXPECT_EQ(d.pending_bytes(), 1u);
  EXPECT_EQ(d.Push(k9687), "文");
  EXPECT_EQ(d.Push('!'), "!");
  EXPECT_EQ(d.Flush(), "");
}

TEST_F(StreamingTest, EmojiOneByteAtATime) {
  StreamingDetokenizer d(tok_.get());
  EXPECT_EQ(d.Push(kF09F), "");
  EXPECT_EQ(d.Push(0x98), "");
  EXPECT_EQ(d.Push(0x80), "\xF0\x9F\x98\x80");
}

TEST_F(StreamingTest, InvalidBytesBecomeReplacementCharacters) {
  StreamingDetokenizer d(tok_.get());
  EXPECT_EQ(d.Push(0xFF), kFffd);  // can never start a character
  EXPECT_EQ(d.Push(kE4B8), "");
  // 'a' cannot continue E4 B8: the held bytes are one maximal subpart.
  EXPECT_EQ(d.Push('a'), std::string(kFffd) + "a");
  EXPECT_EQ(d.Push(0xED), "");
  EXPECT_EQ(d.Push(0xA0), std::string(kFffd) + kFffd);  // surrogate: ED, then A0
  EXPECT_EQ(d.Push(kF09F), "");
  EXPECT_EQ(d.Flush(), kFffd);  // truncated at end of stream
  EXPECT_EQ(d.pending_bytes(), 0u);
  EXPECT_EQ(d.Push('b'), "b");  // reusable after Flush
}

TEST_F(StreamingTest, SpecialTokensAndUnknownIds) {
  StreamingDetokenizer keep(tok_.get());
  EXPECT_EQ(keep.Push(kImEnd), "<|im_end|>");
  StreamingDetokenizer skip(tok_.get(), /*skip_special_tokens=*/true);
  EXPECT_EQ(skip.Push(kE4B8), "");
  EXPECT_EQ(skip.Push(kImEnd), "");
  EXPECT_EQ(skip.Push(0xAD), "中");  // a skipped special does not cut 中
  EXPECT_EQ(skip.Push(kE4B8), "");
  EXPECT_EQ(skip.Push(99999), std::string(kFffd) + kFffd);
  EXPECT_EQ(skip.invalid_ids(), 1);
  EXPECT_EQ(skip.Push(-1), kFffd);
  EXPECT_EQ(skip.invalid_ids(), 2);
}

// Streams `ids`, checking every delta, and returns the concatenation.
std::string StreamAll(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  StreamingDetokenizer d(&tok);
  std::string out;
  for (int32_t id : ids) {
    const std::string delta = d.Push(id);
    EXPECT_TRUE(IsValidUtf8(delta));
    EXPECT_LE(d.pending_bytes(), 3u);
    out += delta;
  }
  const std::string tail = d.Flush();
  EXPECT_TRUE(IsValidUtf8(tail));
  return out + tail;
}

TEST_F(StreamingTest, SingleByteTokensMatchOneShotDecode) {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 500; ++i) {
    const std::string bytes = testing::RandomMostlyUtf8(rng, rng() % 100);
    std::vector<int32_t> ids;
    for (unsigned char c : bytes) ids.push_back(c);
    ASSERT_EQ(StreamAll(*tok_, ids), ReplaceInvalidUtf8(bytes));
  }
}

TEST(StreamingSyntheticTest, EncodedTextMatchesOneShotDecode) {
  const std::string dir = testing::MakeTempDir("stream_synth");
  ASSERT_TRUE(WriteSyntheticTokenizer(dir, 6000, 3).ok());
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::mt19937_64 rng(8);
  int split_characters = 0;
  for (int i = 0; i < 1000; ++i) {
    const std::string text = i % 2 ? testing::RandomUtf8(rng, rng() % 150)
                                   : testing::RandomMostlyUtf8(rng, rng() % 150);
    const std::vector<int32_t> ids = (*tok)->Encode(text, true);
    ASSERT_EQ(StreamAll(**tok, ids), ReplaceInvalidUtf8(*(*tok)->Decode(ids)));
    if (i % 2) {
      ASSERT_EQ(StreamAll(**tok, ids), text);
    }
    for (int32_t id : ids) {
      const absl::string_view b = *(*tok)->TokenBytes(id);
      split_characters += !IsValidUtf8(b);
    }
  }
  // The vocabulary really does cut characters, so holding back was exercised.
  EXPECT_GT(split_characters, 100);
}

}  // namespace
}  // namespace kl
