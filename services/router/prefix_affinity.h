// PrefixAffinity: which prefill worker last prefilled a prompt, so that a
// prompt extending it (the next turn of a conversation, a re-prefill after a
// decode worker failed) goes where that prompt's state is cached
// (services/prefill/prefix_cache.h) — within the picker's load slack
// (least_loaded_picker.h), never piling work on one worker.
//
// Keeps up to `max_entries` (prompt hash, length) -> worker records, least
// recently recorded first out. Only 64-bit hashes are kept, no tokens: a
// collision only sends a request to another worker, which then prefills it
// whole. Thread-safe.
#ifndef KL_SERVICES_ROUTER_PREFIX_AFFINITY_H_
#define KL_SERVICES_ROUTER_PREFIX_AFFINITY_H_

#include <cstdint>
#include <list>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace kl {

class PrefixAffinity {
 public:
  explicit PrefixAffinity(int64_t max_entries) : max_entries_(max_entries) {}

  // The worker recorded for the longest proper prefix of `tokens`; "" if none.
  std::string Lookup(absl::Span<const int32_t> tokens) const;
  // `worker` prefilled exactly `tokens` (and keeps their state).
  void Record(absl::Span<const int32_t> tokens, const std::string& worker);
  int64_t size() const;

 private:
  struct Entry {
    uint64_t hash;
    int64_t length;
    std::string worker;
  };
  using List = std::list<Entry>;  // front: most recently recorded
  void EraseLocked(List::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t max_entries_;
  mutable absl::Mutex mu_;
  List lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, List::iterator> by_hash_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int64_t, int64_t> lengths_ ABSL_GUARDED_BY(mu_);  // length -> records
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_PREFIX_AFFINITY_H_
