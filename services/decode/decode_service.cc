#include "services/decode/decode_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "services/common/request_context.h"
#include "services/common/status_util.h"
#include "services/decode/worker_codec.h"
#include "services/transport/device_metrics.h"

namespace kl {

DecodeService::DecodeService(Model* model, uint64_t checkpoint_fingerprint,
                             DecodeServiceOptions options)
    : model_(model), checkpoint_fingerprint_(checkpoint_fingerprint), options_(options) {
  LeaseManagerOptions lo;
  lo.slots = options_.slots;
  lo.ttl = options_.lease_ttl;
  lo.latent_rows_capacity = options_.latent_rows_capacity;
  lo.latent_row_granularity = options_.latent_row_granularity;
  lo.max_rows_per_lease = options_.max_rows_per_lease;
  leases_ = std::make_unique<LeaseManager>(lo, options_.clock);
  state_pool_ = std::make_unique<StatePool>(options_.slots);
  DecodeEngineOptions eo;
  eo.state_pool = state_pool_.get();
  eo.max_batch = options_.max_batch > 0 ? options_.max_batch : options_.slots;
  eo.eos_token_id = static_cast<int32_t>(model_->config().eos_token_id);
  eo.metrics = options_.metrics;
  engine_ = std::make_unique<DecodeEngine>(model_, leases_.get(), eo);
  stream_deps_.leases = leases_.get();
  stream_deps_.engine = engine_.get();
  stream_deps_.vocab_size = model_->config().vocab_size;
  stream_deps_.waiting = &decodes_waiting_;
  stream_deps_.stream_buffer_tokens = std::max<int64_t>(1, options_.stream_buffer_tokens);
  push_deps_.leases = leases_.get();
  push_deps_.config = &model_->config();
  push_deps_.checkpoint_fingerprint = checkpoint_fingerprint_;
  push_deps_.integrity_failures = &integrity_failures_;
  push_deps_.state_pool = state_pool_.get();
  push_deps_.transport = options_.transport;
  reaper_ = std::thread([this] { ReapLoop(); });
}

DecodeService::~DecodeService() {
  {
    absl::MutexLock l(&reap_mu_);
    stop_reaper_ = true;
  }
  reaper_.join();
  engine_.reset();  // ends running sequences, releasing their leases
  leases_.reset();  // revokes what is left
}

void DecodeService::ReapLoop() {
  absl::Duration every = options_.reap_interval;
  if (every <= absl::ZeroDuration()) every = std::min(options_.lease_ttl / 4, absl::Seconds(1));
  absl::MutexLock l(&reap_mu_);
  while (!stop_reaper_) {
    reap_mu_.AwaitWithTimeout(absl::Condition(&stop_reaper_), every);
    if (stop_reaper_) break;
    reap_mu_.Unlock();
    leases_->ExpireOverdue();
    reap_mu_.Lock();
  }
}

void DecodeService::Drain() { leases_->SetDraining(true); }

bool DecodeService::WaitIdle(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const LeaseStats s = leases_->Stats();
    if (s.slots_used == 0 && engine_->Stats().running == 0) return true;
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

v1::WorkerStats DecodeService::Snapshot() const {
  const LeaseStats ls = leases_->Stats();
  const DecodeEngineStats es = engine_->Stats();
  v1::WorkerStats s;
  s.set_role("decode");
  s.set_ready(!ls.draining);
  s.set_draining(ls.draining);
  s.set_slots_total(ls.slots_total);
  s.set_slots_used(ls.slots_used);
  s.set_leases_active(ls.leases_waiting);
  s.set_running(es.running);
  s.set_waiting(es.joining + decodes_waiting_.load());
  s.set_transfers_in_flight(ls.pushes_in_flight);
  s.set_latent_rows_used(ls.latent_rows_used);
  s.set_latent_rows_capacity(ls.latent_rows_capacity);
  s.set_requests_completed(es.completed);
  s.set_integrity_failures(integrity_failures_.load());
  s.set_state_fingerprint(FingerprintHex(StateFingerprint(model_->config())));
  s.set_checkpoint_fingerprint(FingerprintHex(checkpoint_fingerprint_));
  if (options_.transport != nullptr) SetDeviceTransportStats(options_.transport->Stats(), &s);
  return s;
}

grpc::ServerUnaryReactor* DecodeService::Reserve(grpc::CallbackServerContext* ctx,
                                                 const v1::ReserveRequest* request,
                                                 v1::ReserveResponse* response) {
  auto* reactor = ctx->DefaultReactor();
  const std::string request_id =
      request->request_id().empty() ? RequestIdOf(*ctx) : request->request_id();
  ScopedRequestId rid(request_id);
  const int64_t context = model_->config().model_max_length;
  if (request->max_total_tokens() > context) {
    KL_LOG(INFO).Field("max_total_tokens", request->max_total_tokens())
        << "reserve refused: exceeds the model's context";
    reactor->Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("max_total_tokens ", request->max_total_tokens(),
                     " exceeds the model's context of ", context, " tokens")));
    return reactor;
  }
  absl::StatusOr<LeaseGrant> grant = leases_->Reserve(request_id, request->max_total_tokens());
  if (grant.ok()) {
    response->set_lease_id(grant->lease_id);
    response->set_ttl_seconds(absl::ToDoubleSeconds(grant->ttl));
    KL_LOG(INFO).Field("lease", grant->lease_id)
            .Field("max_total_tokens", request->max_total_tokens())
        << "lease reserved";
  } else {
    KL_LOG(INFO).Field("code", absl::StatusCodeToString(grant.status().code()))
        << "reserve refused: " << grant.status().message();
  }
  reactor->Finish(ToGrpcStatus(grant.status()));
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::Release(grpc::CallbackServerContext* ctx,
                                                 const v1::ReleaseRequest* request,
                                                 v1::ReleaseResponse* /*response*/) {
  auto* reactor = ctx->DefaultReactor();
  ScopedRequestId rid(RequestIdOf(*ctx));
  KL_LOG(DEBUG).Field("lease", request->lease_id()) << "lease release requested";
  leases_->Release(request->lease_id());  // idempotent: unknown ids are fine
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerReadReactor<v1::StatePart>* DecodeService::PushState(grpc::CallbackServerContext* ctx,
                                                                 v1::PushStateResponse* response) {
  return StartPushCall(ctx, response, push_deps_);
}

grpc::ServerWriteReactor<v1::DecodeResponse>* DecodeService::Decode(
    grpc::CallbackServerContext* ctx, const v1::DecodeRequest* request) {
  return StartDecodeCall(ctx, *request, stream_deps_);
}

grpc::ServerUnaryReactor* DecodeService::Stats(grpc::CallbackServerContext* ctx,
                                               const v1::WorkerStatsRequest* /*request*/,
                                               v1::WorkerStats* response) {
  auto* reactor = ctx->DefaultReactor();
  *response = Snapshot();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::OpenTransport(grpc::CallbackServerContext* ctx,
                                                       const v1::OpenTransportRequest* request,
                                                       v1::OpenTransportResponse* response) {
  auto* reactor = ctx->DefaultReactor();
  if (options_.transport == nullptr) {
    response->set_transport("grpc");
    response->set_reason("this decode worker has no device transport (CPU build or backend)");
  } else {
    *response = options_.transport->Accept(*request);
  }
  KL_LOG(INFO).Field("peer", ctx->peer()).Field("transport", response->transport())
      << "device transport offer" << (response->reason().empty() ? "" : ": ")
      << response->reason();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void RegisterDecodeCallbacks(Metrics& m, const DecodeService* s) {
  using Field = int64_t (v1::WorkerStats::*)() const;
  auto get = [s](Field f) { return [s, f] { return static_cast<double>((s->Snapshot().*f)()); }; };
  m.AddCallbackGauge("kl_state_slots_used", "State slots held by a lease.", {},
                     get(&v1::WorkerStats::slots_used));
  m.AddCallbackGauge("kl_state_slots_capacity", "State slots of this decode worker (--slots).", {},
                     get(&v1::WorkerStats::slots_total));
  m.AddCallbackGauge("kl_leases_active",
                     "Leases granted whose state has not yet been handed to a decode stream "
                     "(reserved or receiving the push).",
                     {}, get(&v1::WorkerStats::leases_active));
  m.AddCallbackGauge("kl_latent_rows_used", "MLA latent rows (tokens) held by leases.", {},
                     get(&v1::WorkerStats::latent_rows_used));
  m.AddCallbackGauge("kl_latent_cache_usage_perc",
                     "Fraction (0..1) of --latent_rows in use; 0 when unbounded.", {}, [s] {
                       const v1::WorkerStats w = s->Snapshot();
                       return w.latent_rows_capacity() > 0
                                  ? static_cast<double>(w.latent_rows_used()) /
                                        static_cast<double>(w.latent_rows_capacity())
                                  : 0.0;
                     });
  m.AddCallbackGauge("kl_state_transfers_in_flight", "State pushes in progress, by stage.",
                     {{"stage", "decode"}}, get(&v1::WorkerStats::transfers_in_flight));
  m.AddCallbackGauge("kl_num_requests_running", "Requests running, by stage.",
                     {{"stage", "decode"}}, get(&v1::WorkerStats::running));
  m.AddCallbackGauge("kl_num_requests_waiting", "Requests waiting, by stage.",
                     {{"stage", "decode"}}, get(&v1::WorkerStats::waiting));
  m.AddCallbackCounter("kl_state_integrity_failures_total",
                       "Pushed states refused by verification (fingerprint, size, checksum).",
                       {}, get(&v1::WorkerStats::integrity_failures));
  m.AddCallbackGauge("kl_device_links", "NCCL device links to prefill workers that are up.", {},
                     get(&v1::WorkerStats::device_links));
  m.AddCallbackCounter("kl_device_transfers_total",
                       "States received over device links (NCCL) and verified.", {},
                       get(&v1::WorkerStats::device_transfers));
  m.AddCallbackCounter("kl_device_transfer_failures_total",
                       "Device transfers (NCCL) refused, cut or timed out; the link was dropped.",
                       {}, get(&v1::WorkerStats::device_transfer_failures));
  RegisterDeviceTransportCallbacks(m, [s] { return s->Snapshot(); });
  m.AddCallbackCounter("kl_decode_requests_completed_total",
                       "Sequences that finished on this worker (stop or length).", {},
                       get(&v1::WorkerStats::requests_completed));
}

}  // namespace kl
