// Parsers for the two files of a Kimi tokenizer folder. Errors name the file
// (as passed in `filename`) and, for tiktoken.model, the 1-based line:
//   "/m/tiktoken.model:3: invalid base64 token 'QQ=!'"
#ifndef KL_ENGINE_TOKENIZER_VOCAB_FILES_H_
#define KL_ENGINE_TOKENIZER_VOCAB_FILES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kl {

// tiktoken.model (tiktoken's load_tiktoken_bpe format): one
// "<base64 token bytes> <rank>" per line; blank lines are skipped, a trailing
// '\r' is tolerated. Stricter than Python: rejects bad base64 (standard
// alphabet, padded), empty tokens, duplicate tokens, duplicate ranks, ranks
// that are not exactly 0..N-1, and a table missing any of the 256 single
// bytes (without them some inputs could not be encoded). Returns the token
// bytes indexed by rank.
absl::StatusOr<std::vector<std::string>> ParseTiktokenModel(
    absl::string_view contents, absl::string_view filename);

// One entry of tokenizer_config.json's "added_tokens_decoder".
struct AddedToken {
  int64_t id;
  std::string content;
  bool special;  // the entry's "special" flag (Kimi marks tool-call tokens false)
};

// What the tokenizer needs from tokenizer_config.json.
struct TokenizerConfigFile {
  std::vector<AddedToken> added_tokens;  // sorted by id
  // Names from "bos_token", "eos_token", "unk_token", "pad_token" (a string or
  // an {"content": ...} object); empty when the key is absent or null.
  std::string bos_token, eos_token, unk_token, pad_token;
};

// Parses tokenizer_config.json. Requires an "added_tokens_decoder" object whose
// keys are decimal ids and values objects with a non-empty string "content";
// rejects duplicate contents. Range checks against the rank count happen in
// Tokenizer, which knows it.
absl::StatusOr<TokenizerConfigFile> ParseTokenizerConfig(
    absl::string_view contents, absl::string_view filename);

// Strict standard base64 (RFC 4648 §4, '=' padding required). Exposed for the
// synthetic writer's round-trip test.
bool Base64Decode(absl::string_view in, std::string* out);
std::string Base64Encode(absl::string_view in);

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_VOCAB_FILES_H_
