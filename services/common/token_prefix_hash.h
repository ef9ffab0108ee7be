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

}  // namespace kl

#endif  // KL_SERVICES_COMMON_TOKEN_PREFIX_HASH_H_
