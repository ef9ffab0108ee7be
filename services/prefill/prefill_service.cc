#include "services/prefill/prefill_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "services/common/request_context.h"
#include "services/common/server_util.h"
#include "services/common/status_util.h"
#include "services/decode/worker_codec.h"
#include "services/transport/device_metrics.h"

namespace kl {
namespace {

class PrefillReactor final : public grpc::ServerUnaryReactor {
 public:
  void set_job(std::shared_ptr<PrefillJob> job) { job_ = std::move(job); }
  // Client gone or deadline passed: stop the work and its push.
  void OnCancel() override {
    if (job_) job_->Cancel(absl::CancelledError("prefill cancelled (client gone or deadline)"));
  }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<PrefillJob> job_;
};

absl::StatusOr<PrefillJob::Spec> SpecFromRequest(const v1::PrefillRequest& r,
                                                 const ModelConfig& c,
                                                 const grpc::CallbackServerContext& ctx) {
  if (r.token_ids().empty()) return absl::InvalidArgumentError("token_ids is empty");
  if (r.token_ids_size() > c.model_max_length) {
    return absl::InvalidArgumentError(absl::StrCat("token_ids has ", r.token_ids_size(),
                                                   " tokens, the model's context is ",
                                                   c.model_max_length));
  }
  for (int i = 0; i < r.token_ids_size(); ++i) {
    const int32_t id = r.token_ids(i);
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token_ids[", i, "] = ", id,
                                                     " out of range [0, ", c.vocab_size, ")"));
    }
  }
  if (r.sample_index() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sample_index must be >= 0, got ", r.sample_index()));
  }
  if (r.target().address().empty()) return absl::InvalidArgumentError("target.address is empty");
  if (r.target().lease_id().empty()) return absl::InvalidArgumentError("target.lease_id is empty");
  absl::StatusOr<SamplingParams> params = SamplingFromProto(r.sampling(), 1, c.vocab_size);
  if (!params.ok()) return params.status();
  PrefillJob::Spec spec;
  spec.request_id = r.request_id().empty() ? RequestIdOf(ctx) : r.request_id();
  spec.tokens.assign(r.token_ids().begin(), r.token_ids().end());
  spec.params = *std::move(params);
  spec.sample_index = r.sample_index();
  spec.target_address = r.target().address();
  spec.lease_id = r.target().lease_id();
  spec.deadline = ctx.deadline();  // the push inherits the request's deadline
  return spec;
}

}  // namespace

PrefillService::PrefillService(Model* model, uint64_t checkpoint_fingerprint,
                               PrefillServiceOptions options)
    : model_(model),
      checkpoint_fingerprint_(checkpoint_fingerprint),
      transport_(options.transport) {
  PrefillEngineOptions eo;
  eo.max_batch_tokens = options.max_batch_tokens;
  eo.max_queue = options.max_queue;
  eo.bundle.conv_dtype = options.bundle_dtype;
  eo.bundle.mla_dtype = options.bundle_dtype;
  eo.checkpoint_fingerprint = checkpoint_fingerprint;
  eo.metrics = options.metrics;
  eo.push_security = options.push_security;
  eo.fault_injector = options.fault_injector;
  eo.transport = options.transport;
  eo.prefix_cache_bytes = options.prefix_cache_bytes;
  engine_ = std::make_unique<PrefillEngine>(model_, eo);
}

PrefillService::~PrefillService() = default;

void PrefillService::Drain() { engine_->Drain(); }

bool PrefillService::WaitIdle(absl::Duration timeout) { return engine_->WaitIdle(timeout); }

v1::WorkerStats PrefillService::Snapshot() const {
  const PrefillEngineStats es = engine_->Stats();
  v1::WorkerStats s;
  s.set_role("prefill");
  s.set_ready(!es.draining);
  s.set_draining(es.draining);
  s.set_running(es.running);
  s.set_waiting(es.waiting);
  s.set_transfers_in_flight(es.transfers_in_flight);
  s.set_requests_completed(es.completed);
  s.set_state_fingerprint(FingerprintHex(StateFingerprint(model_->config())));
  s.set_checkpoint_fingerprint(FingerprintHex(checkpoint_fingerprint_));
  if (transport_ != nullptr) SetDeviceTransportStats(transport_->Stats(), &s);
  if (const PrefixCache* cache = engine_->prefix_cache()) {
    const PrefixCacheStats p = cache->Stats();
    s.set_prefix_cache_queries(p.queries);
    s.set_prefix_cache_hits(p.hits);
    s.set_prefix_cache_hit_tokens(p.hit_tokens);
    s.set_prefix_cache_bytes(p.bytes);
    s.set_prefix_cache_entries(p.entries);
    s.set_prefix_cache_query_tokens(p.query_tokens);
  }
  return s;
}

grpc::ServerUnaryReactor* PrefillService::Prefill(grpc::CallbackServerContext* ctx,
                                                  const v1::PrefillRequest* request,
                                                  v1::PrefillResponse* response) {
  auto* reactor = new PrefillReactor();
  const std::string request_id =
      request->request_id().empty() ? RequestIdOf(*ctx) : request->request_id();
  ScopedRequestId rid(request_id);
  absl::StatusOr<PrefillJob::Spec> spec = SpecFromRequest(*request, model_->config(), *ctx);
  if (!spec.ok()) {
    KL_LOG(INFO).Field("code", absl::StatusCodeToString(spec.status().code()))
        << "prefill refused: " << spec.status().message();
    reactor->Finish(ToGrpcStatus(spec.status()));
    return reactor;
  }
  KL_LOG(DEBUG).Field("tokens", request->token_ids_size()).Field("target", request->target().address())
      << "prefill queued";
  // Runs once, on whichever thread completes the job; Finish is the last touch
  // of the reactor and the response (gRPC frees them after OnDone). The one
  // log line per prefill is written here, where every outcome passes.
  auto done = [reactor, response, request_id](const absl::StatusOr<PrefillResult>& r) {
    ScopedRequestId rid(request_id);
    if (r.ok()) {
      KL_LOG(INFO)
              .Field("tokens", r->num_tokens)
              .Field("queue_s", r->queue_seconds)
              .Field("prefill_s", r->prefill_seconds)
              .Field("transfer_s", r->transfer_seconds)
              .Field("transfer_bytes", r->transfer_bytes)
              .Field("cached_tokens", r->cached_tokens)
          << "prefill done";
    } else if (r.status().code() == absl::StatusCode::kCancelled) {
      KL_LOG(INFO) << "prefill cancelled: " << r.status().message();
    } else {
      KL_LOG(WARNING).Field("code", absl::StatusCodeToString(r.status().code()))
          << "prefill failed: " << r.status().message();
    }
    if (r.ok()) {
      response->set_token(r->token);
      response->set_num_tokens(r->num_tokens);
      response->set_queue_seconds(r->queue_seconds);
      response->set_prefill_seconds(r->prefill_seconds);
      response->set_transfer_seconds(r->transfer_seconds);
      response->set_transfer_bytes(r->transfer_bytes);
      response->set_cached_tokens(r->cached_tokens);
    }
    reactor->Finish(ToGrpcStatus(r.status()));
  };
  auto job = std::make_shared<PrefillJob>(*std::move(spec), std::move(done));
  reactor->set_job(job);
  if (absl::Status s = engine_->Submit(job); !s.ok()) job->Complete(s);
  return reactor;
}

grpc::ServerUnaryReactor* PrefillService::Stats(grpc::CallbackServerContext* ctx,
                                                const v1::WorkerStatsRequest* /*request*/,
                                                v1::WorkerStats* response) {
  auto* reactor = ctx->DefaultReactor();
  *response = Snapshot();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kl
