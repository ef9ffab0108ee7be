// WorkerPool: the prefill or decode workers the router may use, discovered
// from a static address list and/or DNS names (re-resolved periodically), each
// health-checked (grpc.health.v1 Check) and load-sampled (kl.v1 Stats) by a
// background thread. Pick() applies the least-loaded policy to a snapshot and
// reserves load on the chosen worker at once, so concurrent picks spread.
//
// Thread-safety: every public method may be called from any thread. Pick and
// ReportFailure only take a mutex (no I/O); DNS and health RPCs happen on the
// pool's refresher thread (or the caller of RefreshNow).
#ifndef KL_SERVICES_ROUTER_WORKER_POOL_H_
#define KL_SERVICES_ROUTER_WORKER_POOL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/health.grpc.pb.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/tls.h"
#include "services/router/worker_load.h"

namespace kl {

enum class WorkerRole { kPrefill, kDecode };
const char* WorkerRoleName(WorkerRole role);  // "prefill" / "decode"

struct WorkerPoolOptions {
  WorkerRole role = WorkerRole::kDecode;
  std::vector<std::string> addresses;    // static members, host:port
  std::vector<std::string> dns_targets;  // name:port, every A/AAAA record is a member
  absl::Duration health_interval = absl::Seconds(1);
  absl::Duration dns_interval = absl::Seconds(5);
  absl::Duration check_timeout = absl::Milliseconds(800);  // per Check / Stats RPC
  // The router's model (StateFingerprint); workers reporting another one in
  // Stats are never picked. 0 accepts any.
  uint64_t state_fingerprint = 0;
  int max_message_bytes = 64 << 20;
  // Transport to the workers: the cluster's mutual TLS (tls.h), or plaintext.
  ChannelSecurity security;
};

// One worker: its channel and stubs. Shared (shared_ptr) by the pool and the
// requests using it, so a worker that leaves DNS stays usable by requests that
// already hold it. Stubs are thread-safe.
class WorkerEndpoint {
 public:
  WorkerEndpoint(std::string address, WorkerRole role, int max_message_bytes,
                 const ChannelSecurity& security = {});
  const std::string& address() const { return address_; }
  WorkerRole role() const { return role_; }
  v1::Prefill::Stub* prefill() const { return prefill_.get(); }  // null for decode
  v1::Decode::Stub* decode() const { return decode_.get(); }     // null for prefill
  grpc::health::v1::Health::Stub* health() const { return health_.get(); }

 private:
  std::string address_;
  WorkerRole role_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Prefill::Stub> prefill_;
  std::unique_ptr<v1::Decode::Stub> decode_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

class WorkerPool {
 public:
  // Resolves and checks every worker once (so a router that starts serving
  // right away sees its workers), then starts the refresher thread.
  static std::unique_ptr<WorkerPool> Start(WorkerPoolOptions options);
  ~WorkerPool();  // stops and joins the refresher thread
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // The least-loaded ready worker (least_loaded_picker.h; `exclude` lists
  // addresses that already failed this request), with one unit of load
  // reserved on it until the next Stats sample. UNAVAILABLE when no worker is
  // ready; FAILED_PRECONDITION when the only ready ones serve another model.
  // `preferred` / `slack`: see PickWorker.
  absl::StatusOr<std::shared_ptr<WorkerEndpoint>> Pick(
      const absl::flat_hash_set<std::string>& exclude, const std::string& preferred = "",
      int64_t slack = 0);

  // Passive health: a call to `address` failed as if the worker were gone.
  // It is picked only as a last resort until its next successful check.
  void ReportFailure(const std::string& address);

  // Re-resolves DNS (when due) and checks every worker now; blocks up to about
  // check_timeout. Concurrent calls are serialised.
  void RefreshNow();

  PoolSnapshot Snapshot() const;
  WorkerRole role() const { return options_.role; }

 private:
  struct Member {
    std::shared_ptr<WorkerEndpoint> endpoint;
    bool healthy = false;       // last Check said SERVING and Stats allowed it
    bool incompatible = false;  // Stats reported another model
    bool suspect = false;       // ReportFailure since the last check
    int64_t load = 0;
    int64_t reserved = 0;
    std::string state;  // why not ready, for error messages ("" when ready)
  };
  struct CheckResult;

  explicit WorkerPool(WorkerPoolOptions options);
  std::vector<std::string> TargetAddresses();  // static + resolved (refresh thread)
  void SyncMembers(const std::vector<std::string>& addresses);
  void CheckAll(std::vector<std::unique_ptr<CheckResult>>* results);
  void Apply(const CheckResult& result);
  PoolSnapshot SnapshotLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string DescribeLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RefreshLoop();

  const WorkerPoolOptions options_;

  absl::Mutex refresh_mu_;  // serialises RefreshNow; guards the DNS cache
  std::vector<std::string> dns_addresses_ ABSL_GUARDED_BY(refresh_mu_);
  absl::Time next_dns_ ABSL_GUARDED_BY(refresh_mu_) = absl::InfinitePast();

  mutable absl::Mutex mu_;
  std::map<std::string, Member> members_ ABSL_GUARDED_BY(mu_);  // by address
  uint64_t rr_cursor_ ABSL_GUARDED_BY(mu_) = 0;

  absl::Mutex stop_mu_;
  bool stop_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread refresher_;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_WORKER_POOL_H_
