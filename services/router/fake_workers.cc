#include "services/router/fake_workers.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kl {
namespace {

std::string IdOf(const grpc::ServerContext& ctx) { return RequestIdFromContext(ctx); }

// Sleeps `ms` in small steps; false if the call was cancelled meanwhile.
bool SleepUnlessCancelled(grpc::ServerContext* ctx, int ms) {
  const absl::Time end = absl::Now() + absl::Milliseconds(ms);
  while (absl::Now() < end) {
    if (ctx->IsCancelled()) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return !ctx->IsCancelled();
}

// Takes one unit from `counter` if positive.
bool TakeOne(std::atomic<int>* counter) {
  int v = counter->load();
  while (v > 0) {
    if (counter->compare_exchange_weak(v, v - 1)) return true;
  }
  return false;
}

}  // namespace

int32_t FakeTokenAt(uint64_t seed, int64_t index) {
  return 'a' + static_cast<int32_t>((seed % 26 * 7 + static_cast<uint64_t>(index) * 5) % 26);
}

// ---------------------------------------------------------------- decode

grpc::Status FakeDecode::Dead() const {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake decode worker is dead");
}

void FakeDecode::Die() {
  dead = true;
  server_->SetServing(false);
}

void FakeDecode::Record(const grpc::ServerContext& ctx) {
  absl::MutexLock l(&mu_);
  seen_ids_.push_back(IdOf(ctx));
}

int64_t FakeDecode::active_leases() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(leases_.size());
}

std::vector<std::string> FakeDecode::seen_request_ids() const {
  absl::MutexLock l(&mu_);
  return seen_ids_;
}

grpc::Status FakeDecode::Reserve(grpc::ServerContext* ctx, const v1::ReserveRequest* request,
                                 v1::ReserveResponse* response) {
  Record(*ctx);
  ++reserves;
  if (dead) return Dead();
  if (TakeOne(&reserve_exhausted)) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "no free slot (injected)");
  }
  if (reserve_out_of_range) {
    return grpc::Status(grpc::StatusCode::OUT_OF_RANGE, "does not fit the latent cache (injected)");
  }
  if (request->max_total_tokens() <= 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "max_total_tokens");
  }
  absl::MutexLock l(&mu_);
  const std::string id = absl::StrCat("lease-", next_lease_++);
  leases_[id] = Lease{};
  response->set_lease_id(id);
  response->set_ttl_seconds(30);
  return grpc::Status::OK;
}

grpc::Status FakeDecode::Release(grpc::ServerContext* ctx, const v1::ReleaseRequest* request,
                                 v1::ReleaseResponse* /*response*/) {
  Record(*ctx);
  if (dead) {
    ++releases;
    return Dead();
  }
  {
    absl::MutexLock l(&mu_);
    leases_.erase(request->lease_id());  // idempotent
  }
  ++releases;  // after the erase: a test that sees the count sees the lease gone
  return grpc::Status::OK;
}

grpc::Status FakeDecode::PushState(grpc::ServerContext* ctx,
                                   grpc::ServerReader<v1::StatePart>* reader,
                                   v1::PushStateResponse* response) {
  ++pushes;
  if (dead) return Dead();
  v1::StatePart part;
  std::string lease_id;
  int64_t tokens = -1;
  while (reader->Read(&part)) {
    if (lease_id.empty()) lease_id = part.lease_id();
    response->set_frames(response->frames() + 1);
    response->set_bytes(response->bytes() + static_cast<int64_t>(part.frame().size()));
    const std::string& f = part.frame();
    if (f.rfind("n=", 0) != 0 || !absl::SimpleAtoi(f.substr(2), &tokens)) {
      return grpc::Status(grpc::StatusCode::DATA_LOSS, "bad frame");
    }
  }
  if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "push cancelled");
  absl::MutexLock l(&mu_);
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("unknown lease ", lease_id));
  }
  it->second.pushed_tokens = tokens;
  return grpc::Status::OK;
}

grpc::Status FakeDecode::AwaitState(grpc::ServerContext* ctx, const std::string& lease_id) {
  const absl::Time end = absl::Now() + absl::Seconds(2);
  for (;;) {
    {
      absl::MutexLock l(&mu_);
      auto it = leases_.find(lease_id);
      if (it == leases_.end()) {
        return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("unknown lease ", lease_id));
      }
      if (it->second.pushed_tokens >= 0) return grpc::Status::OK;
    }
    if (absl::Now() > end || ctx->IsCancelled()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "state never arrived");
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
}

grpc::Status FakeDecode::Decode(grpc::ServerContext* ctx, const v1::DecodeRequest* request,
                                grpc::ServerWriter<v1::DecodeResponse>* writer) {
  Record(*ctx);
  ++decodes;
  if (dead) return Dead();
  if (IdOf(*ctx) != request->request_id()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "x-request-id metadata missing");
  }
  if (grpc::Status s = AwaitState(ctx, request->lease_id()); !s.ok()) return s;
  const uint64_t seed = request->sampling().seed();
  if (request->next_index() < 1 ||
      request->last_token() != FakeTokenAt(seed, request->next_index() - 1)) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "last_token / next_index mismatch");
  }
  {
    absl::MutexLock l(&mu_);
    ++running_;
  }
  grpc::Status status = grpc::Status::OK;
  const auto& stops = request->sampling().stop_token_ids();
  for (int64_t n = 0; n < request->max_new_tokens(); ++n) {
    if (!SleepUnlessCancelled(ctx, token_delay_ms)) {
      ++decode_cancelled;
      status = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      break;
    }
    const int32_t token = FakeTokenAt(seed, request->next_index() + n);
    v1::DecodeResponse r;
    r.add_token_ids(token);
    r.set_index(request->next_index() + n);
    r.set_finished(n + 1 == request->max_new_tokens() ||
                   std::find(stops.begin(), stops.end(), token) != stops.end());
    if (!writer->Write(r)) {
      if (ctx->IsCancelled()) ++decode_cancelled;
      status = grpc::Status(grpc::StatusCode::CANCELLED, "write failed");
      break;
    }
    ++streamed;
    if (r.finished()) break;
    if (die_after_tokens >= 0 && n + 1 >= die_after_tokens && TakeOne(death_budget.get())) {
      Die();
      if (kill_server) {
        server_->KillAsync();
        const absl::Time end = absl::Now() + absl::Seconds(5);
        while (!ctx->IsCancelled() && absl::Now() < end) absl::SleepFor(absl::Milliseconds(1));
      }
      status = Dead();
      break;
    }
  }
  absl::MutexLock l(&mu_);
  --running_;
  leases_.erase(request->lease_id());  // the slot is freed when the stream ends
  return status;
}

grpc::Status FakeDecode::Stats(grpc::ServerContext* /*ctx*/,
                               const v1::WorkerStatsRequest* /*request*/,
                               v1::WorkerStats* response) {
  absl::MutexLock l(&mu_);
  response->set_role("decode");
  response->set_ready(!dead);
  response->set_running(running_);
  response->set_leases_active(static_cast<int64_t>(leases_.size()) - running_);
  response->set_state_fingerprint(state_fingerprint);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------- prefill

std::vector<int64_t> FakePrefill::sample_indices() const {
  absl::MutexLock l(&mu_);
  return sample_indices_;
}

std::vector<std::string> FakePrefill::seen_request_ids() const {
  absl::MutexLock l(&mu_);
  return seen_ids_;
}

grpc::Status FakePrefill::Push(grpc::ServerContext* ctx, const v1::PrefillRequest& request) {
  auto channel =
      grpc::CreateChannel(request.target().address(), grpc::InsecureChannelCredentials());
  auto stub = v1::Decode::NewStub(channel);
  grpc::ClientContext push_ctx;
  push_ctx.set_deadline(ctx->deadline());
  push_ctx.AddMetadata(kRequestIdKey, request.request_id());
  v1::PushStateResponse response;
  auto writer = stub->PushState(&push_ctx, &response);
  v1::StatePart part;
  part.set_lease_id(request.target().lease_id());
  part.set_request_id(request.request_id());
  part.set_frame(absl::StrCat("n=", request.token_ids_size()));
  writer->Write(part);
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (s.ok()) return s;
  return grpc::Status(s.error_code(), absl::StrCat("push to ", request.target().address(),
                                                   " failed: ", s.error_message()));
}

grpc::Status FakePrefill::Prefill(grpc::ServerContext* ctx, const v1::PrefillRequest* request,
                                  v1::PrefillResponse* response) {
  {
    absl::MutexLock l(&mu_);
    seen_ids_.push_back(IdOf(*ctx));
  }
  ++calls;
  if (IdOf(*ctx) != request->request_id()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "x-request-id metadata missing");
  }
  if (TakeOne(&fail_next)) return grpc::Status(fail_code, "injected prefill failure");
  if (hang) {
    while (!ctx->IsCancelled() && !stopping_) absl::SleepFor(absl::Milliseconds(1));
    ++hang_cancelled;
    return grpc::Status(grpc::StatusCode::CANCELLED, "hung prefill cancelled");
  }
  // On migration the request carries prompt + generated tokens: check the tail.
  const int64_t n = request->sample_index();
  const uint64_t seed = request->sampling().seed();
  if (request->token_ids_size() <= n) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "fewer tokens than sample_index");
  }
  for (int64_t j = 0; j < n; ++j) {
    if (request->token_ids(request->token_ids_size() - n + j) != FakeTokenAt(seed, j)) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("generated token ", j, " is not the one sampled"));
    }
  }
  if (grpc::Status s = Push(ctx, *request); !s.ok()) return s;
  {
    absl::MutexLock l(&mu_);
    sample_indices_.push_back(n);
  }
  response->set_token(FakeTokenAt(seed, n));
  response->set_num_tokens(request->token_ids_size());
  return grpc::Status::OK;
}

grpc::Status FakePrefill::Stats(grpc::ServerContext* /*ctx*/,
                                const v1::WorkerStatsRequest* /*request*/,
                                v1::WorkerStats* response) {
  response->set_role("prefill");
  response->set_ready(true);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------- server

std::unique_ptr<FakeWorkerServer> FakeWorkerServer::StartDecode() {
  std::unique_ptr<FakeWorkerServer> w(new FakeWorkerServer());
  w->decode_ = std::make_unique<FakeDecode>();
  w->decode_->server_ = w.get();
  absl::StatusOr<RunningServer> s = StartServer(ServerOptions{}, {w->decode_.get()});
  if (!s.ok()) return nullptr;
  w->server_ = *std::move(s);
  w->address_ = absl::StrCat("127.0.0.1:", w->server_.port);
  w->server_.SetServing(true);
  return w;
}

std::unique_ptr<FakeWorkerServer> FakeWorkerServer::StartPrefill() {
  std::unique_ptr<FakeWorkerServer> w(new FakeWorkerServer());
  w->prefill_ = std::make_unique<FakePrefill>();
  absl::StatusOr<RunningServer> s = StartServer(ServerOptions{}, {w->prefill_.get()});
  if (!s.ok()) return nullptr;
  w->server_ = *std::move(s);
  w->address_ = absl::StrCat("127.0.0.1:", w->server_.port);
  w->server_.SetServing(true);
  return w;
}

void FakeWorkerServer::KillAsync() {
  absl::MutexLock l(&kill_mu_);
  if (killer_.joinable()) return;
  killer_ = std::thread([this] { server_.server->Shutdown(std::chrono::system_clock::now()); });
}

FakeWorkerServer::~FakeWorkerServer() {
  if (prefill_) prefill_->stopping_ = true;
  {
    absl::MutexLock l(&kill_mu_);
    if (killer_.joinable()) killer_.join();
  }
  if (server_.server) {
    server_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
}

}  // namespace kl
