#include "services/router/request_lifecycle.h"

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "engine/common/log.h"
#include "engine/runtime/output_processor.h"
#include "kernels/common/status_macros.h"
#include "services/common/request_context.h"
#include "services/common/server_util.h"
#include "services/common/status_util.h"

namespace kl {
namespace {

// Worker errors worth another worker pair before the first token: the worker
// or the state push failed, not the request itself (docs/cluster.md).
bool RetryableBeforeFirstToken(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kCancelled:  // only reached when the router did not cancel
      return true;
    default:
      return false;
  }
}

// A decode stream that ended like this lost its worker (died, restarted,
// dropped the lease, or returned garbage): move the request elsewhere.
// CANCELLED counts only when the router did not cancel (checked first).
bool Migratable(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kDataLoss:
      return true;
    default:
      return false;
  }
}

absl::Status Annotate(const grpc::Status& s, absl::string_view what) {
  absl::Status a = FromGrpcStatus(s);
  return absl::Status(a.code(), absl::StrCat(what, ": ", a.message()));
}

v1::FinishReason ToProto(FinishReason r) {
  return r == FinishReason::kLength ? v1::FINISH_REASON_LENGTH : v1::FINISH_REASON_STOP;
}

// Addresses that already failed this placement, per pool.
struct Exclusions {
  absl::flat_hash_set<std::string> prefill;
  absl::flat_hash_set<std::string> decode;
  // Decode workers that refused Reserve for lack of room (also in `decode`):
  // not failures, tried again after a wait.
  absl::flat_hash_set<std::string> full;
};

class RequestRun {
 public:
  RequestRun(GenerateJob job, const RouterContext& router)
      : job_(std::move(job)), r_(router), tokenizer_(router.model->tokenizer()) {}
  void Run();

 private:
  struct Lease {
    std::shared_ptr<WorkerEndpoint> worker;
    std::string id;
  };

  absl::Status Generate();
  absl::StatusOr<int32_t> PlaceAndPrefill(Exclusions ex);
  absl::StatusOr<int32_t> TryPlaceWaitingForSlot(const std::vector<int32_t>& tokens,
                                                 absl::Time wait_until, Exclusions* ex,
                                                 bool* retryable);
  absl::StatusOr<int32_t> TryPlace(const std::vector<int32_t>& tokens, Exclusions* ex,
                                   bool* retryable);
  absl::StatusOr<Lease> Reserve(Exclusions* ex, bool* retryable);
  absl::Status DecodeStream();
  absl::Status Relay(const v1::DecodeResponse& response, grpc::ClientContext* running_stream);
  absl::Status Migrate(const absl::Status& why);
  absl::Status Emit(absl::Span<const int32_t> tokens, int64_t first_index,
                    grpc::ClientContext* running_stream = nullptr);
  absl::Status FinishByWorker();
  absl::Status WriteChunk(v1::GenerateResponse* chunk, FinishReason finish);
  absl::Status Interrupted() const;
  absl::Status FinalStatus(const absl::Status& s) const;
  void PrepareContext(grpc::ClientContext* ctx) const;
  void ReleaseLease();
  int64_t generated() const { return static_cast<int64_t>(generated_.size()); }

  GenerateJob job_;
  const RouterContext& r_;
  const Tokenizer& tokenizer_;
  std::vector<int32_t> prompt_;
  std::vector<int32_t> generated_;  // every token relayed to the client, in index order
  std::optional<OutputProcessor> processor_;
  std::optional<Lease> lease_;  // held until the worker frees it or we release it
  bool finished_ = false;       // the final chunk went out
  bool first_sent_ = false;
  absl::Duration ttft_;
  absl::Time last_write_;                   // of the last chunk with tokens (ITL)
  FinishReason finish_ = FinishReason::kNone;
  int migrations_ = 0;
  int64_t cached_prompt_tokens_ = 0;  // of the prefill that gave the first token
  bool decode_full_ = false;  // the last Reserve failed because every decode worker was full
};

void RequestRun::Run() {
  ScopedRequestId rid(job_.request_id);
  RouterMetrics* const m = r_.metrics;
  if (m != nullptr) m->queue_time.Observe(absl::ToDoubleSeconds(absl::Now() - job_.received));
  const absl::Status s = FinalStatus(Generate());
  if (s.ok()) {
    r_.counters->completed.fetch_add(1, std::memory_order_relaxed);
  } else if (s.code() == absl::StatusCode::kCancelled) {
    r_.counters->cancelled.fetch_add(1, std::memory_order_relaxed);
  } else if (s.code() == absl::StatusCode::kInvalidArgument && !first_sent_) {
    r_.counters->invalid.fetch_add(1, std::memory_order_relaxed);  // e.g. a too long text
  } else {
    r_.counters->failed.fetch_add(1, std::memory_order_relaxed);
    if (m != nullptr) m->CountFailure(s.code());
  }
  if (m != nullptr) {
    const absl::Duration e2e = absl::Now() - job_.received;
    m->e2e.Observe(absl::ToDoubleSeconds(e2e));
    if (s.ok()) {
      (finish_ == FinishReason::kLength ? m->success_length
       : finish_ == FinishReason::kNone ? m->success_abort
                                        : m->success_stop)
          .Increment();
      if (generated() > 1) {
        m->tpot.Observe(absl::ToDoubleSeconds(e2e - ttft_) / static_cast<double>(generated() - 1));
      }
    }
  }
  KL_LOG(INFO)
          .Field("code", absl::StatusCodeToString(s.code()))
          .Field("prompt_tokens", prompt_.size())
          .Field("completion_tokens", generated_.size())
          .Field("ttft_s", absl::ToDoubleSeconds(ttft_))
          .Field("migrations", migrations_)
          .Field("cached_prompt_tokens", cached_prompt_tokens_)
          .Field("e2e_s", absl::ToDoubleSeconds(absl::Now() - job_.received))
      << "request done" << (s.ok() ? "" : ": ") << s.message();
  job_.call->Finish(ToGrpcStatus(s));
  job_.call = nullptr;  // gRPC may delete it from here on
  ReleaseLease();       // after Finish: the client does not wait for it
}

absl::Status RequestRun::Generate() {
  RETURN_IF_ERROR(Interrupted());  // it may have waited in the admission queue
  ASSIGN_OR_RETURN(prompt_, EncodePrompt(job_.request, tokenizer_, r_.limits));
  RETURN_IF_ERROR(CheckFitsContext(static_cast<int64_t>(prompt_.size()),
                                   job_.sampling.max_tokens, r_.limits));
  if (r_.metrics != nullptr) r_.metrics->prompt_tokens.Increment(static_cast<double>(prompt_.size()));
  KL_LOG(INFO).Field("prompt_tokens", prompt_.size())
          .Field("max_tokens", job_.sampling.max_tokens)
          .Field("queued_s", absl::ToDoubleSeconds(absl::Now() - job_.received))
      << "request started";
  processor_.emplace(job_.sampling, &tokenizer_, r_.model->eos_id());
  ASSIGN_OR_RETURN(const int32_t first, PlaceAndPrefill(Exclusions()));
  RETURN_IF_ERROR(Emit({first}, 0));
  while (!finished_) {
    const absl::Status s = DecodeStream();
    if (s.ok()) continue;  // DecodeStream returns OK only once finished_
    RETURN_IF_ERROR(Interrupted());
    if (!Migratable(s.code())) return s;
    RETURN_IF_ERROR(Migrate(s));
  }
  return absl::OkStatus();
}

// Steps 2-3 of docs/cluster.md with bounded retries: returns the token at
// index generated() (0, or n on migration) with lease_ set to the decode
// slot that now holds the state.
absl::StatusOr<int32_t> RequestRun::PlaceAndPrefill(Exclusions ex) {
  std::vector<int32_t> tokens = prompt_;
  tokens.insert(tokens.end(), generated_.begin(), generated_.end());
  absl::Status last;
  const absl::Time wait_until = absl::Now() + r_.decode_slot_wait;
  for (int attempt = 0; attempt <= r_.retries; ++attempt) {
    RETURN_IF_ERROR(Interrupted());
    if (attempt > 0) r_.counters->retries.fetch_add(1, std::memory_order_relaxed);
    bool retryable = false;
    absl::StatusOr<int32_t> token = TryPlaceWaitingForSlot(tokens, wait_until, &ex, &retryable);
    if (token.ok()) return token;
    last = token.status();
    KL_LOG(WARNING).Field("attempt", attempt + 1).Field("sample_index", generated())
            .Field("code", absl::StatusCodeToString(last.code()))
        << "placement failed" << (retryable ? ", retrying on another pair: " : ": ")
        << last.message();
    if (!retryable) return last;
  }
  RETURN_IF_ERROR(Interrupted());
  if (last.code() == absl::StatusCode::kFailedPrecondition ||
      last.code() == absl::StatusCode::kResourceExhausted) {
    return last;
  }
  return absl::UnavailableError(absl::StrCat("no worker pair served the request in ",
                                             r_.retries + 1, " attempts; last: ",
                                             last.ToString()));
}

// TryPlace, again and again while every decode worker is full: a wait for a
// slot (a queue in all but name, bounded by `wait_until` and the deadline),
// counted in the decode_slot gauge for as long as it lasts. Not a retry:
// nothing failed.
absl::StatusOr<int32_t> RequestRun::TryPlaceWaitingForSlot(const std::vector<int32_t>& tokens,
                                                           absl::Time wait_until, Exclusions* ex,
                                                           bool* retryable) {
  absl::Duration backoff = absl::Milliseconds(5);
  bool waiting = false;
  absl::StatusOr<int32_t> token;
  for (;;) {
    decode_full_ = false;
    token = TryPlace(tokens, ex, retryable);
    if (token.ok() || !decode_full_ || absl::Now() >= wait_until || !Interrupted().ok()) break;
    if (!waiting) {
      waiting = true;
      r_.counters->waiting_decode_slot.fetch_add(1, std::memory_order_relaxed);
    }
    for (const std::string& a : ex->full) ex->decode.erase(a);  // full is not failed
    ex->full.clear();
    const absl::Time until = std::min(absl::Now() + backoff, wait_until);
    while (absl::Now() < until && Interrupted().ok()) absl::SleepFor(absl::Milliseconds(2));
    backoff = std::min(backoff * 2, absl::Milliseconds(100));
  }
  if (waiting) r_.counters->waiting_decode_slot.fetch_sub(1, std::memory_order_relaxed);
  return token;
}

absl::StatusOr<int32_t> RequestRun::TryPlace(const std::vector<int32_t>& tokens,
                                             Exclusions* ex, bool* retryable) {
  ASSIGN_OR_RETURN(Lease lease, Reserve(ex, retryable));
  const std::string preferred = r_.affinity != nullptr ? r_.affinity->Lookup(tokens) : "";
  absl::StatusOr<std::shared_ptr<WorkerEndpoint>> picked =
      r_.prefill->Pick(ex->prefill, preferred, r_.affinity_slack);
  if (!picked.ok()) {
    r_.releaser->Release(lease.worker, lease.id, job_.request_id);
    *retryable = false;
    return picked.status();
  }
  const std::shared_ptr<WorkerEndpoint> prefill = *std::move(picked);
  v1::PrefillRequest request;
  request.set_request_id(job_.request_id);
  request.mutable_token_ids()->Add(tokens.begin(), tokens.end());
  *request.mutable_sampling() = ToWorkerSampling(job_.sampling);
  request.set_sample_index(generated());
  request.mutable_target()->set_address(lease.worker->address());
  request.mutable_target()->set_lease_id(lease.id);
  grpc::ClientContext ctx;
  PrepareContext(&ctx);
  CancelToken::Tracked tracked(job_.cancel.get(), &ctx);
  v1::PrefillResponse response;
  const grpc::Status s = prefill->prefill()->Prefill(&ctx, request, &response);
  if (!preferred.empty()) {
    (preferred == prefill->address() ? r_.counters->affinity_followed
                                     : r_.counters->affinity_overridden)
        .fetch_add(1, std::memory_order_relaxed);
  }
  if (s.ok() && tokenizer_.IsValidId(response.token())) {
    if (r_.affinity != nullptr) r_.affinity->Record(tokens, prefill->address());
    lease_ = std::move(lease);
    if (!first_sent_) {
      cached_prompt_tokens_ =
          std::clamp<int64_t>(response.cached_tokens(), 0, static_cast<int64_t>(prompt_.size()));
    }
    return response.token();
  }
  // The failed lease is released; both workers of the pair are avoided next.
  r_.releaser->Release(lease.worker, lease.id, job_.request_id);
  ex->prefill.insert(prefill->address());
  ex->decode.insert(lease.worker->address());
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) r_.prefill->ReportFailure(prefill->address());
  *retryable = true;
  const std::string what =
      absl::StrCat("Prefill on ", prefill->address(), " (target ", lease.worker->address(), ")");
  if (!s.ok()) {
    *retryable = RetryableBeforeFirstToken(static_cast<absl::StatusCode>(s.error_code()));
    return Annotate(s, what);
  }
  return absl::InternalError(absl::StrCat(what, " returned token ", response.token(),
                                          ", not in the vocabulary"));
}

// Step 2: a decode slot. RESOURCE_EXHAUSTED (no free slot) moves on to the
// next decode worker within the same attempt.
absl::StatusOr<RequestRun::Lease> RequestRun::Reserve(Exclusions* ex, bool* retryable) {
  bool any_full = false;  // a worker that could hold it, were it not full
  for (;;) {
    absl::StatusOr<std::shared_ptr<WorkerEndpoint>> picked = r_.decode->Pick(ex->decode);
    if (!picked.ok()) {
      *retryable = false;  // no ready worker now: another attempt would not find one either
      return picked.status();
    }
    const std::shared_ptr<WorkerEndpoint> decode = *std::move(picked);
    const bool tried_before = ex->decode.contains(decode->address());
    v1::ReserveRequest request;
    request.set_request_id(job_.request_id);
    request.set_max_total_tokens(static_cast<int64_t>(prompt_.size()) + job_.sampling.max_tokens);
    // Not tracked by the cancel token: a Reserve cancelled in flight may
    // still create a lease whose id the router never learns (freed only by
    // its TTL). Reserve is short; let it finish, then release if cancelled.
    grpc::ClientContext ctx;
    PrepareContext(&ctx);
    v1::ReserveResponse response;
    const grpc::Status s = decode->decode()->Reserve(&ctx, request, &response);
    if (s.ok()) {
      Lease lease{decode, response.lease_id()};
      if (absl::Status i = Interrupted(); !i.ok()) {
        r_.releaser->Release(lease.worker, lease.id, job_.request_id);
        *retryable = false;
        return i;
      }
      return lease;
    }
    ex->decode.insert(decode->address());
    if (s.error_code() == grpc::StatusCode::UNAVAILABLE) r_.decode->ReportFailure(decode->address());
    const bool full = s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
    if (full) ex->full.insert(decode->address());
    any_full |= full;
    // No room now (RESOURCE_EXHAUSTED) or never for this length (OUT_OF_RANGE):
    // another decode worker may have it.
    if ((full || s.error_code() == grpc::StatusCode::OUT_OF_RANGE) && !tried_before) continue;
    // Too long for the worker asked last, but another one is only full: wait for it.
    decode_full_ = full || (any_full && s.error_code() == grpc::StatusCode::OUT_OF_RANGE);
    if (decode_full_ && !full) {
      *retryable = false;
      return absl::ResourceExhaustedError(
          absl::StrCat("every decode worker that can hold the request is full; last: Reserve on ",
                       decode->address(), ": ", s.error_message()));
    }
    *retryable = !full && s.error_code() != grpc::StatusCode::OUT_OF_RANGE &&
                 RetryableBeforeFirstToken(static_cast<absl::StatusCode>(s.error_code()));
    return Annotate(s, absl::StrCat("Reserve on ", decode->address()));
  }
}

// Steps 6-8: one Decode stream on lease_. OK only once the final chunk went
// out; otherwise the error that ended the stream.
absl::Status RequestRun::DecodeStream() {
  v1::DecodeRequest request;
  request.set_lease_id(lease_->id);
  request.set_request_id(job_.request_id);
  *request.mutable_sampling() = ToWorkerSampling(job_.sampling);
  request.set_last_token(generated_.back());
  request.set_next_index(generated());
  request.set_max_new_tokens(job_.sampling.max_tokens - generated());
  grpc::ClientContext ctx;
  PrepareContext(&ctx);
  CancelToken::Tracked tracked(job_.cancel.get(), &ctx);
  std::unique_ptr<grpc::ClientReader<v1::DecodeResponse>> reader =
      lease_->worker->decode()->Decode(&ctx, request);
  v1::DecodeResponse response;
  bool worker_finished = false;
  absl::Status relay;
  while (reader->Read(&response)) {
    worker_finished = response.finished();
    // A request that ends before the worker's own stop (a stop string) gets
    // the stream cancelled before its final chunk is written.
    relay = Relay(response, worker_finished ? nullptr : &ctx);
    if (!relay.ok()) {
      ctx.TryCancel();  // a lost client or a broken stream: the worker need not go on
      break;
    }
    if (finished_ || worker_finished) break;
  }
  while (reader->Read(&response)) {
  }
  const grpc::Status s = reader->Finish();
  if (!relay.ok()) return relay;
  if (finished_) {
    if (worker_finished && s.ok()) lease_.reset();  // the worker freed the slot itself
    return absl::OkStatus();
  }
  if (worker_finished && s.ok()) {
    lease_.reset();
    return FinishByWorker();
  }
  RETURN_IF_ERROR(Interrupted());
  const std::string what = absl::StrCat("Decode on ", lease_->worker->address());
  if (s.ok()) return absl::UnavailableError(absl::StrCat(what, ": stream ended before a stop"));
  return Annotate(s, what);
}

absl::Status RequestRun::Relay(const v1::DecodeResponse& response,
                               grpc::ClientContext* running_stream) {
  const int64_t expected = generated();
  const int64_t index = response.index();
  if (index > expected) {
    return absl::InternalError(absl::StrCat("Decode on ", lease_->worker->address(),
                                            " skipped from index ", expected, " to ", index));
  }
  // Tokens before `expected` were already relayed (never sent twice).
  const int64_t skip = std::min<int64_t>(expected - index, response.token_ids_size());
  absl::Span<const int32_t> ids(response.token_ids().data(), response.token_ids_size());
  return Emit(ids.subspan(skip), expected, running_stream);
}

absl::Status RequestRun::Migrate(const absl::Status& why) {
  const std::string dead = lease_->worker->address();
  if (migrations_ >= r_.max_migrations) {
    return absl::UnavailableError(absl::StrCat("decode failed after ", migrations_,
                                               " migrations: ", why.ToString()));
  }
  ++migrations_;
  r_.counters->migrations.fetch_add(1, std::memory_order_relaxed);
  if (why.code() != absl::StatusCode::kInternal) r_.decode->ReportFailure(dead);
  KL_LOG(WARNING).Field("from", dead).Field("generated", generated())
          .Field("code", absl::StatusCodeToString(why.code()))
      << "decode stream broke, migrating: " << why.message();
  ReleaseLease();
  Exclusions ex;
  ex.decode.insert(dead);
  // Re-prefill prompt + the n tokens so far; the sampled token is token n.
  ASSIGN_OR_RETURN(const int32_t token, PlaceAndPrefill(std::move(ex)));
  return Emit({token}, generated());
}

// Runs `tokens` (indices first_index...) through the OutputProcessor and
// writes one chunk; stops at the token that finishes the request, and then
// first cancels `running_stream` (a decode stream that would go on).
absl::Status RequestRun::Emit(absl::Span<const int32_t> tokens, int64_t first_index,
                              grpc::ClientContext* running_stream) {
  v1::GenerateResponse chunk;
  chunk.set_index(first_index);
  std::string text;
  FinishReason finish = FinishReason::kNone;
  for (const int32_t token : tokens) {
    if (!tokenizer_.IsValidId(token)) {
      return absl::InternalError(absl::StrCat("worker returned token ", token,
                                              ", not in the vocabulary"));
    }
    const TokenEvent ev = processor_->Accept(token);
    generated_.push_back(token);
    chunk.add_token_ids(token);
    text += ev.text;
    if (ev.finish != FinishReason::kNone) {
      finish = ev.finish;
      break;
    }
  }
  if (chunk.token_ids().empty()) return absl::OkStatus();
  if (finish != FinishReason::kNone && running_stream != nullptr) {
    running_stream->TryCancel();
    r_.counters->stop_cancels.fetch_add(1, std::memory_order_relaxed);
  }
  chunk.set_text(std::move(text));
  return WriteChunk(&chunk, finish);
}

// The decode worker ended the sequence (its own stop) before the
// OutputProcessor did: a final chunk without tokens.
absl::Status RequestRun::FinishByWorker() {
  v1::GenerateResponse chunk;
  chunk.set_index(generated());
  return WriteChunk(&chunk, generated() >= job_.sampling.max_tokens ? FinishReason::kLength
                                                                     : FinishReason::kStop);
}

absl::Status RequestRun::WriteChunk(v1::GenerateResponse* chunk, FinishReason finish) {
  chunk->set_request_id(job_.request_id);
  const absl::Time now = absl::Now();
  const bool first = !first_sent_;
  if (!first_sent_) {
    first_sent_ = true;
    ttft_ = now - job_.received;  // includes queueing, prefill and the state transfer
  }
  if (finish != FinishReason::kNone) {
    finished_ = true;
    finish_ = finish;
    chunk->set_finish_reason(ToProto(finish));
    v1::Usage* u = chunk->mutable_usage();
    u->set_prompt_tokens(static_cast<int64_t>(prompt_.size()));
    u->set_completion_tokens(generated());
    u->set_ttft_seconds(absl::ToDoubleSeconds(ttft_));
    u->set_e2e_seconds(absl::ToDoubleSeconds(now - job_.received));
    u->set_seed(job_.sampling.seed.value_or(0));
    u->set_migrations(migrations_);
    u->set_cached_prompt_tokens(cached_prompt_tokens_);
  }
  if (job_.call->Write(*chunk, job_.deadline)) {
    if (r_.metrics != nullptr && chunk->token_ids_size() > 0) {
      r_.metrics->generation_tokens.Increment(chunk->token_ids_size());
      if (first) {
        r_.metrics->ttft.Observe(absl::ToDoubleSeconds(ttft_));
      } else {
        r_.metrics->itl.Observe(absl::ToDoubleSeconds(now - last_write_));
      }
      last_write_ = now;
    }
    return absl::OkStatus();
  }
  if (absl::Now() >= job_.deadline) return Interrupted();
  job_.cancel->Cancel(absl::CancelledError("the client went away"));
  return job_.cancel->reason();
}

// The deadline wins over a cancellation: gRPC cancels a call whose client
// deadline passed, and that is a DEADLINE_EXCEEDED, not a client cancel.
absl::Status RequestRun::Interrupted() const {
  if (absl::Now() >= job_.deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("deadline exceeded after ", generated(), " tokens"));
  }
  if (job_.cancel->cancelled()) return job_.cancel->reason();
  return absl::OkStatus();
}

// Whatever went wrong inside, a cancelled or timed-out request reports that.
absl::Status RequestRun::FinalStatus(const absl::Status& s) const {
  if (s.ok()) return s;
  const absl::Status interrupted = Interrupted();
  return interrupted.ok() ? s : interrupted;
}

void RequestRun::PrepareContext(grpc::ClientContext* ctx) const {
  ctx->set_deadline(absl::ToChronoTime(job_.deadline));
  AttachRequestId(ctx, job_.request_id);
}

void RequestRun::ReleaseLease() {
  if (!lease_.has_value()) return;
  r_.releaser->Release(lease_->worker, lease_->id, job_.request_id);
  lease_.reset();
}

}  // namespace

void RunGenerateRequest(GenerateJob job, const RouterContext& router) {
  RequestRun(std::move(job), router).Run();
}

}  // namespace kl
