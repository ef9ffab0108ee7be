#include "services/router/lease_releaser.h"

#include "engine/common/log.h"
#include "services/common/request_context.h"
#include "services/common/server_util.h"

namespace kl {
namespace {

// Everything one in-flight Release call needs; deleted by its callback.
struct ReleaseCall {
  std::shared_ptr<WorkerEndpoint> worker;
  grpc::ClientContext ctx;
  v1::ReleaseRequest request;
  v1::ReleaseResponse response;
  std::string request_id;
};

}  // namespace

LeaseReleaser::~LeaseReleaser() { WaitIdle(timeout_ + absl::Seconds(1)); }

void LeaseReleaser::Release(std::shared_ptr<WorkerEndpoint> worker, const std::string& lease_id,
                            const std::string& request_id) {
  if (worker == nullptr || worker->decode() == nullptr || lease_id.empty()) return;
  auto* call = new ReleaseCall;
  call->worker = std::move(worker);
  call->request.set_lease_id(lease_id);
  call->request_id = request_id;
  call->ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
  AttachRequestId(&call->ctx, request_id);
  {
    absl::MutexLock l(&counts_->mu);
    ++counts_->in_flight;
    ++counts_->issued;
  }
  call->worker->decode()->async()->Release(
      &call->ctx, &call->request, &call->response,
      [counts = counts_, call](grpc::Status s) {
        if (!s.ok()) {
          ScopedRequestId rid(call->request_id);
          KL_LOG(WARNING).Field("worker", call->worker->address())
                  .Field("lease", call->request.lease_id()).Field("code", s.error_code())
              << "Release failed (the lease expires by its TTL): " << s.error_message();
        }
        delete call;
        absl::MutexLock l(&counts->mu);
        --counts->in_flight;
        if (!s.ok()) ++counts->failed;
      });
}

bool LeaseReleaser::WaitIdle(absl::Duration timeout) {
  Counts* c = counts_.get();
  absl::MutexLock l(&c->mu);
  auto idle = [c]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu) { return c->in_flight == 0; };
  return c->mu.AwaitWithTimeout(absl::Condition(&idle), timeout);
}

int64_t LeaseReleaser::issued() const {
  absl::MutexLock l(&counts_->mu);
  return counts_->issued;
}

int64_t LeaseReleaser::failed() const {
  absl::MutexLock l(&counts_->mu);
  return counts_->failed;
}

}  // namespace kl
