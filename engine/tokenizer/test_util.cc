// Tokenizer test helpers; see test_util.h.
#include "engine/tokenizer/test_util.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"
#include "engine/tokenizer/vocab_files.h"

namespace kl {
namespace testing {

std::string MakeTempDir(absl::string_view name) {
  const char* base = std::getenv("TEST_TMPDIR");
  static int counter = 0;
  const std::string dir = absl::StrCat(base != nullptr ? base : "/tmp", "/",
                                       name, "_", ++counter);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

absl::Status WriteFile(const std::string& path, absl::string_view contents) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return absl::InternalError("cannot open " + path);
  std::fwrite(contents.data(), 1, contents.size(), f);
  std::fclose(f);
  return absl::OkStatus();
}

std::string RankFileText(const std::vector<std::string>& tokens) {
  std::string out;
  for (size_t r = 0; r < tokens.size(); ++r) {
    absl::StrAppend(&out, Base64Encode(tokens[r]), " ", r, "\n");
  }
  return out;
}

std::vector<std::string> ByteRanksPlus(const std::vector<std::string>& merges) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.emplace_back(1, static_cast<char>(b));
  tokens.insert(tokens.end(), merges.begin(), merges.end());
  return tokens;
}

namespace {

size_t Below(std::mt19937_64& rng, size_t n) { return rng() % n; }

// Code point ranges to draw single characters from.
struct Range {
  char32_t lo, hi;
};
constexpr Range kRanges[] = {
    {0x61, 0x7A},     {0x41, 0x5A},     {0x30, 0x39},     {0x21, 0x2F},
    {0x3A, 0x40},     {0xC0, 0xFF},     {0x391, 0x3C9},   {0x410, 0x44F},
    {0x300, 0x36F},   {0x4E00, 0x9FA5}, {0x3041, 0x3096}, {0x30A1, 0x30FA},
    {0xAC00, 0xD7A3}, {0x1F600, 0x1F64F}, {0x2074, 0x2079}, {0x2150, 0x2182},
    {0x660, 0x669},   {0x5D0, 0x5EA},   {0x2010, 0x2027}, {0x3000, 0x3003},
};
constexpr char32_t kSingles[] = {
    0x20,   0x20,   0x20,   0x0A,   0x0D,   0x09,   0x0B,   0x0C,  0x85,
    0xA0,   0x1680, 0x2003, 0x2028, 0x2029, 0x202F, 0x3000, 0x1C,  0x1D,
    0x1E,   0x1F,   0x1C5,  0x2B0,  0x2B7,  0x3005, 0x3007, 0x3001, 0x3002,
    0xFF0C, 0x200B, 0x200D, 0xFE0F, 0x17F,  0x212A, 0x27,   0x2019, 0x0,
    0x7F,   0xAD,   0xE000, 0x10FFFD};
const char* const kFragments[] = {
    "'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "'x", "don't",
    "HELLO", "Hello", "hello", "  ", "   ", "\n\n", "\r\n", " \n ",
    "1234567", "3.14", "中文English", "ABCdef", "x'LL", " !!\n\n", "...",
    "\t\t", "\xC5\xBF", "Ǆemo", "ǅungla",
};

}  // namespace

std::string RandomUtf8(std::mt19937_64& rng, size_t code_points,
                       const std::vector<std::string>& specials) {
  std::string out;
  size_t n = 0;
  while (n < code_points) {
    const size_t kind = Below(rng, 100);
    if (kind < 50) {
      const Range& r = kRanges[Below(rng, std::size(kRanges))];
      AppendUtf8(r.lo + static_cast<char32_t>(Below(rng, r.hi - r.lo + 1)), &out);
      ++n;
    } else if (kind < 75) {
      AppendUtf8(kSingles[Below(rng, std::size(kSingles))], &out);
      ++n;
    } else if (kind < 95 || specials.empty()) {
      out += kFragments[Below(rng, std::size(kFragments))];
      n += 2;
    } else {
      const std::string& s = specials[Below(rng, specials.size())];
      // Whole special token, or a broken one (prefix only).
      out += Below(rng, 3) == 0 ? s.substr(0, 1 + Below(rng, s.size())) : s;
      n += 2;
    }
  }
  return out;
}

std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng() & 0xFF);
  return out;
}

std::string RandomMostlyUtf8(std::mt19937_64& rng, size_t code_points) {
  std::string text = RandomUtf8(rng, code_points);
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (Below(rng, 20) == 0) {
      static const char* const kBad[] = {"\x80", "\xFF", "\xC0\xAF", "\xE4\xBD",
                                         "\xF0\x9F\x98", "\xED\xA0\x80",
                                         "\xC3", "\xF4\x90\x80\x80"};
      out += kBad[Below(rng, std::size(kBad))];
    }
    out.push_back(text[i]);  // may also cut a valid sequence in two
  }
  return out;
}

}  // namespace testing
}  // namespace kl
