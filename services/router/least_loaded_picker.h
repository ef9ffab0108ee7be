// Least-loaded worker choice, the router's default WorkerPicker policy: a pure
// function of a PoolSnapshot (no clock, no randomness, no I/O), so it is tested
// exhaustively without servers.
#ifndef KL_SERVICES_ROUTER_LEAST_LOADED_PICKER_H_
#define KL_SERVICES_ROUTER_LEAST_LOADED_PICKER_H_

#include <cstddef>
#include <optional>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "services/router/worker_load.h"

namespace kl {

// Index in snapshot.workers of the worker to use, or nullopt if no worker is
// ready and compatible. Candidates come in tiers, the first non-empty one wins:
//   1. ready, not suspect, address not in `exclude`;
//   2. ready, not in `exclude` (suspect ones allowed);
//   3. ready (excluded ones allowed: retrying a worker beats failing when a
//      pool has a single member).
// Within the tier: the smallest effective_load(); ties go round-robin, the
// (rr_cursor % ties)-th tied worker in snapshot order.
//
// `preferred` (a worker that holds state this request can reuse, e.g. the
// prefill worker that cached its conversation's previous prompt) wins when it
// is a tier-1 candidate whose effective_load() is at most the least one plus
// `slack`: affinity never piles work on one worker beyond that.
std::optional<size_t> PickWorker(const PoolSnapshot& snapshot,
                                 const absl::flat_hash_set<std::string>& exclude,
                                 const std::string& preferred = "", int64_t slack = 0);

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_LEAST_LOADED_PICKER_H_
