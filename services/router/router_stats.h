// Router counters: atomics updated by request drivers and the service, and the
// plain RouterStats snapshot tests and introspection read.
#ifndef KL_SERVICES_ROUTER_ROUTER_STATS_H_
#define KL_SERVICES_ROUTER_ROUTER_STATS_H_

#include <atomic>
#include <cstdint>

namespace kl {

// Monotonic counters since start. Thread-safe (relaxed atomics: each counter
// is exact, a snapshot of several is not a single instant).
struct RouterCounters {
  std::atomic<int64_t> admitted{0};           // accepted into the admission queue
  std::atomic<int64_t> rejected_full{0};      // RESOURCE_EXHAUSTED: queue full
  std::atomic<int64_t> rejected_draining{0};  // UNAVAILABLE: draining
  std::atomic<int64_t> invalid{0};            // INVALID_ARGUMENT
  std::atomic<int64_t> rejected_unauthenticated{0};  // UNAUTHENTICATED: no / unknown API key
  std::atomic<int64_t> rejected_client_limit{0};     // RESOURCE_EXHAUSTED: per-client limit
  std::atomic<int64_t> completed{0};          // finished OK
  std::atomic<int64_t> failed{0};             // finished with an error (not cancel)
  std::atomic<int64_t> cancelled{0};          // client cancelled
  std::atomic<int64_t> retries{0};            // extra attempts before the first token
  std::atomic<int64_t> migrations{0};         // moves to another decode worker
  std::atomic<int64_t> stop_cancels{0};       // decode streams cancelled by a stop string
  // Prefill picks where a worker held the prompt's prefix (prefix_affinity.h):
  std::atomic<int64_t> affinity_followed{0};    // sent there
  std::atomic<int64_t> affinity_overridden{0};  // sent elsewhere (busier than the slack allows)
  std::atomic<int64_t> waiting_decode_slot{0};  // now: waiting because every decode worker is full
};

struct RouterStats {
  int64_t queue_depth = 0;  // admitted, waiting for a driver thread
  int64_t in_flight = 0;    // on a driver thread
  int64_t admitted = 0;
  int64_t rejected_full = 0;
  int64_t rejected_draining = 0;
  int64_t invalid = 0;
  int64_t rejected_unauthenticated = 0;
  int64_t rejected_client_limit = 0;
  int64_t client_streams = 0;   // Generate calls holding a per-client slot now
  int64_t completed = 0;
  int64_t failed = 0;
  int64_t cancelled = 0;
  int64_t retries = 0;
  int64_t migrations = 0;
  int64_t stop_cancels = 0;
  int64_t affinity_followed = 0;
  int64_t affinity_overridden = 0;
  int64_t waiting_decode_slot = 0;
  int64_t releases_sent = 0;    // Decode.Release calls issued
  int64_t releases_failed = 0;
  bool draining = false;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_ROUTER_STATS_H_
