// The data a WorkerPicker policy decides on: a snapshot of one pool's workers
// and their loads. Plain values, copied out of the WorkerPool under its lock,
// so a policy is a pure function of its inputs (ARCHITECTURE.md §3).
#ifndef KL_SERVICES_ROUTER_WORKER_LOAD_H_
#define KL_SERVICES_ROUTER_WORKER_LOAD_H_

#include <cstdint>
#include <string>
#include <vector>

namespace kl {

struct WorkerLoad {
  std::string address;  // host:port, the worker's identity in the pool
  // Health SERVING, Stats says ready and not draining, same model as the router.
  bool ready = false;
  // Ready, but a call to it failed since the last successful health check
  // (passive health): used only when no unsuspected worker is left.
  bool suspect = false;
  // Serves another model (state fingerprint differs): never picked.
  bool incompatible = false;
  // Work the worker reported in its last Stats (running + waiting + leases).
  int64_t load = 0;
  // Picks by this router since that Stats sample: load reserved at pick time,
  // so that concurrent picks spread before the next sample shows them.
  int64_t reserved = 0;

  int64_t effective_load() const { return load + reserved; }
};

struct PoolSnapshot {
  std::vector<WorkerLoad> workers;  // in a stable order (sorted by address)
  // Rotates ties: the pool increments it on every pick.
  uint64_t rr_cursor = 0;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_WORKER_LOAD_H_
