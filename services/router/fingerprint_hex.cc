#include "services/router/fingerprint_hex.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"

namespace kl {

std::string FormatFingerprint(uint64_t fingerprint) {
  return absl::StrFormat("0x%016x", fingerprint);
}

bool ParseFingerprint(const std::string& text, uint64_t* out) {
  std::string t = absl::AsciiStrToLower(text);
  if (t.rfind("0x", 0) == 0) t = t.substr(2);
  if (t.empty() || t.size() > 16) return false;
  return absl::SimpleHexAtoi(t, out);
}

}  // namespace kl
