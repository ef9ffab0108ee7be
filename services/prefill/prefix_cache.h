// PrefixCache: prompt states a prefill worker keeps so a later prompt that
// starts with the same tokens prefills only the rest.
//
// A Kimi-Linear state exists only at the positions where it was saved: the
// KDA recurrent state and conv tails are those of exactly one prefix length.
// Each entry is therefore the whole state after one prompt (KDA states, conv
// tails, and every MLA latent row), keyed by that prompt's tokens. A new prompt
// hits the longest entry that is a proper prefix of it (at least one token
// must remain: its logits give the first token). That is the multi-turn case —
// turn k+1's prompt is turn k's prompt, the reply and the new message — and
// every re-prefill of prompt + generated tokens after a decode failure.
//
// Entries are host copies (a device backend's state is synced to the host for
// a gRPC push anyway); a hit is adopted into the backend like an imported
// bundle. Least recently used entries go first once `capacity_bytes` is
// exceeded. Thread-safe.
#ifndef KL_SERVICES_PREFILL_PREFIX_CACHE_H_
#define KL_SERVICES_PREFILL_PREFIX_CACHE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "engine/state/sequence_state.h"

namespace kl {

struct PrefixCacheStats {
  int64_t entries = 0;
  int64_t bytes = 0;
  int64_t capacity_bytes = 0;
  int64_t queries = 0;       // lookups
  int64_t hits = 0;          // lookups that found an entry
  int64_t query_tokens = 0;  // prompt tokens looked up
  int64_t hit_tokens = 0;    // prompt tokens not prefilled thanks to a hit
  int64_t inserts = 0;
  int64_t evictions = 0;
};

class PrefixCache {
 public:
  struct Entry {
    std::vector<int32_t> tokens;
    SequenceState state;  // host vectors only (device == null); num_tokens == tokens.size()
    int64_t bytes = 0;
  };

  explicit PrefixCache(int64_t capacity_bytes) : capacity_(capacity_bytes) {}

  // The longest entry whose tokens are a proper prefix of `tokens`, or null.
  // Counts a query (and a hit). The entry stays valid while held.
  std::shared_ptr<const Entry> Lookup(absl::Span<const int32_t> tokens);

  // Keeps a host copy of `state` (the state after exactly `tokens`); replaces
  // an entry for the same tokens. An entry larger than the whole capacity is
  // not kept. Returns whether it was kept.
  bool Insert(absl::Span<const int32_t> tokens, const SequenceState& state);

  PrefixCacheStats Stats() const;

  // Bytes an entry for `state` takes (its vectors' floats).
  static int64_t StateBytes(const SequenceState& state);

 private:
  using List = std::list<std::shared_ptr<const Entry>>;  // front: most recently used
  void EraseLocked(List::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t capacity_;
  mutable absl::Mutex mu_;
  List lru_ ABSL_GUARDED_BY(mu_);
  // Hash of an entry's tokens -> its place in lru_ (a collision keeps the newer).
  absl::flat_hash_map<uint64_t, List::iterator> by_hash_ ABSL_GUARDED_BY(mu_);
  // How many entries have each token count (Lookup checks only those lengths).
  absl::flat_hash_map<int64_t, int64_t> lengths_ ABSL_GUARDED_BY(mu_);
  PrefixCacheStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kl

#endif  // KL_SERVICES_PREFILL_PREFIX_CACHE_H_
