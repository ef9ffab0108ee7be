// Helpers shared by the tokenizer tests: temp folders, hand-made rank files,
// and seeded random text that exercises every branch of Kimi's regex.
#ifndef KL_ENGINE_TOKENIZER_TEST_UTIL_H_
#define KL_ENGINE_TOKENIZER_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kl {
namespace testing {

// A fresh directory under $TEST_TMPDIR (or /tmp).
std::string MakeTempDir(absl::string_view name);

absl::Status WriteFile(const std::string& path, absl::string_view contents);

// tiktoken.model text for `tokens` (rank = index).
std::string RankFileText(const std::vector<std::string>& tokens);

// The 256 single bytes (rank = byte value) followed by `merges`.
std::vector<std::string> ByteRanksPlus(const std::vector<std::string>& merges);

// Random valid UTF-8 of `code_points` code points drawn from a mix of ASCII
// words, digits, punctuation, whitespace runs (incl. U+0085, U+00A0, U+3000,
// U+001C), contractions, Latin-1/Greek/Cyrillic letters, combining marks,
// titlecase and modifier letters, Han (incl. U+3005/U+3007 and U+3001, whose
// Script is Common), kana, Hangul, emoji and, if `specials` is non-empty,
// whole and broken special-token strings. Only characters assigned before
// Unicode 14 (the PCRE2 and Rust-regex tables may differ on newer ones).
std::string RandomUtf8(std::mt19937_64& rng, size_t code_points,
                       const std::vector<std::string>& specials = {});

// Uniform random bytes (mostly invalid UTF-8).
std::string RandomBytes(std::mt19937_64& rng, size_t n);

// Valid UTF-8 with random invalid bytes and truncated sequences spliced in.
std::string RandomMostlyUtf8(std::mt19937_64& rng, size_t code_points);

}  // namespace testing
}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_TEST_UTIL_H_
