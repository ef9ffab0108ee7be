#include "services/router/router_service.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "services/common/request_context.h"
#include "services/common/status_util.h"

namespace kl {
namespace {

absl::Status CheckOptions(const RouterOptions& o) {
  auto bad = [](absl::string_view what) { return absl::InvalidArgumentError(what); };
  if (o.max_inflight < 1) return bad("max_inflight must be >= 1");
  if (o.max_queue < 1) return bad("max_queue must be >= 1");
  if (o.default_deadline <= absl::ZeroDuration()) return bad("default_deadline must be > 0");
  if (o.max_prompt_tokens < 0) return bad("max_prompt_tokens must be >= 0");
  if (o.max_tokens_limit < 0) return bad("max_tokens_limit must be >= 0");
  if (o.default_max_tokens < 1) return bad("default_max_tokens must be >= 1");
  if (o.retries < 0) return bad("retries must be >= 0");
  if (o.max_migrations < 0) return bad("max_migrations must be >= 0");
  if (o.max_concurrent_per_client < 0) return bad("max_concurrent_per_client must be >= 0");
  if (o.prefix_affinity_entries < 0) return bad("prefix_affinity_entries must be >= 0");
  if (o.prefix_affinity_slack < 0) return bad("prefix_affinity_slack must be >= 0");
  if (o.decode_slot_wait < absl::ZeroDuration()) return bad("decode_slot_wait must be >= 0");
  return absl::OkStatus();
}

// The client's deadline, or none (infinite).
std::optional<absl::Time> ClientDeadline(const grpc::CallbackServerContext& ctx) {
  const auto d = ctx.deadline();
  if (d == std::chrono::system_clock::time_point::max()) return std::nullopt;
  return absl::FromChrono(d);
}

}  // namespace

RouterService::RouterService(RouterOptions options, std::shared_ptr<const ModelMeta> model)
    : options_(std::move(options)),
      model_(std::move(model)),
      client_limiter_(ClientLimiter::Create(options_.max_concurrent_per_client)) {}

absl::StatusOr<std::unique_ptr<RouterService>> RouterService::Create(
    RouterOptions options, std::shared_ptr<const ModelMeta> model) {
  if (model == nullptr) return absl::InvalidArgumentError("no model metadata");
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  const int64_t model_max = model->config().model_max_length;
  // 0 = the model's context; never more than it.
  if (options.max_prompt_tokens == 0 || options.max_prompt_tokens > model_max) {
    options.max_prompt_tokens = model_max;
  }
  if (options.max_tokens_limit == 0 || options.max_tokens_limit > model_max) {
    options.max_tokens_limit = model_max;
  }
  options.default_max_tokens = std::min(options.default_max_tokens, options.max_tokens_limit);
  options.prefill.role = WorkerRole::kPrefill;
  options.decode.role = WorkerRole::kDecode;
  options.prefill.state_fingerprint = model->state_fingerprint();
  options.decode.state_fingerprint = model->state_fingerprint();

  std::unique_ptr<RouterService> r(new RouterService(std::move(options), std::move(model)));
  const RouterOptions& o = r->options_;
  r->prefill_ = WorkerPool::Start(o.prefill);
  r->decode_ = WorkerPool::Start(o.decode);
  r->releaser_ = std::make_unique<LeaseReleaser>(o.release_timeout);
  RouterContext& c = r->context_;
  c.model = r->model_.get();
  c.limits.vocab_size = r->model_->tokenizer().vocab_size();
  c.limits.max_prompt_tokens = o.max_prompt_tokens;
  c.limits.max_tokens_limit = o.max_tokens_limit;
  c.limits.default_max_tokens = o.default_max_tokens;
  c.limits.context_tokens = model_max;
  c.prefill = r->prefill_.get();
  c.decode = r->decode_.get();
  c.releaser = r->releaser_.get();
  c.counters = &r->counters_;
  c.metrics = o.metrics;
  c.retries = o.retries;
  c.max_migrations = o.max_migrations;
  c.decode_slot_wait = o.decode_slot_wait;
  if (o.prefix_affinity_entries > 0) {
    r->affinity_ = std::make_unique<PrefixAffinity>(o.prefix_affinity_entries);
    c.affinity = r->affinity_.get();
    c.affinity_slack = o.prefix_affinity_slack;
  }
  r->admission_ = std::make_unique<AdmissionQueue>(o.max_inflight, o.max_queue);
  return r;
}

RouterService::~RouterService() {
  StartDrain();
  CancelAll(absl::UnavailableError("the router is shutting down"));
  admission_->Shutdown();
  releaser_->WaitIdle(options_.release_timeout + absl::Seconds(1));
}

absl::StatusOr<std::string> RouterService::Authenticate(const grpc::CallbackServerContext& ctx) {
  if (options_.api_keys == nullptr) return PeerClientKey(ctx.peer());
  absl::StatusOr<std::string> client = options_.api_keys->Authenticate(ctx.client_metadata());
  if (!client.ok()) {
    counters_.rejected_unauthenticated.fetch_add(1, std::memory_order_relaxed);
    KL_LOG(INFO).Field("peer", ctx.peer()) << "unauthenticated: " << client.status().message();
  }
  return client;
}

GenerateCall* RouterService::Reject(GenerateCall* call, const absl::Status& status) {
  call->Finish(ToGrpcStatus(status));
  return call;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* RouterService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  const absl::Time received = absl::Now();
  auto* call = new GenerateCall(ctx);
  // The id: GenerateRequest.request_id, else the client's x-request-id
  // metadata, else a fresh one. It goes back to the client in the initial
  // metadata and on every chunk, and to every worker call (PrepareContext).
  // An invalid id is refused below, logged under a fresh one.
  absl::StatusOr<std::string> metadata_id = RequestIdFromMetadata(*ctx);
  std::string request_id = request->request_id();
  if (request_id.empty() && metadata_id.ok()) request_id = *metadata_id;
  if (request_id.empty() || !ValidateRequestId(request_id).ok()) request_id = NewRequestId();
  ctx->AddInitialMetadata(kRequestIdKey, request_id);
  ScopedRequestId rid(request_id);
  // Authentication first: an unauthenticated call touches nothing else (no
  // validation, no client slot, no queue place, no latency metrics).
  absl::StatusOr<std::string> client = Authenticate(*ctx);
  if (!client.ok()) return Reject(call, client.status());
  if (draining_.load()) {
    counters_.rejected_draining.fetch_add(1, std::memory_order_relaxed);
    return Reject(call, absl::UnavailableError("the router is draining; retry elsewhere"));
  }
  absl::StatusOr<SamplingParams> sampling = ValidateGenerateRequest(*request, context_.limits);
  if (sampling.ok() && !metadata_id.ok()) sampling = metadata_id.status();
  if (!sampling.ok()) {
    counters_.invalid.fetch_add(1, std::memory_order_relaxed);
    KL_LOG(INFO) << "rejected: " << sampling.status().message();
    return Reject(call, sampling.status());
  }
  if (!sampling->seed.has_value()) sampling->seed = RandomSeed();  // fixed across migrations
  std::unique_ptr<ClientLimiter::Slot> slot = client_limiter_->TryAcquire(*client);
  if (slot == nullptr) {
    counters_.rejected_client_limit.fetch_add(1, std::memory_order_relaxed);
    return Reject(call, absl::ResourceExhaustedError(absl::StrCat(
                            "client ", *client, " already runs ", client_limiter_->limit(),
                            " streams (--max_concurrent_per_client); retry when one ends")));
  }
  call->set_client_slot(std::move(slot));

  auto job = std::make_shared<GenerateJob>();
  job->call = call;
  job->cancel = call->cancel_token();
  job->request = *request;
  job->request_id = request_id;
  job->sampling = *std::move(sampling);
  job->received = received;
  job->deadline = ClientDeadline(*ctx).value_or(received + options_.default_deadline);
  {
    absl::MutexLock l(&live_mu_);
    live_.insert(job->cancel);
  }
  if (!admission_->TrySubmit([this, job] { Drive(job); })) {
    {
      absl::MutexLock l(&live_mu_);
      live_.erase(job->cancel);
    }
    counters_.rejected_full.fetch_add(1, std::memory_order_relaxed);
    return Reject(call, absl::ResourceExhaustedError(absl::StrCat(
                            "the router's admission queue is full (", options_.max_queue,
                            " waiting); retry later")));
  }
  counters_.admitted.fetch_add(1, std::memory_order_relaxed);
  return call;
}

void RouterService::Drive(std::shared_ptr<GenerateJob> job) {
  const std::shared_ptr<CancelToken> cancel = job->cancel;
  RunGenerateRequest(std::move(*job), context_);
  absl::MutexLock l(&live_mu_);
  live_.erase(cancel);
}

grpc::ServerUnaryReactor* RouterService::Tokenize(grpc::CallbackServerContext* ctx,
                                                  const v1::TokenizeRequest* request,
                                                  v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (absl::StatusOr<std::string> client = Authenticate(*ctx); !client.ok()) {
    reactor->Finish(ToGrpcStatus(client.status()));
    return reactor;
  }
  absl::StatusOr<std::vector<int32_t>> ids =
      EncodeTokenizeRequest(*request, model_->tokenizer());
  if (ids.ok()) response->mutable_token_ids()->Add(ids->begin(), ids->end());
  reactor->Finish(ToGrpcStatus(ids.status()));
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::ModelInfo(grpc::CallbackServerContext* ctx,
                                                   const v1::ModelInfoRequest* /*request*/,
                                                   v1::ModelInfoResponse* response) {
  if (absl::StatusOr<std::string> client = Authenticate(*ctx); !client.ok()) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(ToGrpcStatus(client.status()));
    return reactor;
  }
  const ModelConfig& c = model_->config();
  response->set_model_type(c.model_type);
  response->set_vocab_size(c.vocab_size);
  response->set_num_layers(c.num_hidden_layers);
  response->set_num_kda_layers(c.NumKdaLayers());
  response->set_num_mla_layers(c.NumMlaLayers());
  response->set_hidden_size(c.hidden_size);
  response->set_max_prompt_tokens(context_.limits.max_prompt_tokens);
  response->set_max_tokens_limit(context_.limits.max_tokens_limit);
  response->set_default_max_tokens(context_.limits.default_max_tokens);
  response->set_eos_token_id(model_->eos_id());
  response->set_state_fingerprint(FormatFingerprint(model_->state_fingerprint()));
  if (model_->checkpoint_fingerprint() != 0) {
    response->set_checkpoint_fingerprint(FormatFingerprint(model_->checkpoint_fingerprint()));
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void RouterService::StartDrain() {
  if (!draining_.exchange(true)) {
    KL_LOG(INFO) << "draining: refusing new requests";
  }
}

bool RouterService::Drain(absl::Duration grace) {
  StartDrain();
  const bool in_time = admission_->WaitIdle(grace);
  if (!in_time) {
    KL_LOG(WARNING).Field("running", admission_->running())
            .Field("queued", admission_->queue_depth())
        << "drain grace period over, cancelling what is left";
    CancelAll(absl::UnavailableError("the router is shutting down"));
    admission_->WaitIdle(options_.release_timeout);
  }
  releaser_->WaitIdle(options_.release_timeout);
  return in_time;
}

void RouterService::CancelAll(const absl::Status& reason) {
  absl::MutexLock l(&live_mu_);
  for (const auto& token : live_) token->Cancel(reason);
}

RouterStats RouterService::Stats() const {
  RouterStats s;
  auto get = [](const std::atomic<int64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.queue_depth = admission_->queue_depth();
  s.in_flight = admission_->running();
  s.admitted = get(counters_.admitted);
  s.rejected_full = get(counters_.rejected_full);
  s.rejected_draining = get(counters_.rejected_draining);
  s.invalid = get(counters_.invalid);
  s.rejected_unauthenticated = get(counters_.rejected_unauthenticated);
  s.rejected_client_limit = get(counters_.rejected_client_limit);
  s.client_streams = client_limiter_->TotalInUse();
  s.completed = get(counters_.completed);
  s.failed = get(counters_.failed);
  s.cancelled = get(counters_.cancelled);
  s.retries = get(counters_.retries);
  s.migrations = get(counters_.migrations);
  s.affinity_followed = get(counters_.affinity_followed);
  s.affinity_overridden = get(counters_.affinity_overridden);
  s.waiting_decode_slot = get(counters_.waiting_decode_slot);
  s.stop_cancels = get(counters_.stop_cancels);
  s.releases_sent = releaser_->issued();
  s.releases_failed = releaser_->failed();
  s.draining = draining_.load();
  return s;
}

}  // namespace kl
