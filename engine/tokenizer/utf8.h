// UTF-8 scanning shared by the pre-tokenizer (which must route invalid bytes
// around PCRE2), the streaming detokenizer (which must never emit half a
// character) and the Python-compatible long-input splitter.
//
// Validity follows RFC 3629 / Unicode 15 Table 3-7: no overlongs, no UTF-16
// surrogates (U+D800..U+DFFF), nothing above U+10FFFF. Invalid input is cut
// into "maximal subparts" (Unicode §3.9, the rule Python's
// bytes.decode("utf-8", "replace") and WHATWG use), so each subpart maps to one
// U+FFFD.
#ifndef KL_ENGINE_TOKENIZER_UTF8_H_
#define KL_ENGINE_TOKENIZER_UTF8_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace kl {

// U+FFFD REPLACEMENT CHARACTER, UTF-8 encoded.
inline constexpr absl::string_view kUtf8Replacement = "\xEF\xBF\xBD";

struct Utf8Scan {
  enum Kind {
    kValid,       // a complete, valid sequence of `length` bytes
    kInvalid,     // a maximal invalid subpart of `length` (1..3) bytes
    kIncomplete,  // the `length` bytes up to the end of the text are a proper
                  // prefix of a valid sequence (more bytes could complete it)
  };
  Kind kind;
  int length;
  char32_t code_point;  // only meaningful for kValid
};

// Examines the bytes of `text` starting at `pos` (requires pos < text.size()).
Utf8Scan ScanUtf8(absl::string_view text, size_t pos);

// True if all of `text` is valid UTF-8.
bool IsValidUtf8(absl::string_view text);

// Python's str.isspace() for one code point (Python 3.8+ / Unicode 14: Zs, or
// bidi class WS/B/S). Differs from the regex `\s` (White_Space): U+001C..U+001F
// are isspace() but not White_Space.
bool PythonIsSpace(char32_t c);

// `bytes.decode("utf-8", "replace")`: every maximal invalid subpart, and a
// truncated sequence at the end, becomes one U+FFFD. Output is valid UTF-8.
std::string ReplaceInvalidUtf8(absl::string_view bytes);

// Appends the UTF-8 encoding of `c` (must be a Unicode scalar value).
void AppendUtf8(char32_t c, std::string* out);

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_UTF8_H_
