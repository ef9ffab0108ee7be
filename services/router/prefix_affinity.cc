#include "services/router/prefix_affinity.h"

#include "services/common/token_prefix_hash.h"

namespace kl {

std::string PrefixAffinity::Lookup(absl::Span<const int32_t> tokens) const {
  absl::MutexLock l(&mu_);
  std::string best;
  ForEachKnownProperPrefix(tokens, lengths_, [&](int64_t len, uint64_t h) {
    auto it = by_hash_.find(h);
    if (it != by_hash_.end() && it->second->length == len) best = it->second->worker;
  });
  return best;
}

void PrefixAffinity::Record(absl::Span<const int32_t> tokens, const std::string& worker) {
  if (tokens.empty() || max_entries_ <= 0) return;
  const uint64_t h = PrefixHash(tokens);
  absl::MutexLock l(&mu_);
  if (auto it = by_hash_.find(h); it != by_hash_.end()) EraseLocked(it->second);
  while (static_cast<int64_t>(lru_.size()) >= max_entries_) EraseLocked(std::prev(lru_.end()));
  lru_.push_front(Entry{h, static_cast<int64_t>(tokens.size()), worker});
  by_hash_[h] = lru_.begin();
  ++lengths_[static_cast<int64_t>(tokens.size())];
}

void PrefixAffinity::EraseLocked(List::iterator it) {
  by_hash_.erase(it->hash);
  if (--lengths_[it->length] == 0) lengths_.erase(it->length);
  lru_.erase(it);
}

int64_t PrefixAffinity::size() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(lru_.size());
}

}  // namespace kl
