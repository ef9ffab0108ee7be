#include "services/prefill/prefix_cache.h"

#include <algorithm>
#include <utility>

#include "services/common/token_prefix_hash.h"

namespace kl {

int64_t PrefixCache::StateBytes(const SequenceState& state) {
  int64_t floats = 0;
  for (const KdaLayerState& k : state.kda) {
    floats += static_cast<int64_t>(k.recurrent.size() + k.conv_q.size() + k.conv_k.size() +
                                   k.conv_v.size());
  }
  for (const MlaLayerCache& m : state.mla) floats += static_cast<int64_t>(m.latent.size());
  return floats * static_cast<int64_t>(sizeof(float));
}

std::shared_ptr<const PrefixCache::Entry> PrefixCache::Lookup(absl::Span<const int32_t> tokens) {
  absl::MutexLock l(&mu_);
  ++stats_.queries;
  stats_.query_tokens += static_cast<int64_t>(tokens.size());
  List::iterator best = lru_.end();
  // Proper prefixes only: at least one token is left to prefill.
  ForEachKnownProperPrefix(tokens, lengths_, [&](int64_t len, uint64_t h) {
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) return;
    const std::vector<int32_t>& t = (*it->second)->tokens;
    if (static_cast<int64_t>(t.size()) == len && std::equal(t.begin(), t.end(), tokens.begin())) {
      best = it->second;
    }
  });
  if (best == lru_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, best);  // most recently used
  ++stats_.hits;
  stats_.hit_tokens += static_cast<int64_t>((*best)->tokens.size());
  return *best;
}

bool PrefixCache::Insert(absl::Span<const int32_t> tokens, const SequenceState& state) {
  if (tokens.empty() || state.num_tokens != static_cast<int64_t>(tokens.size())) return false;
  // Too large for the whole cache: refused before anything is copied.
  if (StateBytes(state) + static_cast<int64_t>(tokens.size() * sizeof(int32_t)) > capacity_) {
    return false;
  }
  auto e = std::make_shared<Entry>();
  e->tokens.assign(tokens.begin(), tokens.end());
  e->state.num_tokens = state.num_tokens;
  e->state.kda = state.kda;  // host vectors only: never the device residency
  e->state.mla = state.mla;
  e->bytes = StateBytes(e->state) + static_cast<int64_t>(tokens.size() * sizeof(int32_t));
  if (e->bytes > capacity_) return false;
  const uint64_t h = PrefixHash(tokens);
  absl::MutexLock l(&mu_);
  if (auto it = by_hash_.find(h); it != by_hash_.end()) EraseLocked(it->second);
  while (!lru_.empty() && stats_.bytes + e->bytes > capacity_) {
    EraseLocked(std::prev(lru_.end()));
    ++stats_.evictions;
  }
  stats_.bytes += e->bytes;
  ++stats_.entries;
  ++stats_.inserts;
  ++lengths_[static_cast<int64_t>(e->tokens.size())];
  lru_.push_front(std::move(e));
  by_hash_[h] = lru_.begin();
  return true;
}

void PrefixCache::EraseLocked(List::iterator it) {
  const Entry& e = **it;
  const uint64_t h = PrefixHash(e.tokens);
  if (auto m = by_hash_.find(h); m != by_hash_.end() && m->second == it) by_hash_.erase(m);
  const int64_t len = static_cast<int64_t>(e.tokens.size());
  if (--lengths_[len] == 0) lengths_.erase(len);
  stats_.bytes -= e.bytes;
  --stats_.entries;
  lru_.erase(it);
}

PrefixCacheStats PrefixCache::Stats() const {
  absl::MutexLock l(&mu_);
  PrefixCacheStats s = stats_;
  s.capacity_bytes = capacity_;
  return s;
}

}  // namespace kl
