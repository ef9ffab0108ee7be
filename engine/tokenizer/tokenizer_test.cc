// Tokenizer behaviour on a hand-made vocabulary with worked-out ids, and
// round trips on a synthetic one.
#include "engine/tokenizer/tokenizer.h"

#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/synthetic.h"
#include "engine/tokenizer/test_util.h"
#include "engine/tokenizer/utf8.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

using Ids = std::vector<int32_t>;

// 256 bytes, then merges chosen so the expected ids below can be derived by
// hand. R = 267 ranks, so specials start at 267.
constexpr int32_t kR = 267;
const std::vector<std::string>& SmallMerges() {
  static const auto* merges = new std::vector<std::string>{
      "he", "ll", "hell", "hello", " w", "or", " wor", "ld", " world",
      "\xE4\xB8", "\xE4\xB8\xAD" /* 中 */};
  return *merges;
}

std::string SmallConfig() {
  return absl::StrCat(R"({"added_tokens_decoder": {)",
                      R"("267": {"content": "[BOS]", "special": true},)",
                      R"("268": {"content": "[EOS]", "special": true},)",
                      R"("269": {"content": "<|im_end|>", "special": true},)",
                      R"("270": {"content": "<|im_user|>", "special": true},)",
                      R"("278": {"content": "<|tool_call_begin|>", "special": false},)",
                      R"("280": {"content": "[X]", "special": true},)",
                      R"("281": {"content": "[X]Y", "special": true},)",
                      R"("522": {"content": "[PAD]", "special": true}},)",
                      R"("bos_token": "[BOS]", "eos_token": {"content": "[EOS]"}})");
}

class SmallTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = testing::MakeTempDir("small");
    ASSERT_TRUE(testing::WriteFile(
        dir + "/tiktoken.model",
        testing::RankFileText(testing::ByteRanksPlus(SmallMerges()))).ok());
    ASSERT_TRUE(testing::WriteFile(dir + "/tokenizer_config.json", SmallConfig()).ok());
    auto tok = Tokenizer::Load(dir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = *std::move(tok);
  }
  std::string Decode(const Ids& ids) { return *tok_->Decode(ids); }
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(SmallTokenizerTest, EncodesToHandDerivedIds) {
  // "hello" and " world" are pieces that are themselves ranks.
  EXPECT_EQ(tok_->Encode("hello world", true), (Ids{259, 264}));
  // "helloo": hello(259) + o.
  EXPECT_EQ(tok_->Encode("helloo", false), (Ids{259, 'o'}));
  // " worlds" is one piece: merges give " wor"+"ld" -> " world", then s.
  EXPECT_EQ(tok_->Encode(" worlds", false), (Ids{264, 's'}));
  // 中文 is one Han piece: E4 B8 -> 265, 265 AD -> 266, 文 stays bytes.
  EXPECT_EQ(tok_->Encode("中文", false), (Ids{266, 0xE6, 0x96, 0x87}));
  EXPECT_EQ(tok_->Encode("", true), Ids{});
}

TEST_F(SmallTokenizerTest, SpecialTokensAllowedOrNot) {
  const std::string text = "hello<|im_end|> world";
  EXPECT_EQ(tok_->Encode(text, true), (Ids{259, 269, 264}));
  // As text: "<|" "im" "_end" "|>" are ordinary pieces.
  EXPECT_EQ(tok_->Encode(text, false),
            (Ids{259, '<', '|', 'i', 'm', '_', 'e', 'n', 'd', '|', '>', 264}));
  EXPECT_EQ(Decode(tok_->Encode(text, true)), text);
  EXPECT_EQ(Decode(tok_->Encode(text, false)), text);
  // Unnamed reserved slots are specials too; the longest match wins.
  EXPECT_EQ(tok_->Encode("<|reserved_token_300|>[X]Y[X]", true),
            (Ids{300, 281, 280}));
  // Slot R+256 does not exist here (see tokenizer.h): plain text.
  for (int32_t id : tok_->Encode("<|reserved_token_523|>", true)) {
    EXPECT_LT(id, kR);
  }
  // Broken special tokens are text.
  EXPECT_EQ(tok_->Encode("<|im_end|", true), tok_->Encode("<|im_end|", false));
}

TEST_F(SmallTokenizerTest, SpecialTokenCutByTheRunLimitIsText) {
  // 24,998 'a' + 10 non-space chars: the 25,000-run split falls inside the
  // special token, so (as in Python) it is not recognized.
  const std::string cut = std::string(24998, 'a') + "<|im_end|>";
  for (int32_t id : tok_->Encode(cut, true)) ASSERT_LT(id, kR);
  const Ids whole = tok_->Encode(std::string(100, 'a') + "<|im_end|>", true);
  EXPECT_EQ(whole.back(), 269);
}

TEST_F(SmallTokenizerTest, Accessors) {
  EXPECT_EQ(tok_->num_ranks(), kR);
  EXPECT_EQ(tok_->vocab_size(), kR + 256);
  EXPECT_EQ(*tok_->SpecialTokenId("<|im_end|>"), 269);
  EXPECT_EQ(*tok_->SpecialTokenId("<|reserved_token_271|>"), 271);
  EXPECT_EQ(tok_->SpecialTokenId("hello").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(*tok_->TokenBytes(259), "hello");
  EXPECT_EQ(*tok_->TokenBytes(272), "<|reserved_token_272|>");
  EXPECT_EQ(*tok_->TokenBytes(522), "[PAD]");
  EXPECT_FALSE(tok_->TokenBytes(523).ok());
  EXPECT_FALSE(tok_->TokenBytes(-1).ok());
  EXPECT_TRUE(tok_->IsSpecial(267));
  EXPECT_TRUE(tok_->IsSpecial(522));
  EXPECT_FALSE(tok_->IsSpecial(266));
  EXPECT_FALSE(tok_->IsSpecial(523));
  EXPECT_TRUE(tok_->IsMarkedSpecial(269));
  EXPECT_FALSE(tok_->IsMarkedSpecial(278));  // "special": false in the config
  EXPECT_FALSE(tok_->IsMarkedSpecial(271));  // unnamed
  EXPECT_EQ(tok_->bos_id(), 267);
  EXPECT_EQ(tok_->eos_id(), 268);
  EXPECT_EQ(tok_->pad_id(), 522);
  EXPECT_EQ(tok_->unk_id(), -1);  // no [UNK] here
  EXPECT_EQ(tok_->im_end_id(), 269);
}

TEST_F(SmallTokenizerTest, DecodeRejectsUnknownIds) {
  EXPECT_EQ(Decode({259, 269, 264}), "hello<|im_end|> world");
  const auto bad = tok_->Decode({259, 523});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("523"), std::string::npos);
  EXPECT_FALSE(tok_->Decode({-5}).ok());
}

TEST_F(SmallTokenizerTest, InvalidUtf8IsEncodedByteExact) {
  const std::string bytes = "he\xFF\xFEllo \xE4\xB8 w\xC0";
  const Ids ids = tok_->Encode(bytes, true);
  EXPECT_EQ(Decode(ids), bytes);
  // "\xE4\xB8" is its own piece and a rank.
  EXPECT_NE(std::find(ids.begin(), ids.end(), 265), ids.end());
}

class SyntheticRoundTripTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::MakeTempDir("roundtrip");
    ASSERT_TRUE(WriteSyntheticTokenizer(dir, 8192, 11).ok());
    auto tok = Tokenizer::Load(dir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = tok->release();
  }
  static void TearDownTestSuite() { delete tok_; }
  static void ExpectRoundTrip(const std::string& text) {
    for (const bool allow : {true, false}) {
      const Ids ids = tok_->Encode(text, allow);
      const auto decoded = tok_->Decode(ids);
      ASSERT_TRUE(decoded.ok());
      ASSERT_EQ(*decoded, text) << "allow_special=" << allow << " text '"
                                << absl::CHexEscape(text.substr(0, 100)) << "'";
    }
  }
  static Tokenizer* tok_;
};
Tokenizer* SyntheticRoundTripTest::tok_ = nullptr;

TEST_F(SyntheticRoundTripTest, RandomUtf8) {
  std::mt19937_64 rng(42);
  const std::vector<std::string> specials = {"<|im_end|>", "[BOS]", "<|im_middle|>"};
  for (int i = 0; i < 2000; ++i) {
    const std::string text = testing::RandomUtf8(rng, rng() % 200, specials);
    ASSERT_TRUE(IsValidUtf8(text));
    ExpectRoundTrip(text);
  }
}

TEST_F(SyntheticRoundTripTest, RandomBytes) {
  std::mt19937_64 rng(43);
  for (int i = 0; i < 2000; ++i) {
    ExpectRoundTrip(testing::RandomBytes(rng, rng() % 300));
    ExpectRoundTrip(testing::RandomMostlyUtf8(rng, rng() % 200));
  }
}

TEST_F(SyntheticRoundTripTest, LongAndPathologicalInputs) {
  ExpectRoundTrip(std::string(100000, ' '));
  ExpectRoundTrip(std::string(100000, 'x'));
  ExpectRoundTrip(std::string(50000, '\xFF'));
  std::string mixed;
  std::mt19937_64 rng(44);
  while (mixed.size() < 500000) mixed += testing::RandomMostlyUtf8(rng, 500);
  ExpectRoundTrip(mixed);
}

TEST_F(SyntheticRoundTripTest, ConcurrentEncodingMatchesSerial) {
  std::mt19937_64 rng(45);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back(testing::RandomMostlyUtf8(rng, 300));
  std::vector<Ids> serial;
  for (const std::string& t : texts) serial.push_back(tok_->Encode(t, true));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&texts, &serial, &mismatches, k] {
      for (int rep = 0; rep < 5; ++rep) {
        for (size_t i = k; i < texts.size(); i += 1 + k) {
          if (tok_->Encode(texts[i], true) != serial[i]) ++mismatches;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_F(SyntheticRoundTripTest, SpecialsBecomeSingleIds) {
  const int32_t im_end = tok_->im_end_id();
  ASSERT_GE(im_end, 0);
  const Ids ids = tok_->Encode("Hi<|im_end|>", true);
  EXPECT_EQ(ids.back(), im_end);
  const Ids text = tok_->Encode("Hi<|im_end|>", false);
  EXPECT_EQ(std::count(text.begin(), text.end(), im_end), 0);
  EXPECT_GT(text.size(), ids.size());
}

}  // namespace
}  // namespace kl
