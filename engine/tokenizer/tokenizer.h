// The Kimi tokenizer: tiktoken-style byte-level BPE with Kimi's pre-tokenizer
// and 256 reserved special tokens, byte-exact with tokenization_kimi.py's
// TikTokenTokenizer.encode/decode on valid UTF-8 input.
//
// Id layout: ranks 0..R-1 are BPE tokens (tiktoken.model); ids R..R+255 are
// special tokens, named by tokenizer_config.json's added_tokens_decoder, the
// unnamed ones "<|reserved_token_{id}|>". (tokenization_kimi.py as shipped
// with Kimi-Linear registers 258 ids, R..R+257, of which the last two lie
// beyond the model's 163,840 embedding rows; we register them only when the
// config names them.) vocab_size() = R + 256 for Kimi = 163,840.
//
// Thread-safety: a loaded Tokenizer is immutable; every const method may be
// called concurrently.
#ifndef KL_ENGINE_TOKENIZER_TOKENIZER_H_
#define KL_ENGINE_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "engine/tokenizer/bpe.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/vocab_files.h"

namespace kl {

class Tokenizer {
 public:
  // Loads `dir`/tiktoken.model and `dir`/tokenizer_config.json. Errors name
  // the file (and line for tiktoken.model); see vocab_files.h for the checks.
  // Also rejects special ids that collide with a rank (< R) or fall outside
  // [R, R+258), and an explicit bos/eos/unk/pad_token that is not a special.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& dir);

  // Builds from parsed parts (tests). `config_name` labels config errors.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromParts(
      std::vector<std::string> rank_bytes, const TokenizerConfigFile& config,
      absl::string_view config_name = "tokenizer_config.json");

  // Encodes `text` (any bytes) like TikTokenTokenizer.encode(text,
  // allow_special_tokens=allow_special): long-input splitting, then in each
  // piece special-token strings become their ids when `allow_special` (the
  // leftmost occurrence wins, the longest at one position), else they are
  // ordinary text. Invalid UTF-8 is encoded too (see pretokenizer.h); Decode
  // gives back the exact bytes. Cannot fail.
  std::vector<int32_t> Encode(absl::string_view text, bool allow_special) const;

  // Renders `messages` with Kimi's chat format (chat_template.h) and encodes
  // it: the template's markers become special ids, message text is encoded as
  // ordinary text even if it contains special-token strings (so a user cannot
  // forge "<|im_end|>"). Otherwise identical to Encode(RenderChat(...), true).
  // Fails only if this vocabulary lacks one of the chat markers.
  absl::StatusOr<std::vector<int32_t>> EncodeChat(
      const std::vector<ChatMessage>& messages, bool add_generation_prompt,
      const ChatOptions& options = {}) const;

  // Concatenated bytes of `ids` (special tokens as their text). May be
  // invalid UTF-8 (use StreamingDetokenizer or ReplaceInvalidUtf8 for text).
  // InvalidArgument on an id outside [0, vocab_size()).
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const;

  // Bytes of one token; InvalidArgument if out of range. The view lives as
  // long as the Tokenizer.
  absl::StatusOr<absl::string_view> TokenBytes(int32_t id) const;

  // Id of a special token by its text, e.g. "<|im_end|>"; NotFound otherwise.
  absl::StatusOr<int32_t> SpecialTokenId(absl::string_view content) const;

  // True for ids in [num_ranks(), vocab_size()).
  bool IsSpecial(int32_t id) const { return id >= num_ranks_ && id < vocab_size(); }
  // The added_tokens_decoder "special" flag (false for unnamed reserved ids
  // and for ids that are not special tokens at all).
  bool IsMarkedSpecial(int32_t id) const;
  bool IsValidId(int32_t id) const { return id >= 0 && id < vocab_size(); }

  int32_t num_ranks() const { return num_ranks_; }
  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }

  // Ids of tokenizer_config.json's bos/eos/unk/pad_token (defaults "[BOS]",
  // "[EOS]", "[UNK]", "[PAD]" when the key is absent); -1 if there is none.
  // Note Kimi's tokenizer-level eos_token is "[EOS]", while generation stops
  // at "<|im_end|>" (config.json eos_token_id): see im_end_id().
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t unk_id() const { return unk_id_; }
  int32_t pad_id() const { return pad_id_; }
  int32_t im_end_id() const { return im_end_id_; }  // -1 if absent

 private:
  Tokenizer() = default;
  struct SpecialMatch {
    size_t start, end;
    int32_t id;
  };
  class SpecialFinder;

  // Builds the special-token table (slots, names, lookup) from the config.
  absl::Status InitSpecials(const TokenizerConfigFile& config,
                            absl::string_view config_name);
  // Encodes one SplitForEncoding substring, taking special tokens from
  // `finder` (none if null).
  void EncodeSubstring(absl::string_view text, SpecialFinder* finder,
                       std::vector<int32_t>* out) const;
  // Pre-tokenizes and BPE-encodes text with no special tokens in it.
  void EncodeOrdinary(absl::string_view text, std::vector<int32_t>* out) const;
  // Leftmost-longest special token in text[pos...].
  bool FindSpecial(absl::string_view text, size_t pos, SpecialMatch* m) const;

  std::unique_ptr<PreTokenizer> pretokenizer_;
  RankMap ranks_;                    // BPE token bytes -> rank
  std::vector<std::string> tokens_;  // id -> bytes (ranks, then specials)
  std::vector<bool> marked_special_;  // per special slot
  absl::flat_hash_map<std::string, int32_t> special_ids_;  // content -> id
  std::vector<size_t> special_lengths_;  // distinct content lengths, descending
  bool special_first_byte_[256] = {};
  int32_t num_ranks_ = 0;
  int32_t bos_id_ = -1, eos_id_ = -1, unk_id_ = -1, pad_id_ = -1;
  int32_t im_end_id_ = -1;
};

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_TOKENIZER_H_
