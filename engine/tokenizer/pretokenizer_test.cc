// Known splits of Kimi's pre-tokenizer regex and of the Python wrapper's
// long-input splitting. Expected pieces are worked out by hand from the
// pattern's leftmost-first semantics.
#include "engine/tokenizer/pretokenizer.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

using Pieces = std::vector<std::string>;

class PreTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto p = PreTokenizer::Create();
    ASSERT_TRUE(p.ok()) << p.status();
    pre_ = *std::move(p);
  }
  Pieces Split(absl::string_view text) {
    Pieces out;
    for (absl::string_view piece : pre_->Split(text)) out.emplace_back(piece);
    return out;
  }
  std::unique_ptr<PreTokenizer> pre_;
};

TEST_F(PreTokenizerTest, WordsTakeTheirLeadingSpace) {
  EXPECT_EQ(Split("Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(Split(""), Pieces{});
}

TEST_F(PreTokenizerTest, Contractions) {
  EXPECT_EQ(Split("I'm don't they'LL"), (Pieces{"I'm", " don't", " they'LL"}));
  EXPECT_EQ(Split("we're you've it's"), (Pieces{"we're", " you've", " it's"}));
  // The contraction only attaches to a preceding word.
  EXPECT_EQ(Split("we're"), (Pieces{"we're"}));
  EXPECT_EQ(Split("'s"), (Pieces{"'s"}));
  EXPECT_EQ(Split("x'z"), (Pieces{"x", "'z"}));
  // U+017F LONG S case-folds to 's' (Rust regex and PCRE2 agree).
  EXPECT_EQ(Split("it'\xC5\xBF"), (Pieces{"it'\xC5\xBF"}));
}

TEST_F(PreTokenizerTest, CaseRuns) {
  EXPECT_EQ(Split("HELLO world"), (Pieces{"HELLO", " world"}));
  EXPECT_EQ(Split("HTTPServer"), (Pieces{"HTTPServer"}));
  EXPECT_EQ(Split("camelCaseWord"), (Pieces{"camel", "Case", "Word"}));
  // U+01C5 (titlecase) counts as upper; combining marks as lower.
  EXPECT_EQ(Split("\xC7\x85ungla"), (Pieces{"\xC7\x85ungla"}));
  EXPECT_EQ(Split("cafe\xCC\x81 ok"), (Pieces{"cafe\xCC\x81", " ok"}));
}

TEST_F(PreTokenizerTest, DigitsInGroupsOfOneToThree) {
  EXPECT_EQ(Split("12345678"), (Pieces{"123", "456", "78"}));
  EXPECT_EQ(Split("a1234"), (Pieces{"a", "123", "4"}));
  EXPECT_EQ(Split("3.14"), (Pieces{"3", ".", "14"}));
  // Arabic-Indic digits are \p{N} too.
  EXPECT_EQ(Split("\xD9\xA3\xD9\xA4\xD9\xA5\xD9\xA6"),
            (Pieces{"\xD9\xA3\xD9\xA4\xD9\xA5", "\xD9\xA6"}));
}

TEST_F(PreTokenizerTest, HanRunsAreTheirOwnPieces) {
  EXPECT_EQ(Split("中文English混合"), (Pieces{"中文", "English", "混合"}));
  EXPECT_EQ(Split(" 中文"), (Pieces{" ", "中文"}));
  EXPECT_EQ(Split("日本語のテキスト"), (Pieces{"日本語", "のテキスト"}));
  // U+3005 (Lm) and U+3007 (Nl) have Script=Han.
  EXPECT_EQ(Split("人々〇x"), (Pieces{"人々〇", "x"}));
  // U+3001 has Script=Common (its Script_Extensions include Han): it must
  // not join the Han run. This is what \p{sc:Han} (not \p{Han}) is for.
  EXPECT_EQ(Split("中文、英文"), (Pieces{"中文", "、", "英文"}));
}

TEST_F(PreTokenizerTest, PunctuationKeepsTrailingNewlines) {
  EXPECT_EQ(Split("Hi!!\n\nThere"), (Pieces{"Hi", "!!\n\n", "There"}));
  EXPECT_EQ(Split("end ...\r\n"), (Pieces{"end", " ...\r\n"}));
  EXPECT_EQ(Split("a(b)"), (Pieces{"a", "(b", ")"}));
}

TEST_F(PreTokenizerTest, WhitespaceRuns) {
  EXPECT_EQ(Split("a   b"), (Pieces{"a", "  ", " b"}));
  EXPECT_EQ(Split("a   "), (Pieces{"a", "   "}));
  EXPECT_EQ(Split("a\n\n  b"), (Pieces{"a", "\n\n", " ", " b"}));
  EXPECT_EQ(Split("\t\tx"), (Pieces{"\t", "\tx"}));
  // U+3000 is White_Space; U+001C is not (although Python's isspace says so).
  EXPECT_EQ(Split("a\xE3\x80\x80\xE3\x80\x80" "b"),
            (Pieces{"a", "\xE3\x80\x80", "\xE3\x80\x80" "b"}));
  EXPECT_EQ(Split("a\x1C\x1C b"), (Pieces{"a", "\x1C\x1C", " b"}));
}

TEST_F(PreTokenizerTest, InvalidUtf8BytesArePiecesAndBoundaries) {
  EXPECT_EQ(Split("ab\xFF" "cd"), (Pieces{"ab", "\xFF", "cd"}));
  EXPECT_EQ(Split("a \x80\x80 b"), (Pieces{"a", " ", "\x80\x80", " b"}));
  EXPECT_EQ(Split("ab\xE4\xBD"), (Pieces{"ab", "\xE4\xBD"}));
  // A surrogate encoding and an overlong are invalid too.
  EXPECT_EQ(Split("x\xED\xA0\x80y\xC0\xAF"),
            (Pieces{"x", "\xED\xA0\x80", "y", "\xC0\xAF"}));
}

TEST_F(PreTokenizerTest, PiecesAlwaysConcatenateToTheInput) {
  std::string text;
  for (int i = 0; i < 256; ++i) text.push_back(static_cast<char>(i));
  text += "中文 English  \n\n 123 \xF0\x9F\x98\x80!!";
  std::string joined;
  for (absl::string_view p : pre_->Split(text)) {
    EXPECT_FALSE(p.empty());
    joined += std::string(p);
  }
  EXPECT_EQ(joined, text);
}

TEST_F(PreTokenizerTest, LongRunsDoNotOverflowTheJitStack) {
  const std::string spaces(30000, ' ');
  EXPECT_EQ(Split(spaces + "x"), (Pieces{std::string(29999, ' '), " x"}));
  const std::string letters(30000, 'a');
  EXPECT_EQ(Split(letters), (Pieces{letters}));
  std::string han;
  for (int i = 0; i < 20000; ++i) han += "中";
  EXPECT_EQ(Split(han + "!"), (Pieces{han, "!"}));
}

using Views = std::vector<absl::string_view>;

TEST(SplitForEncodingTest, RunsLongerThanTheLimitAreCut) {
  // Worked through TikTokenTokenizer._split_whitespaces_or_nonwhitespaces.
  EXPECT_EQ(SplitForEncoding("abc  defghij klmno p", 400000, 3),
            (Views{"abc  def", "ghi", "j klm", "no p"}));
  EXPECT_EQ(SplitForEncoding("     #####", 400000, 3),
            (Views{"   ", "  ###", "##"}));
  EXPECT_EQ(SplitForEncoding("short text", 400000, 25000),
            (Views{"short text"}));
  EXPECT_EQ(SplitForEncoding(""), Views{});
}

TEST(SplitForEncodingTest, ChunksRestartTheRunCount) {
  EXPECT_EQ(SplitForEncoding("aaaaaaa", 3, 25000), (Views{"aaa", "aaa", "a"}));
  EXPECT_EQ(SplitForEncoding("ab   cd", 4, 2), (Views{"ab  ", " cd"}));
}

TEST(SplitForEncodingTest, CountsCodePointsNotBytes) {
  EXPECT_EQ(SplitForEncoding("中中中中", 3, 25000), (Views{"中中中", "中"}));
  // Python's isspace: U+3000 and U+001C are spaces, U+200B is not.
  EXPECT_EQ(SplitForEncoding("a\xE3\x80\x80\x1C\xE3\x80\x80", 400000, 2),
            (Views{"a\xE3\x80\x80\x1C", "\xE3\x80\x80"}));
  // One invalid byte is one non-space character.
  EXPECT_EQ(SplitForEncoding("\xFF\xFF\xFF", 400000, 2),
            (Views{"\xFF\xFF", "\xFF"}));
}

TEST(SplitForEncodingTest, DefaultLimits) {
  const std::string text(60000, 'x');
  const Views parts = SplitForEncoding(text);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].size(), 25000u);
  EXPECT_EQ(parts[1].size(), 25000u);
  EXPECT_EQ(parts[2].size(), 10000u);
  std::string big;
  for (int i = 0; i < 500000; ++i) big += (i % 7 == 0) ? ' ' : 'y';
  const Views chunks = SplitForEncoding(big);
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].size(), static_cast<size_t>(kMaxEncodeChars));
}

TEST(Utf8Test, PythonIsSpace) {
  for (char32_t c : {0x09, 0x0A, 0x0D, 0x1C, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
                     0x2000, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000}) {
    EXPECT_TRUE(PythonIsSpace(c)) << std::hex << c;
  }
  for (char32_t c : {0x08, 0x21, 0x84, 0x180E, 0x200B, 0xFEFF, 0x1B}) {
    EXPECT_FALSE(PythonIsSpace(c)) << std::hex << c;
  }
}

TEST(Utf8Test, ReplaceInvalidFollowsMaximalSubparts) {
  // Examples from Unicode §3.9, Table 3-8: F1 80 80 is one subpart, E1 80 one,
  // C2 one, and 41 passes through.
  EXPECT_EQ(ReplaceInvalidUtf8("\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64"),
            "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" "b\xEF\xBF\xBD" "c"
            "\xEF\xBF\xBD\xEF\xBF\xBD" "d");
  EXPECT_EQ(ReplaceInvalidUtf8("\xED\xA0\x80"),
            "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3 subparts
  EXPECT_EQ(ReplaceInvalidUtf8("ok\xE4\xBD"), "ok\xEF\xBF\xBD");
  EXPECT_TRUE(IsValidUtf8("中文 ok \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("abcdefgh\xC0\x80"));
}

}  // namespace
}  // namespace kl
