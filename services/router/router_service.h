// RouterService: kl.v1.Generation served by kl-router in front of prefill and
// decode worker pools (docs/cluster.md). Generate validates on gRPC's thread,
// admits the request to a bounded queue (RESOURCE_EXHAUSTED at once when full)
// and runs its lifecycle (request_lifecycle.h) on one of `max_inflight` driver
// threads; Tokenize and ModelInfo answer inline.
//
// Threading: gRPC callback threads never block here. Driver threads block on
// worker calls and on client flow control. Each WorkerPool has a refresher
// thread. Stats() and the drain methods may be called from any thread.
#ifndef KL_SERVICES_ROUTER_ROUTER_SERVICE_H_
#define KL_SERVICES_ROUTER_ROUTER_SERVICE_H_

#include <cstdint>
#include <memory>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/generation.grpc.pb.h"
#include "services/router/admission_queue.h"
#include "services/router/api_keys.h"
#include "services/router/client_limiter.h"
#include "services/router/generate_call.h"
#include "services/router/lease_releaser.h"
#include "services/router/model_meta.h"
#include "services/router/request_lifecycle.h"
#include "services/router/router_stats.h"
#include "services/router/worker_pool.h"

namespace kl {

// Validated once in main (or a test) and passed down.
struct RouterOptions {
  int64_t max_queue = 256;     // admitted requests waiting for a driver thread
  int64_t max_inflight = 64;   // requests running at once (driver threads)
  absl::Duration default_deadline = absl::Seconds(300);  // when the client sets none
  int64_t max_prompt_tokens = 0;   // 0: the model's model_max_length
  int64_t max_tokens_limit = 0;    // largest sampling.max_tokens; 0: model_max_length
  int64_t default_max_tokens = 256;
  int retries = 3;                 // extra worker-pair attempts before the first token
  int max_migrations = 3;          // decode-worker moves after the first token
  absl::Duration release_timeout = absl::Seconds(5);  // deadline of a Decode.Release
  WorkerPoolOptions prefill;       // role and fingerprint are set by Create
  WorkerPoolOptions decode;
  RouterMetrics* metrics = nullptr;  // null: no Prometheus metrics; must outlive the service
  // Public API authentication (api_keys.h): null = off. With keys, Generate,
  // Tokenize and ModelInfo need one (UNAUTHENTICATED otherwise); health and
  // reflection are separate services and stay open.
  std::shared_ptr<const ApiKeys> api_keys;
  // Generate streams one client may run at once (client_limiter.h); 0 = no limit.
  int64_t max_concurrent_per_client = 0;
  // Prefix affinity (prefix_affinity.h): prompts extending one a prefill
  // worker prefilled go back to it while its load is at most the least
  // loaded worker's plus `prefix_affinity_slack`. 0 entries = off.
  int64_t prefix_affinity_entries = 65536;
  int64_t prefix_affinity_slack = 2;
  // How long a request may wait for a decode slot while every decode worker
  // is full (RESOURCE_EXHAUSTED after that); 0 = refuse at once.
  absl::Duration decode_slot_wait = absl::Seconds(30);
};

class RouterService final : public v1::Generation::CallbackService {
 public:
  // Starts both worker pools (one synchronous health round each) and the
  // driver threads. INVALID_ARGUMENT for inconsistent options.
  static absl::StatusOr<std::unique_ptr<RouterService>> Create(
      RouterOptions options, std::shared_ptr<const ModelMeta> model);
  // Cancels whatever still runs (UNAVAILABLE), joins the driver threads and
  // waits for lease releases. Shut the grpc::Server down first.
  ~RouterService() override;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* ModelInfo(grpc::CallbackServerContext* ctx,
                                      const v1::ModelInfoRequest* request,
                                      v1::ModelInfoResponse* response) override;

  // Drain, step 1: new Generate calls get UNAVAILABLE from now on. (Health
  // NOT_SERVING is the server owner's part: RunningServer::SetServing.)
  void StartDrain();
  // StartDrain, then waits up to `grace` for running and queued requests to
  // finish; past it, cancels them (UNAVAILABLE). True if all finished in time.
  bool Drain(absl::Duration grace);
  // Cancels every admitted request with `reason`.
  void CancelAll(const absl::Status& reason);

  RouterStats Stats() const;
  const RouterOptions& options() const { return options_; }
  const ClientLimiter& client_limiter() const { return *client_limiter_; }
  const RequestLimits& limits() const { return context_.limits; }
  WorkerPool& prefill_pool() { return *prefill_; }
  WorkerPool& decode_pool() { return *decode_; }

 private:
  RouterService(RouterOptions options, std::shared_ptr<const ModelMeta> model);
  // Runs on a driver thread.
  void Drive(std::shared_ptr<GenerateJob> job);
  GenerateCall* Reject(GenerateCall* call, const absl::Status& status);
  // The client's name (its API key's) when keys are configured, else its peer
  // IP; UNAUTHENTICATED (counted) without a valid key.
  absl::StatusOr<std::string> Authenticate(const grpc::CallbackServerContext& ctx);

  const RouterOptions options_;
  const std::shared_ptr<const ModelMeta> model_;
  RouterCounters counters_;
  std::unique_ptr<WorkerPool> prefill_;
  std::unique_ptr<WorkerPool> decode_;
  std::unique_ptr<LeaseReleaser> releaser_;
  std::unique_ptr<PrefixAffinity> affinity_;
  RouterContext context_;
  std::atomic<bool> draining_{false};
  const std::shared_ptr<ClientLimiter> client_limiter_;

  mutable absl::Mutex live_mu_;
  // Cancel tokens of admitted requests, for CancelAll.
  absl::flat_hash_set<std::shared_ptr<CancelToken>> live_ ABSL_GUARDED_BY(live_mu_);

  // Last member: destroyed (threads joined) before everything above.
  std::unique_ptr<AdmissionQueue> admission_;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_ROUTER_SERVICE_H_
