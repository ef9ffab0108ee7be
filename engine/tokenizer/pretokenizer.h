// Kimi's pre-tokenizer: cuts text into the pieces that byte-level BPE encodes
// one at a time, exactly as tokenization_kimi.py (TikTokenTokenizer) does:
//   1. SplitForEncoding: the Python wrapper's long-input splitting (at most
//      400,000 characters per tiktoken call, and no more than 25,000
//      consecutive whitespace or non-whitespace characters, by str.isspace());
//   2. PreTokenizer::Split: the `pat_str` regex, translated to PCRE2.
//
// Invalid UTF-8 (which Python strings cannot hold, so the reference never sees
// it): each maximal run of invalid bytes becomes a piece of its own and acts as
// a hard boundary for the regex, exactly like an end of text. The valid text on
// either side is split as if the invalid bytes were not there. Every byte of
// the input lands in exactly one piece, so BPE can round-trip any byte string.
#ifndef KL_ENGINE_TOKENIZER_PRETOKENIZER_H_
#define KL_ENGINE_TOKENIZER_PRETOKENIZER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

struct pcre2_real_code_8;  // pcre2_code with PCRE2_CODE_UNIT_WIDTH=8

namespace kl {

// TikTokenTokenizer.encode's splitting constants.
inline constexpr int64_t kMaxEncodeChars = 400000;
inline constexpr int64_t kMaxConsecutiveRunChars = 25000;

// `TikTokenTokenizer.pat_str` verbatim (Rust regex syntax, as tiktoken compiles
// it). Kept as data for the tiktoken parity test and for readers; it is not
// compiled here: PCRE2 lacks `&&` class intersection.
extern const char kKimiPatStr[];

// The PCRE2 translation that PreTokenizer compiles (UTF + UCP):
//   [X&&[^\p{Han}]]  ->  (?:(?!\p{sc:Han})[X])
//   \p{Han}          ->  \p{sc:Han}   (PCRE2 >= 10.40 reads \p{Han} as
//                                      Script_Extensions; Rust reads Script)
//   \s, \S           ->  explicit Unicode White_Space class (Rust's \s), since
//                        PCRE2's UCP \s is "Perl space", not White_Space.
extern const char kKimiPcre2Pattern[];

class PreTokenizer {
 public:
  // Compiles kKimiPcre2Pattern, with the JIT when PCRE2 has it.
  static absl::StatusOr<std::unique_ptr<PreTokenizer>> Create();
  ~PreTokenizer();
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Calls `emit` for each piece of `text` in order; the pieces are non-empty
  // views into `text` and concatenate to it. Thread-safe (per-thread match
  // state). Never fails: if PCRE2 reports an internal error (it should not
  // with the bounded inputs of SplitForEncoding), it logs, falls back to the
  // interpreter, and as a last resort emits one character as a piece.
  void Split(absl::string_view text,
             absl::FunctionRef<void(absl::string_view)> emit) const;

  // Convenience for tests.
  std::vector<absl::string_view> Split(absl::string_view text) const;

  bool jit_enabled() const { return jit_; }

 private:
  PreTokenizer(pcre2_real_code_8* code, bool jit) : code_(code), jit_(jit) {}
  // Splits a segment that is known to be valid UTF-8.
  void SplitValid(absl::string_view text,
                  absl::FunctionRef<void(absl::string_view)> emit) const;
  // One pcre2 match at `offset`; returns pcre2's code, match in ovector[0..1].
  int Match(absl::string_view text, size_t offset, size_t* start,
            size_t* end) const;

  pcre2_real_code_8* code_;  // owned
  bool jit_;
};

// The Python wrapper's splitting of `text` into the substrings it encodes
// separately (each special-token scan and regex run is confined to one). Views
// into `text`; concatenating them gives `text`. Character counts are in code
// points; a maximal invalid UTF-8 subpart counts as one non-space character.
// Empty text gives no substrings.
std::vector<absl::string_view> SplitForEncoding(
    absl::string_view text, int64_t max_chars = kMaxEncodeChars,
    int64_t max_run_chars = kMaxConsecutiveRunChars);

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_PRETOKENIZER_H_
