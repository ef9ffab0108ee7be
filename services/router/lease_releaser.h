// Fire-and-forget Decode.Release calls (gRPC callback API), so that freeing a
// lease on a slow or dead worker never holds up a client's stream or a driver
// thread. Release is idempotent on the worker, so the router may release any
// lease it is not sure the worker already freed.
//
// Thread-safety: all methods may be called from any thread.
#ifndef KL_SERVICES_ROUTER_LEASE_RELEASER_H_
#define KL_SERVICES_ROUTER_LEASE_RELEASER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "services/router/worker_pool.h"

namespace kl {

class LeaseReleaser {
 public:
  // Each Release RPC gets `timeout` as its deadline.
  explicit LeaseReleaser(absl::Duration timeout) : timeout_(timeout) {}
  // Waits for the releases still in flight (each ends within `timeout`).
  ~LeaseReleaser();

  // Sends Decode.Release(lease_id) to `worker` with x-request-id metadata.
  void Release(std::shared_ptr<WorkerEndpoint> worker, const std::string& lease_id,
               const std::string& request_id);

  // True once no release is in flight; false if `timeout` passed first.
  bool WaitIdle(absl::Duration timeout);

  int64_t issued() const;
  int64_t failed() const;

 private:
  // Shared with the callbacks, so a late one never touches a destroyed releaser.
  struct Counts {
    absl::Mutex mu;
    int64_t in_flight ABSL_GUARDED_BY(mu) = 0;
    int64_t issued ABSL_GUARDED_BY(mu) = 0;
    int64_t failed ABSL_GUARDED_BY(mu) = 0;
  };
  const absl::Duration timeout_;
  const std::shared_ptr<Counts> counts_ = std::make_shared<Counts>();
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_LEASE_RELEASER_H_
