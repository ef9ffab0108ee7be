#include "services/router/api_keys.h"

#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kl {
namespace {

// Equal without an early exit: the time depends only on the lengths.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::string_view Ref(const grpc::string_ref& r) { return absl::string_view(r.data(), r.size()); }

}  // namespace

absl::StatusOr<ApiKeys> ApiKeys::Parse(absl::string_view text, absl::string_view source) {
  ApiKeys out;
  absl::flat_hash_set<std::string> names, keys;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    Entry e;
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) {
      e.name = absl::StrCat("key-", line_no);
      e.key = std::string(line);
    } else {
      e.name = std::string(absl::StripAsciiWhitespace(line.substr(0, colon)));
      e.key = std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
    }
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat(source, ":", line_no, ": ", why));
    };
    if (e.name.empty()) return bad("empty client name before ':'");
    if (e.key.empty()) return bad("empty key");
    // Keys travel in an HTTP/2 header: printable ASCII without spaces.
    for (char c : e.key) {
      if (c <= ' ' || c > '~') return bad("a key may hold only printable ASCII without spaces");
    }
    if (!names.insert(e.name).second) return bad(absl::StrCat("duplicate client name ", e.name));
    if (!keys.insert(e.key).second) return bad("duplicate key");
    out.keys_.push_back(std::move(e));
  }
  if (out.keys_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": no API key in the file"));
  }
  return out;
}

absl::StatusOr<ApiKeys> ApiKeys::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("--api_keys_file=", path, ": cannot read"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return Parse(ss.str(), absl::StrCat("--api_keys_file=", path));
}

absl::StatusOr<std::string> ApiKeys::AuthenticateKey(absl::string_view key) const {
  // Every key is compared (no early exit), so the time does not reveal which
  // entry matched either.
  const Entry* match = nullptr;
  for (const Entry& e : keys_) {
    if (ConstantTimeEquals(key, e.key)) match = &e;
  }
  if (match == nullptr) return absl::UnauthenticatedError("unknown API key");
  return match->name;
}

absl::StatusOr<std::string> ApiKeys::Authenticate(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  absl::string_view key;
  bool found = false;
  if (auto it = metadata.find("authorization"); it != metadata.end()) {
    absl::string_view v = Ref(it->second);
    // RFC 6750: the scheme is case-insensitive.
    if (v.size() < 7 || !absl::EqualsIgnoreCase(v.substr(0, 7), "bearer ")) {
      return absl::UnauthenticatedError(
          "the authorization metadata must be 'Bearer <API key>'");
    }
    key = absl::StripAsciiWhitespace(v.substr(7));
    found = true;
  } else if (auto it2 = metadata.find("x-api-key"); it2 != metadata.end()) {
    key = absl::StripAsciiWhitespace(Ref(it2->second));
    found = true;
  }
  if (!found) {
    return absl::UnauthenticatedError(
        "missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>' metadata");
  }
  return AuthenticateKey(key);
}

}  // namespace kl
