// One Generate request from admission to its last chunk, as docs/cluster.md
// "One request" describes it: Reserve on a decode worker, Prefill with that
// lease as the target, the first token to the client at once, then the Decode
// stream relayed through OutputProcessor, and a final chunk with Usage. Also
// its failure semantics: retries on another worker pair before the first
// token, migration to another decode worker after it, cancellation, deadline,
// and the release of every lease the request reserved.
//
// Threading: RunGenerateRequest blocks (synchronous worker calls) and runs on a
// router driver thread, never on a gRPC callback thread. Client cancellation
// reaches it through the job's CancelToken, which cancels the worker call in
// progress.
#ifndef KL_SERVICES_ROUTER_REQUEST_LIFECYCLE_H_
#define KL_SERVICES_ROUTER_REQUEST_LIFECYCLE_H_

#include <memory>
#include <string>

#include "absl/time/time.h"
#include "engine/sampling/sampler.h"
#include "proto/generation.pb.h"
#include "services/router/generate_call.h"
#include "services/router/lease_releaser.h"
#include "services/router/model_meta.h"
#include "services/router/prefix_affinity.h"
#include "services/router/request_validation.h"
#include "services/router/router_metrics.h"
#include "services/router/router_stats.h"
#include "services/router/worker_pool.h"

namespace kl {

// One admitted request.
struct GenerateJob {
  GenerateCall* call = nullptr;  // the client's stream; valid until RunGenerateRequest finishes it
  std::shared_ptr<CancelToken> cancel;
  v1::GenerateRequest request;   // passed ValidateGenerateRequest
  std::string request_id;
  SamplingParams sampling;       // validated, with the seed set
  absl::Time received;           // router receipt: TTFT and E2E start here
  absl::Time deadline;           // the client's, or receipt + the default
};

// The long-lived pieces every request uses; owned by RouterService.
struct RouterContext {
  const ModelMeta* model = nullptr;
  RequestLimits limits;
  WorkerPool* prefill = nullptr;
  WorkerPool* decode = nullptr;
  LeaseReleaser* releaser = nullptr;
  RouterCounters* counters = nullptr;
  RouterMetrics* metrics = nullptr;  // null: metrics off
  int retries = 3;         // extra worker-pair attempts before the first token
  int max_migrations = 3;  // decode-worker moves after the first token
  // How long a request may wait for a decode slot when every decode worker is
  // full (then RESOURCE_EXHAUSTED); the deadline bounds it too.
  absl::Duration decode_slot_wait = absl::Seconds(30);
  PrefixAffinity* affinity = nullptr;  // null: prefill picks by load only
  int64_t affinity_slack = 2;
};

// Runs `job` to its end and finishes job.call with the outcome. Blocking.
void RunGenerateRequest(GenerateJob job, const RouterContext& router);

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_REQUEST_LIFECYCLE_H_
