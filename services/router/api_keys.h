// API keys of the router's public API (--api_keys_file, docs/security.md).
// The file has one key per line, either `key` or `name:key` (the name labels
// the client for the per-client concurrency limit and logs; unnamed keys are
// named "key-<line>"). Blank lines and lines starting with '#' are ignored;
// surrounding whitespace is trimmed. Keys are never logged.
//
// A call presents its key as `authorization: Bearer <key>` or `x-api-key:
// <key>` metadata. Every configured key is compared in constant time (per
// byte of the longest key), so timing tells nothing about which prefix matched.
//
// Thread-safety: immutable after Parse/Load; Authenticate is const.
#ifndef KL_SERVICES_ROUTER_API_KEYS_H_
#define KL_SERVICES_ROUTER_API_KEYS_H_

#include <grpcpp/grpcpp.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kl {

class ApiKeys {
 public:
  // INVALID_ARGUMENT (naming `source` and the line) for an empty key, a
  // duplicate key or name, or a file without any key.
  static absl::StatusOr<ApiKeys> Parse(absl::string_view text, absl::string_view source);
  // Reads `path` (the --api_keys_file flag) and parses it.
  static absl::StatusOr<ApiKeys> Load(const std::string& path);

  // The name of the client whose key the metadata carries; UNAUTHENTICATED
  // with a message saying what is missing or that the key is unknown.
  absl::StatusOr<std::string> Authenticate(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;
  // The same for a bare key (tests, tools).
  absl::StatusOr<std::string> AuthenticateKey(absl::string_view key) const;

  size_t size() const { return keys_.size(); }

 private:
  struct Entry {
    std::string name;
    std::string key;
  };
  std::vector<Entry> keys_;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_API_KEYS_H_
