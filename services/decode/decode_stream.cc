#include "services/decode/decode_stream.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "services/common/request_context.h"
#include "services/common/status_util.h"
#include "services/decode/worker_codec.h"

namespace kl {
namespace {

// Tokens coalesced into one DecodeResponse when a client lags behind.
constexpr int64_t kMaxTokensPerMessage = 256;

class DecodeReactor final : public grpc::ServerWriteReactor<v1::DecodeResponse> {
 public:
  void set_call(std::shared_ptr<DecodeCall> call) { call_ = std::move(call); }
  void OnWriteDone(bool ok) override { call_->OnWriteDone(ok); }
  void OnCancel() override { call_->OnCancel(); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<DecodeCall> call_;
};

absl::StatusOr<DecodeSpec> SpecFromRequest(const v1::DecodeRequest& r, int64_t vocab_size,
                                           std::string request_id) {
  if (r.lease_id().empty()) return absl::InvalidArgumentError("lease_id is empty");
  if (r.max_new_tokens() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 1, got ", r.max_new_tokens()));
  }
  if (r.next_index() < 0 || r.next_index() > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(
        absl::StrCat("next_index must be in [0, 2^40], got ", r.next_index()));
  }
  if (r.last_token() < 0 || r.last_token() >= vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("last_token ", r.last_token(), " out of range [0, ", vocab_size, ")"));
  }
  DecodeSpec spec;
  auto params = SamplingFromProto(r.sampling(), r.max_new_tokens(), vocab_size);
  if (!params.ok()) return params.status();
  spec.params = *std::move(params);
  spec.lease_id = r.lease_id();
  spec.request_id = std::move(request_id);
  spec.last_token = r.last_token();
  spec.next_index = r.next_index();
  spec.max_new_tokens = r.max_new_tokens();
  return spec;
}

}  // namespace

grpc::ServerWriteReactor<v1::DecodeResponse>* StartDecodeCall(grpc::CallbackServerContext* ctx,
                                                              const v1::DecodeRequest& request,
                                                              const DecodeStreamDeps& deps) {
  auto* reactor = new DecodeReactor();
  std::string request_id = request.request_id().empty() ? RequestIdOf(*ctx) : request.request_id();
  ScopedRequestId rid(request_id);
  absl::StatusOr<DecodeSpec> spec = SpecFromRequest(request, deps.vocab_size, request_id);
  if (!spec.ok()) {
    KL_LOG(INFO).Field("code", absl::StatusCodeToString(spec.status().code()))
        << "decode refused: " << spec.status().message();
    reactor->Finish(ToGrpcStatus(spec.status()));
    // OnCancel may still fire: forward it to an already-ended call (no lease).
    reactor->set_call(std::make_shared<DecodeCall>(ctx, nullptr, DecodeSpec(), deps));
    return reactor;
  }
  KL_LOG(DEBUG).Field("lease", spec->lease_id).Field("next_index", spec->next_index)
          .Field("max_new_tokens", spec->max_new_tokens)
      << "decode stream opened";
  auto call = std::make_shared<DecodeCall>(ctx, reactor, *std::move(spec), deps);
  reactor->set_call(call);
  call->Start();
  return reactor;
}

DecodeCall::DecodeCall(grpc::CallbackServerContext* ctx,
                       grpc::ServerWriteReactor<v1::DecodeResponse>* reactor, DecodeSpec spec,
                       const DecodeStreamDeps& deps)
    : ctx_(ctx), spec_(std::move(spec)), deps_(deps), reactor_(reactor) {
  if (reactor == nullptr) end_ = absl::OkStatus();  // already finished by the caller
}

void DecodeCall::Start() {
  {
    absl::MutexLock l(&mu_);
    claimed_ = true;  // before Claim: the state may arrive inside it
  }
  absl::Status s = deps_.leases->Claim(spec_.lease_id, shared_from_this());
  if (!s.ok()) {
    {
      absl::MutexLock l(&mu_);
      claimed_ = false;  // not ours: never release it
    }
    End(s);
    return;
  }
  absl::MutexLock l(&mu_);
  if (!joined_ && !end_.has_value()) {  // the state is not there yet
    counted_waiting_ = true;
    deps_.waiting->fetch_add(1);
  }
}

void DecodeCall::StopWaitingLocked() {
  if (!counted_waiting_) return;
  counted_waiting_ = false;
  deps_.waiting->fetch_sub(1);
}

bool DecodeCall::HasRoom() {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(pending_.size()) < deps_.stream_buffer_tokens;
}

void DecodeCall::Emit(int32_t token, int64_t index, bool finished) {
  Next next;
  {
    absl::MutexLock l(&mu_);
    if (end_.has_value() || last_queued_) return;
    if (pending_.empty()) pending_index_ = index;
    pending_.push_back(token);
    ++emitted_;
    last_queued_ = finished;
    next = NextLocked();
  }
  Perform(next);
}

void DecodeCall::End(const absl::Status& status) {
  Next next;
  bool unstick = false;
  absl::Status ended;
  int64_t emitted = 0;
  {
    absl::MutexLock l(&mu_);
    if (end_.has_value()) return;
    StopWaitingLocked();
    // A revoked lease explains a cancellation better than "cancelled".
    end_ = (!status.ok() && revoked_.has_value()) ? *revoked_ : status;
    ended = *end_;
    emitted = emitted_;
    if (!end_->ok()) {
      pending_.clear();
      cancelled_ = true;
      // A write the client never reads would hold Finish back forever: cancel
      // the RPC. Finish waits until TryCancel has returned (the context must
      // outlive that call).
      unstick = writing_;
      unsticking_ = unstick;
    }
    next = NextLocked();
  }
  {
    // Once per stream, on whichever thread ends it (engine, lease manager, gRPC).
    ScopedRequestId rid(spec_.request_id);
    KL_LOG(INFO).Field("lease", spec_.lease_id).Field("tokens", emitted)
            .Field("code", absl::StatusCodeToString(ended.code()))
        << "decode stream done" << (ended.ok() ? "" : ": ") << ended.message();
  }
  Perform(next);
  if (!unstick) return;
  ctx_->TryCancel();
  {
    absl::MutexLock l(&mu_);
    unsticking_ = false;
    next = NextLocked();
  }
  Perform(next);
}

void DecodeCall::OnStateReady(SequenceState state) {
  bool joined;
  {
    absl::MutexLock l(&mu_);
    joined_ = !cancelled_.load() && !end_.has_value();
    joined = joined_;
    StopWaitingLocked();
  }
  if (!joined) {
    // The stream went away while the state was on its way: free it all.
    state = SequenceState();
    deps_.leases->ReleaseHeld(spec_.lease_id, absl::CancelledError("decode stream gone"));
    return;
  }
  absl::Status s = deps_.engine->Join(spec_, std::move(state), shared_from_this());
  if (!s.ok()) {
    End(s);
    deps_.leases->ReleaseHeld(spec_.lease_id, s);
  }
}

void DecodeCall::OnLeaseRevoked(const absl::Status& why) {
  bool joined;
  {
    absl::MutexLock l(&mu_);
    if (end_.has_value()) return;  // we ended first (e.g. finished): nothing to do
    revoked_ = why;
    cancelled_ = true;
    joined = joined_;
  }
  if (joined) {
    deps_.engine->Wake();  // the engine drops the sequence and ends us with `why`
  } else {
    End(why);
  }
}

void DecodeCall::OnWriteDone(bool ok) {
  Next next;
  {
    absl::MutexLock l(&mu_);
    writing_ = false;
    if (!ok && !end_.has_value()) {
      cancelled_ = true;
      pending_.clear();
      end_ = absl::CancelledError("decode stream write failed (client gone)");
    }
    next = NextLocked();
  }
  Perform(next);
  deps_.engine->Wake();  // room freed, or the sequence must leave
}

void DecodeCall::OnCancel() {
  bool release = false;
  {
    absl::MutexLock l(&mu_);
    cancelled_ = true;
    release = claimed_ && !joined_;
  }
  if (release) {
    // Not in the batch yet: free the lease ourselves (this revokes us -> End).
    deps_.leases->Release(spec_.lease_id, absl::CancelledError("decode stream cancelled"));
  }
  End(absl::CancelledError("decode stream cancelled"));
  deps_.engine->Wake();
}

DecodeCall::Next DecodeCall::NextLocked() {
  Next next;
  if (reactor_ == nullptr || writing_) return next;
  if (!pending_.empty()) {
    write_msg_.Clear();
    write_msg_.set_index(pending_index_);
    while (!pending_.empty() && write_msg_.token_ids_size() < kMaxTokensPerMessage) {
      write_msg_.add_token_ids(pending_.front());
      pending_.pop_front();
      ++pending_index_;
    }
    write_msg_.set_finished(pending_.empty() && last_queued_);
    writing_ = true;
    next.action = Action::kWrite;
    next.reactor = reactor_;
    return next;
  }
  if (end_.has_value() && !unsticking_) {
    next.action = Action::kFinish;
    next.reactor = reactor_;
    next.status = *end_;
    reactor_ = nullptr;  // nobody may touch it after Finish
  }
  return next;
}

void DecodeCall::Perform(const Next& next) {
  // Unlocked on purpose (a reaction could run inline). Safe: Finish is chosen
  // once and never while a write is in flight, so the reactor is alive here.
  if (next.action == Action::kWrite) next.reactor->StartWrite(&write_msg_);
  if (next.action == Action::kFinish) next.reactor->Finish(ToGrpcStatus(next.status));
}

}  // namespace kl
