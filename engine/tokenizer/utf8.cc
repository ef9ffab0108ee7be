// UTF-8 scanning; see utf8.h.
#include "engine/tokenizer/utf8.h"

#include <cstdint>

namespace kl {
namespace {

// For a lead byte: the sequence length (0 = can never start a sequence) and
// the allowed range of the second byte (Unicode Table 3-7).
struct LeadInfo {
  int length;
  uint8_t second_lo;
  uint8_t second_hi;
};

LeadInfo Lead(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b < 0xC2) return {0, 0, 0};  // continuation byte or overlong C0/C1
  if (b < 0xE0) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};  // no overlongs
  if (b == 0xED) return {3, 0x80, 0x9F};  // no surrogates
  if (b < 0xF0) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};  // no overlongs
  if (b < 0xF4) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};  // nothing above U+10FFFF
  return {0, 0, 0};
}

}  // namespace

Utf8Scan ScanUtf8(absl::string_view text, size_t pos) {
  const auto* p = reinterpret_cast<const uint8_t*>(text.data()) + pos;
  const size_t avail = text.size() - pos;
  const LeadInfo lead = Lead(p[0]);
  if (lead.length == 1) return {Utf8Scan::kValid, 1, p[0]};
  if (lead.length == 0) return {Utf8Scan::kInvalid, 1, 0};
  char32_t cp = p[0] & (0xFF >> (lead.length + 1));
  for (int i = 1; i < lead.length; ++i) {
    if (static_cast<size_t>(i) >= avail) {
      return {Utf8Scan::kIncomplete, i, 0};
    }
    const uint8_t lo = i == 1 ? lead.second_lo : 0x80;
    const uint8_t hi = i == 1 ? lead.second_hi : 0xBF;
    if (p[i] < lo || p[i] > hi) return {Utf8Scan::kInvalid, i, 0};
    cp = (cp << 6) | (p[i] & 0x3F);
  }
  return {Utf8Scan::kValid, lead.length, cp};
}

bool IsValidUtf8(absl::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    // ASCII fast path, 8 bytes at a time.
    while (pos + 8 <= text.size()) {
      uint64_t w;
      __builtin_memcpy(&w, text.data() + pos, 8);
      if (w & 0x8080808080808080ULL) break;
      pos += 8;
    }
    if (pos >= text.size()) break;
    const Utf8Scan s = ScanUtf8(text, pos);
    if (s.kind != Utf8Scan::kValid) return false;
    pos += s.length;
  }
  return true;
}

bool PythonIsSpace(char32_t c) {
  if (c <= 0x20) return (c >= 0x09 && c <= 0x0D) || c >= 0x1C;
  if (c < 0x85) return false;
  switch (c) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029:
    case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string ReplaceInvalidUtf8(absl::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t pos = 0;
  while (pos < bytes.size()) {
    const Utf8Scan s = ScanUtf8(bytes, pos);
    if (s.kind == Utf8Scan::kValid) {
      out.append(bytes.data() + pos, s.length);
    } else {
      out.append(kUtf8Replacement.data(), kUtf8Replacement.size());
    }
    pos += s.length;
  }
  return out;
}

}  // namespace kl
