// Cross-check of the C++ encoder against Python's tiktoken (the library
// tokenization_kimi.py wraps) on a synthetic Kimi-format vocabulary: many
// seeded random strings plus long and pathological inputs, with special tokens
// allowed and not. Skips, saying why, when /usr/bin/python3 cannot import
// tiktoken (install: /usr/bin/python3 -m pip install --break-system-packages
// tiktoken).
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/synthetic.h"
#include "engine/tokenizer/test_util.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"

namespace kl {
namespace {

constexpr char kPython[] = "/usr/bin/python3";
constexpr int64_t kVocabSize = 40000;  // corpus merges and random fill
constexpr int kRandomStrings = 600;

int RunCommand(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string ScriptPath() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  return absl::StrCat(srcdir ? srcdir : ".", "/", workspace ? workspace : "",
                      "/engine/tokenizer/tiktoken_reference.py");
}

std::vector<std::string> ParityInputs(const Tokenizer& tok) {
  std::vector<std::string> specials;
  for (int32_t id = tok.num_ranks(); id < tok.vocab_size(); id += 7) {
    specials.emplace_back(*tok.TokenBytes(id));
  }
  specials.push_back("<|im_end|>");
  specials.push_back("[BOS]");
  std::mt19937_64 rng(20240601);
  std::vector<std::string> inputs = {
      "",
      "Hello, world! I'm here; they'LL see.",
      "中文English混合 text, 日本語のテキスト、한국어 문장!",
      "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>",
      // 39800 is an unnamed slot; 39999 is [PAD], so its reserved name is
      // plain text. (Python also registers <|reserved_token_40000|> and
      // 40001, beyond the vocabulary; we deliberately do not: tokenizer.h.)
      "a<|im_end|", "[BOS][EOS][PAD]<|reserved_token_39800|>x",
      "<|reserved_token_39999|>",
      std::string(30000, 'a'),
      std::string(30000, ' ') + "x",
      std::string(24998, 'a') + "<|im_end|>",  // special cut by the 25k split
  };
  std::string mixed;
  while (mixed.size() < 60000) mixed += testing::RandomUtf8(rng, 200, specials);
  inputs.push_back(mixed);
  std::string big;  // crosses the 400,000-character chunk boundary
  for (int i = 0; big.size() < 450000; ++i) {
    big += (i % 5 == 0) ? " word" : "ab";
    if (i % 1000 == 0) big += "<|im_end|>\n";
  }
  inputs.push_back(big);
  for (int i = 0; i < kRandomStrings; ++i) {
    inputs.push_back(testing::RandomUtf8(rng, 1 + rng() % 120, specials));
  }
  return inputs;
}

TEST(TiktokenParityTest, MatchesPythonTiktoken) {
  if (RunCommand(absl::StrCat(kPython, " -c 'import tiktoken' >/dev/null 2>&1")) != 0) {
    GTEST_SKIP() << kPython << " cannot import tiktoken; install it with `"
                 << kPython << " -m pip install --break-system-packages tiktoken`";
  }
  const std::string dir = testing::MakeTempDir("parity");
  ASSERT_TRUE(WriteSyntheticTokenizer(dir + "/tok", kVocabSize, 7).ok());
  auto tok = Tokenizer::Load(dir + "/tok");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<std::string> inputs = ParityInputs(**tok);
  {
    std::ofstream out(dir + "/inputs.json");
    out << nlohmann::json(inputs).dump();
  }
  const int rc = RunCommand(absl::StrCat(kPython, " ", ScriptPath(), " ", dir, "/tok ",
                                  dir, "/inputs.json ", dir, "/expected.json"));
  ASSERT_EQ(rc, 0) << "tiktoken_reference.py failed";
  std::ifstream in(dir + "/expected.json");
  const nlohmann::json expected = nlohmann::json::parse(in);
  EXPECT_EQ(expected["pat_str"].get<std::string>(), std::string(kKimiPatStr));
  const auto& results = expected["results"];
  ASSERT_EQ(results.size(), inputs.size());
  int mismatches = 0;
  for (size_t i = 0; i < inputs.size() && mismatches < 5; ++i) {
    for (const bool allow : {true, false}) {
      const auto want = results[i][allow ? "special" : "ordinary"]
                            .get<std::vector<int32_t>>();
      const std::vector<int32_t> got = (*tok)->Encode(inputs[i], allow);
      if (got != want) {
        ++mismatches;
        size_t at = 0;
        while (at < got.size() && at < want.size() && got[at] == want[at]) ++at;
        ADD_FAILURE() << "input " << i << " (allow_special=" << allow
                      << ", " << inputs[i].size() << " bytes) differs at id "
                      << at << "; text starts '"
                      << absl::CHexEscape(inputs[i].substr(0, 200)) << "'";
      }
    }
  }
  std::cout << "compared " << inputs.size() << " inputs with tiktoken "
            << expected["tiktoken_version"].get<std::string>() << "\n";
}

}  // namespace
}  // namespace kl
