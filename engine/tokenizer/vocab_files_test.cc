// Every malformed tokenizer folder is rejected with a message naming the file,
// the line (for tiktoken.model) and the problem.
#include "engine/tokenizer/vocab_files.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "engine/tokenizer/test_util.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

constexpr char kGoodConfig[] =
    R"({"added_tokens_decoder": {"257": {"content": "[BOS]", "special": true},
        "259": {"content": "<|im_end|>", "special": true}}})";

// A folder with 256 byte ranks + "ab" (rank 256), so specials start at 257.
struct Folder {
  std::string dir;
  std::string model;
  std::string config = kGoodConfig;
  Folder() : dir(testing::MakeTempDir("vocab")),
             model(testing::RankFileText(testing::ByteRanksPlus({"ab"}))) {}
  absl::Status Load() {
    EXPECT_TRUE(testing::WriteFile(dir + "/tiktoken.model", model).ok());
    EXPECT_TRUE(testing::WriteFile(dir + "/tokenizer_config.json", config).ok());
    return Tokenizer::Load(dir).status();
  }
};

// Expects `status` to fail with `code` and a message containing each part.
void ExpectError(const absl::Status& status, absl::StatusCode code,
                 const std::vector<std::string>& parts) {
  EXPECT_EQ(status.code(), code) << status;
  for (const std::string& part : parts) {
    EXPECT_NE(status.message().find(part), std::string::npos)
        << "'" << status.message() << "' lacks '" << part << "'";
  }
}

// Replaces line `line` (1-based) of a rank file.
std::string ReplaceLine(const std::string& text, int line, const std::string& with) {
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  lines[line - 1] = with;
  return absl::StrJoin(lines, "\n");
}

TEST(VocabFilesTest, GoodFolderLoads) {
  Folder f;
  f.model = absl::StrReplaceAll(f.model, {{"\n", "\r\n"}}) + "\n\n";  // tolerated
  ASSERT_TRUE(f.Load().ok()) << f.Load();
}

TEST(VocabFilesTest, MissingFiles) {
  const std::string empty = testing::MakeTempDir("empty");
  ExpectError(Tokenizer::Load(empty).status(), absl::StatusCode::kNotFound,
              {empty + "/tiktoken.model", "No such file"});
  Folder f;
  ASSERT_TRUE(f.Load().ok());
  std::remove((f.dir + "/tokenizer_config.json").c_str());
  ExpectError(Tokenizer::Load(f.dir).status(), absl::StatusCode::kNotFound,
              {"tokenizer_config.json"});
}

TEST(VocabFilesTest, BadBase64) {
  Folder f;
  f.model = ReplaceLine(f.model, 3, "QQ=! 2");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:3: invalid base64 token 'QQ=!'"});
  f.model = ReplaceLine(f.model, 3, "QQ 2");  // unpadded
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:3: invalid base64"});
}

TEST(VocabFilesTest, BadFieldsAndRanks) {
  Folder f;
  const std::string good = f.model;
  f.model = ReplaceLine(good, 5, "BA== 4 extra");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:5: expected '<base64 token> <rank>', got 3 fields"});
  f.model = ReplaceLine(good, 5, "BA== -4");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:5: invalid rank '-4'"});
  f.model = ReplaceLine(good, 5, "BA== four");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:5: invalid rank 'four'"});
  f.model = "";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model: no ranks"});
}

TEST(VocabFilesTest, DuplicateRank) {
  Folder f;
  // Line 258 ("ab 256") claims rank 4, already on line 5.
  f.model = ReplaceLine(f.model, 257, "YWI= 4");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:257: duplicate rank 4 (first on line 5)"});
}

TEST(VocabFilesTest, DuplicateToken) {
  Folder f;
  f.model = ReplaceLine(f.model, 257, "QQ== 256");  // "A" again
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:257: duplicate token 'A' (first on line 66)"});
}

TEST(VocabFilesTest, NonContiguousRanks) {
  Folder f;
  f.model = ReplaceLine(f.model, 257, "YWI= 300");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model:257: ranks are not contiguous: rank 300 with only "
               "257 tokens (rank 256 is missing)"});
}

TEST(VocabFilesTest, MissingSingleByte) {
  Folder f;
  // Rank 65 ("A") becomes "AA": 'A' has no rank any more.
  f.model = ReplaceLine(f.model, 66, "QUE= 65");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tiktoken.model: no rank for the single byte 0x41"});
}

TEST(VocabFilesTest, BadJson) {
  Folder f;
  f.config = "{\"added_tokens_decoder\": {\n  \"257\": }";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tokenizer_config.json: invalid JSON", "line 2"});
  // A number beyond double throws out_of_range rather than parse_error.
  f.config = R"({"model_max_length": 1e99999})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tokenizer_config.json: invalid JSON"});
  f.config = "[1, 2]";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tokenizer_config.json: top level is not a JSON object"});
  f.config = R"({"bos_token": "[BOS]"})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tokenizer_config.json: missing \"added_tokens_decoder\" object"});
}

TEST(VocabFilesTest, BadAddedTokens) {
  Folder f;
  f.config = R"({"added_tokens_decoder": {"x1": {"content": "[BOS]"}}})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"added_tokens_decoder key 'x1' is not a token id"});
  f.config = R"({"added_tokens_decoder": {"257": {"special": true}}})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"added_tokens_decoder[\"257\"] needs a non-empty string \"content\""});
  f.config = R"({"added_tokens_decoder": {"257": {"content": "a", "special": 1}}})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"added_tokens_decoder[\"257\"].special is not a boolean"});
  f.config = R"({"added_tokens_decoder": {"257": {"content": "[A]"},
                                            "258": {"content": "[A]"}}})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"added token '[A]' appears twice (ids 257 and 258)"});
}

TEST(VocabFilesTest, SpecialIdCollidesWithARank) {
  Folder f;
  f.config = R"({"added_tokens_decoder": {"100": {"content": "[BOS]"}}})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tokenizer_config.json: added token 100 '[BOS]' collides with BPE "
               "rank 100", "special ids start at 257"});
}

TEST(VocabFilesTest, SpecialIdOutsideTheReservedRange) {
  Folder f;
  f.config = R"({"added_tokens_decoder": {"515": {"content": "[FAR]"}}})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"added token 515 '[FAR]' is outside the reserved special range "
               "[257, 515)"});
  // R + 256 and R + 257 are accepted when named (tokenization_kimi.py's +2).
  f.config = R"({"added_tokens_decoder": {"514": {"content": "[NEAR]"}}})";
  ASSERT_TRUE(f.Load().ok());
  auto tok = Tokenizer::Load(f.dir);
  EXPECT_EQ((*tok)->vocab_size(), 515);
  EXPECT_EQ(*(*tok)->SpecialTokenId("[NEAR]"), 514);
}

TEST(VocabFilesTest, SpecialNameClashesWithAReservedName) {
  Folder f;
  f.config = R"({"added_tokens_decoder": {"257": {"content": "<|reserved_token_258|>"}}})";
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"special token '<|reserved_token_258|>' names both id 257 and id 258"});
}

TEST(VocabFilesTest, RoleTokenThatIsNotSpecial) {
  Folder f;
  f.config = absl::StrCat(R"({"added_tokens_decoder": {"257": {"content": "[BOS]"}},)",
                          R"("bos_token": "<s>"})");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"tokenizer_config.json: bos_token '<s>' is not one of the special tokens"});
  f.config = absl::StrCat(R"({"added_tokens_decoder": {"257": {"content": "[BOS]"}},)",
                          R"("eos_token": 5})");
  ExpectError(f.Load(), absl::StatusCode::kInvalidArgument,
              {"\"eos_token\" must be a string or an object"});
}

TEST(Base64Test, RoundTripAndStrictness) {
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  for (size_t n = 0; n <= all.size(); n += 37) {
    std::string out;
    ASSERT_TRUE(Base64Decode(Base64Encode(all.substr(0, n)), &out));
    EXPECT_EQ(out, all.substr(0, n));
  }
  std::string out;
  EXPECT_TRUE(Base64Decode("YWI=", &out));
  EXPECT_EQ(out, "ab");
  EXPECT_FALSE(Base64Decode("YWJ=", &out));  // non-canonical padding bits
  EXPECT_FALSE(Base64Decode("Y=I=", &out));
  EXPECT_FALSE(Base64Decode("YW I", &out));
  EXPECT_FALSE(Base64Decode("YWI", &out));
}

}  // namespace
}  // namespace kl
