// tiktoken.model and tokenizer_config.json parsers; see vocab_files.h.
#include "engine/tokenizer/vocab_files.h"

#include <algorithm>
#include <limits>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace kl {
namespace {

constexpr char kBase64Alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int Base64Value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

// A field quoted for an error message: escaped and cut to a readable length.
std::string Quote(absl::string_view s) {
  constexpr size_t kMax = 40;
  std::string q = absl::CHexEscape(s.substr(0, kMax));
  if (s.size() > kMax) q += "...";
  return absl::StrCat("'", q, "'");
}

absl::Status LineError(absl::string_view filename, int line,
                       absl::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat(filename, ":", line, ": ", message));
}

struct RankLine {
  int64_t rank;
  int line;
  std::string bytes;
};

// Parses one non-blank line into `out`.
absl::Status ParseRankLine(absl::string_view text, absl::string_view filename,
                           int line, RankLine* out) {
  std::vector<absl::string_view> fields =
      absl::StrSplit(text, absl::ByAnyChar(" \t"), absl::SkipEmpty());
  if (fields.size() != 2) {
    return LineError(filename, line,
                     absl::StrCat("expected '<base64 token> <rank>', got ",
                                  fields.size(), " fields in ", Quote(text)));
  }
  if (!Base64Decode(fields[0], &out->bytes)) {
    return LineError(filename, line,
                     absl::StrCat("invalid base64 token ", Quote(fields[0])));
  }
  if (out->bytes.empty()) {
    return LineError(filename, line, "empty token");
  }
  const bool digits_only = std::all_of(
      fields[1].begin(), fields[1].end(),
      [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); });
  int64_t rank = 0;
  if (!digits_only || !absl::SimpleAtoi(fields[1], &rank) ||
      rank > std::numeric_limits<int32_t>::max()) {
    return LineError(filename, line,
                     absl::StrCat("invalid rank ", Quote(fields[1]),
                                  " (want a decimal integer in [0, 2^31))"));
  }
  out->rank = rank;
  out->line = line;
  return absl::OkStatus();
}

// Reads "bos_token" etc.: a string, an {"content": "..."} object, or null.
absl::StatusOr<std::string> TokenName(const nlohmann::json& config,
                                      const char* key,
                                      absl::string_view filename) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    const auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      return content->get<std::string>();
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat(filename, ": \"", key,
                   "\" must be a string or an object with a string \"content\""));
}

}  // namespace

bool Base64Decode(absl::string_view in, std::string* out) {
  out->clear();
  if (in.size() % 4 != 0) return false;
  out->reserve(in.size() / 4 * 3);
  for (size_t i = 0; i < in.size(); i += 4) {
    const bool last = i + 4 == in.size();
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = in[i + k];
      if (c == '=' && last && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      if (pad > 0) return false;  // data after padding
      v[k] = Base64Value(c);
      if (v[k] < 0) return false;
    }
    const uint32_t w = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out->push_back(static_cast<char>(w >> 16));
    if (pad < 2) out->push_back(static_cast<char>((w >> 8) & 0xFF));
    if (pad < 1) out->push_back(static_cast<char>(w & 0xFF));
    // Canonical encoding: the bits dropped by the padding must be zero.
    if ((pad == 1 && (w & 0xFF) != 0) || (pad == 2 && (w & 0xFFFF) != 0)) {
      return false;
    }
  }
  return true;
}

std::string Base64Encode(absl::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  for (size_t i = 0; i < in.size(); i += 3) {
    const size_t n = std::min<size_t>(3, in.size() - i);
    uint32_t w = 0;
    for (size_t k = 0; k < 3; ++k) {
      w = (w << 8) | (k < n ? static_cast<unsigned char>(in[i + k]) : 0);
    }
    out.push_back(kBase64Alphabet[(w >> 18) & 63]);
    out.push_back(kBase64Alphabet[(w >> 12) & 63]);
    out.push_back(n > 1 ? kBase64Alphabet[(w >> 6) & 63] : '=');
    out.push_back(n > 2 ? kBase64Alphabet[w & 63] : '=');
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> ParseTiktokenModel(
    absl::string_view contents, absl::string_view filename) {
  std::vector<RankLine> entries;
  absl::flat_hash_map<absl::string_view, int> line_of_token;
  absl::flat_hash_map<int64_t, int> line_of_rank;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(contents, '\n')) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    RankLine entry;
    if (absl::Status s = ParseRankLine(line, filename, line_number, &entry);
        !s.ok()) {
      return s;
    }
    if (auto [it, inserted] = line_of_rank.emplace(entry.rank, line_number);
        !inserted) {
      return LineError(filename, line_number,
                       absl::StrCat("duplicate rank ", entry.rank,
                                    " (first on line ", it->second, ")"));
    }
    entries.push_back(std::move(entry));
  }
  if (entries.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(filename, ": no ranks"));
  }
  // Token bytes keyed by view: `entries` no longer grows.
  for (const RankLine& e : entries) {
    if (auto [it, inserted] = line_of_token.emplace(e.bytes, e.line);
        !inserted) {
      return LineError(filename, e.line,
                       absl::StrCat("duplicate token ", Quote(e.bytes),
                                    " (first on line ", it->second, ")"));
    }
  }
  const int64_t n = static_cast<int64_t>(entries.size());
  for (const RankLine& e : entries) {
    if (e.rank >= n) {
      int64_t missing = 0;
      while (line_of_rank.contains(missing)) ++missing;
      return LineError(
          filename, e.line,
          absl::StrCat("ranks are not contiguous: rank ", e.rank, " with only ",
                       n, " tokens (rank ", missing, " is missing)"));
    }
  }
  for (int b = 0; b < 256; ++b) {
    const char byte = static_cast<char>(b);
    if (!line_of_token.contains(absl::string_view(&byte, 1))) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: no rank for the single byte 0x%02X; every byte needs one",
          filename, b));
    }
  }
  line_of_token.clear();  // its keys view into `entries`, moved from below
  std::vector<std::string> tokens(n);
  for (RankLine& e : entries) tokens[e.rank] = std::move(e.bytes);
  return tokens;
}

absl::StatusOr<TokenizerConfigFile> ParseTokenizerConfig(
    absl::string_view contents, absl::string_view filename) {
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(contents.begin(), contents.end());
  } catch (const nlohmann::json::exception& e) {
    // Also out_of_range, thrown for a number too large for a double (1e999).
    return absl::InvalidArgumentError(
        absl::StrCat(filename, ": invalid JSON: ", e.what()));
  }
  if (!config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(filename, ": top level is not a JSON object"));
  }
  const auto decoder = config.find("added_tokens_decoder");
  if (decoder == config.end() || !decoder->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        filename, ": missing \"added_tokens_decoder\" object"));
  }
  TokenizerConfigFile out;
  absl::flat_hash_map<std::string, int64_t> id_of_content;
  for (const auto& [key, value] : decoder->items()) {
    int64_t id = 0;
    const bool digits_only = !key.empty() &&
        std::all_of(key.begin(), key.end(), [](char c) {
          return absl::ascii_isdigit(static_cast<unsigned char>(c));
        });
    if (!digits_only || !absl::SimpleAtoi(key, &id) ||
        id > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(
          filename, ": added_tokens_decoder key ", Quote(key),
          " is not a token id (want a decimal integer in [0, 2^31))"));
    }
    const auto content = value.is_object() ? value.find("content") : value.end();
    if (!value.is_object() || content == value.end() || !content->is_string() ||
        content->get<std::string>().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          filename, ": added_tokens_decoder[\"", key,
          "\"] needs a non-empty string \"content\""));
    }
    AddedToken token{id, content->get<std::string>(), true};
    if (const auto special = value.find("special"); special != value.end()) {
      if (!special->is_boolean()) {
        return absl::InvalidArgumentError(absl::StrCat(
            filename, ": added_tokens_decoder[\"", key,
            "\"].special is not a boolean"));
      }
      token.special = special->get<bool>();
    }
    if (auto [it, inserted] = id_of_content.emplace(token.content, id);
        !inserted) {
      return absl::InvalidArgumentError(absl::StrCat(
          filename, ": added token ", Quote(token.content), " appears twice (ids ",
          it->second, " and ", id, ")"));
    }
    out.added_tokens.push_back(std::move(token));
  }
  std::sort(out.added_tokens.begin(), out.added_tokens.end(),
            [](const AddedToken& a, const AddedToken& b) { return a.id < b.id; });
  for (auto [key, field] : {std::pair{"bos_token", &out.bos_token},
                            std::pair{"eos_token", &out.eos_token},
                            std::pair{"unk_token", &out.unk_token},
                            std::pair{"pad_token", &out.pad_token}}) {
    absl::StatusOr<std::string> name = TokenName(config, key, filename);
    if (!name.ok()) return name.status();
    *field = *std::move(name);
  }
  return out;
}

}  // namespace kl
