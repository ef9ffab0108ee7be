// A running 64-bit hash over a token sequence: Next(h, t) extends the hash of
// a prefix by one token, so one pass over a prompt yields the hash of every
// prefix. Shared by the prefill worker's prefix cache and the router's
// prefix affinity, which must agree on nothing but need the same cheap walk.
#ifndef KL_SERVICES_COMMON_TOKEN_PREFIX_HASH_H_
#define KL_SERVICES_COMMON_TOKEN_PREFIX_HASH_H_

#include <cstdint>

#include "absl/types/span.h"

namespace kl {

// splitmix64 of the running hash and the token.
inline uint64_t NextPrefixHash(uint64_t h, int32_t token) {
  uint64_t z = h + 0x9e3779b97f4a7c15ull + static_cast<uint32_t>(token);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint64_t PrefixHash(absl::Span<const int32_t> tokens) {
  uint64_t h = 0;
  for (int32_t t : tokens) h = NextPrefixHash(h, t);
  return h;
}

// Calls fn(length, hash) for each proper prefix of `tokens` (shorter than
// it, at least one token) whose length `lengths` contains (a map or set
// keyed by int64_t), in increasing length: one pass, hashes of the rest are
// skipped past.
template <typename Lengths, typename Fn>
void ForEachKnownProperPrefix(absl::Span<const int32_t> tokens, const Lengths& lengths, Fn fn) {
  uint64_t h = 0;
  for (size_t len = 1; len < tokens.size() && !lengths.empty(); ++len) {
    h = NextPrefixHash(h, tokens[len - 1]);
    if (lengths.contains(static_cast<int64_t>(len))) fn(static_cast<int64_t>(len), h);
  }
}

}  // namespace kl

#endif  // KL_SERVICES_COMMON_TOKEN_PREFIX_HASH_H_
