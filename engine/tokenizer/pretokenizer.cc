// Kimi pre-tokenizer on PCRE2; see pretokenizer.h.
#include "engine/tokenizer/pretokenizer.h"

#include <pcre2.h>

#include <cstring>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "engine/tokenizer/utf8.h"

namespace kl {

const char kKimiPatStr[] =
    R"([\p{Han}]+)"
    "|"
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    "|"
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    "|"
    R"(\p{N}{1,3})"
    "|"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*)"
    "|"
    R"(\s*[\r\n]+)"
    "|"
    R"(\s+(?!\S))"
    "|"
    R"(\s+)";

// Unicode White_Space (Rust regex `\s`), as class contents.
#define KL_WS R"(\t-\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})"
// [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]] and its lowercase sibling.
#define KL_UPPER R"((?:(?!\p{sc:Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]))"
#define KL_LOWER R"((?:(?!\p{sc:Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}]))"
#define KL_CONTRACTION R"((?i:'s|'t|'re|'ve|'m|'ll|'d)?)"

const char kKimiPcre2Pattern[] =
    R"(\p{sc:Han}+)"
    "|"
    R"([^\r\n\p{L}\p{N}]?)" KL_UPPER "*" KL_LOWER "+" KL_CONTRACTION
    "|"
    R"([^\r\n\p{L}\p{N}]?)" KL_UPPER "+" KL_LOWER "*" KL_CONTRACTION
    "|"
    R"(\p{N}{1,3})"
    "|"
    R"( ?[^)" KL_WS R"(\p{L}\p{N}]+[\r\n]*)"
    "|"
    "[" KL_WS R"(]*[\r\n]+)"
    "|"
    "[" KL_WS "]+(?![^" KL_WS "])"
    "|"
    "[" KL_WS "]+";

#undef KL_WS
#undef KL_UPPER
#undef KL_LOWER
#undef KL_CONTRACTION

namespace {

// Per-thread PCRE2 state: the pattern is shared read-only, match data and the
// large JIT stack (only used to retry a match that overflowed the default
// 32 KiB machine-stack JIT frame) are not.
struct ThreadMatchState {
  pcre2_match_data* match_data = nullptr;
  pcre2_jit_stack* big_stack = nullptr;
  pcre2_match_context* big_stack_context = nullptr;
  ThreadMatchState() { match_data = pcre2_match_data_create(1, nullptr); }
  ~ThreadMatchState() {
    pcre2_match_context_free(big_stack_context);
    pcre2_jit_stack_free(big_stack);
    pcre2_match_data_free(match_data);
  }
  pcre2_match_context* BigStackContext() {
    if (big_stack_context == nullptr) {
      big_stack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr);
      big_stack_context = pcre2_match_context_create(nullptr);
      pcre2_jit_stack_assign(big_stack_context, nullptr, big_stack);
    }
    return big_stack_context;
  }
};

ThreadMatchState& MatchState() {
  static thread_local ThreadMatchState state;
  return state;
}

std::string Pcre2Error(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

}  // namespace

absl::StatusOr<std::unique_ptr<PreTokenizer>> PreTokenizer::Create() {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(
      reinterpret_cast<PCRE2_SPTR>(kKimiPcre2Pattern), PCRE2_ZERO_TERMINATED,
      PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    return absl::InternalError(
        absl::StrCat("pre-tokenizer pattern does not compile at offset ",
                     error_offset, ": ", Pcre2Error(error_code)));
  }
  uint32_t has_jit = 0;
  pcre2_config(PCRE2_CONFIG_JIT, &has_jit);
  bool jit = false;
  if (has_jit) {
    const int rc = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    jit = rc == 0;
    if (!jit) {
      KL_LOG(WARNING) << "PCRE2 JIT compile failed (" << Pcre2Error(rc)
                      << "); using the interpreter";
    }
  }
  return std::unique_ptr<PreTokenizer>(new PreTokenizer(code, jit));
}

PreTokenizer::~PreTokenizer() { pcre2_code_free(code_); }

int PreTokenizer::Match(absl::string_view text, size_t offset, size_t* start,
                        size_t* end) const {
  ThreadMatchState& state = MatchState();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  int rc;
  if (jit_) {
    rc = pcre2_jit_match(code_, subject, text.size(), offset, 0,
                         state.match_data, nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      rc = pcre2_jit_match(code_, subject, text.size(), offset, 0,
                           state.match_data, state.BigStackContext());
    }
  } else {
    rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK,
                     state.match_data, nullptr);
  }
  if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && jit_) {
    KL_LOG(WARNING) << "PCRE2 JIT match failed (" << Pcre2Error(rc)
                    << "); retrying with the interpreter";
    rc = pcre2_match(code_, subject, text.size(), offset,
                     PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, state.match_data,
                     nullptr);
  }
  if (rc >= 0) {
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.match_data);
    *start = ovector[0];
    *end = ovector[1];
  }
  return rc;
}

void PreTokenizer::SplitValid(
    absl::string_view text,
    absl::FunctionRef<void(absl::string_view)> emit) const {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t start = 0, end = 0;
    const int rc = Match(text, pos, &start, &end);
    if (rc == PCRE2_ERROR_NOMATCH) {
      // Unreachable for Kimi's pattern (every code point matches some
      // branch), but tiktoken would drop such text; we keep every byte.
      emit(text.substr(pos));
      return;
    }
    if (rc < 0) {
      KL_LOG(ERROR) << "PCRE2 match failed (" << Pcre2Error(rc)
                    << "); emitting one character as a piece";
      const int len = ScanUtf8(text, pos).length;
      emit(text.substr(pos, len));
      pos += len;
      continue;
    }
    if (start > pos) emit(text.substr(pos, start - pos));  // see NOMATCH
    if (end == start) {  // empty match: impossible for this pattern
      end = start + ScanUtf8(text, start).length;
    }
    emit(text.substr(start, end - start));
    pos = end;
  }
}

void PreTokenizer::Split(
    absl::string_view text,
    absl::FunctionRef<void(absl::string_view)> emit) const {
  const size_t n = text.size();
  size_t pos = 0;
  size_t segment_start = 0;  // start of the current valid-UTF-8 segment
  while (pos < n) {
    if (static_cast<unsigned char>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    Utf8Scan scan = ScanUtf8(text, pos);
    if (scan.kind == Utf8Scan::kValid) {
      pos += scan.length;
      continue;
    }
    if (pos > segment_start) {
      SplitValid(text.substr(segment_start, pos - segment_start), emit);
    }
    const size_t invalid_start = pos;
    while (pos < n && scan.kind != Utf8Scan::kValid) {
      pos += scan.length;
      if (pos < n) scan = ScanUtf8(text, pos);
    }
    emit(text.substr(invalid_start, pos - invalid_start));
    segment_start = pos;
  }
  if (segment_start < n) SplitValid(text.substr(segment_start), emit);
}

std::vector<absl::string_view> PreTokenizer::Split(
    absl::string_view text) const {
  std::vector<absl::string_view> pieces;
  Split(text, [&pieces](absl::string_view piece) { pieces.push_back(piece); });
  return pieces;
}

std::vector<absl::string_view> SplitForEncoding(absl::string_view text,
                                                int64_t max_chars,
                                                int64_t max_run_chars) {
  std::vector<absl::string_view> out;
  size_t slice_start = 0;
  int64_t chunk_chars = 0;
  int64_t run_length = 0;
  bool run_is_space = false;
  size_t pos = 0;
  while (pos < text.size()) {
    const unsigned char byte = static_cast<unsigned char>(text[pos]);
    size_t length = 1;
    bool is_space;
    if (byte < 0x80) {
      is_space = PythonIsSpace(byte);
    } else {
      const Utf8Scan scan = ScanUtf8(text, pos);
      length = scan.length;
      is_space = scan.kind == Utf8Scan::kValid && PythonIsSpace(scan.code_point);
    }
    if (pos == 0 || chunk_chars == max_chars) {
      // A new `text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]` chunk: the run
      // splitter restarts with the first character's class.
      if (pos != 0) out.push_back(text.substr(slice_start, pos - slice_start));
      slice_start = pos;
      chunk_chars = 0;
      run_length = 0;
      run_is_space = is_space;
    }
    if (run_is_space != is_space) {
      run_length = 1;
      run_is_space = is_space;
    } else if (++run_length > max_run_chars) {
      out.push_back(text.substr(slice_start, pos - slice_start));
      slice_start = pos;
      run_length = 1;
    }
    ++chunk_chars;
    pos += length;
  }
  if (!text.empty()) out.push_back(text.substr(slice_start));
  return out;
}

}  // namespace kl
