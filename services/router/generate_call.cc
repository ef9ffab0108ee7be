#include "services/router/generate_call.h"

#include <algorithm>

namespace kl {

void CancelToken::Cancel(absl::Status reason) {
  absl::MutexLock l(&mu_);
  if (!reason_.ok()) return;
  reason_ = reason.ok() ? absl::CancelledError("cancelled") : std::move(reason);
  for (grpc::ClientContext* ctx : contexts_) ctx->TryCancel();
}

bool CancelToken::cancelled() const {
  absl::MutexLock l(&mu_);
  return !reason_.ok();
}

absl::Status CancelToken::reason() const {
  absl::MutexLock l(&mu_);
  return reason_;
}

CancelToken::Tracked::Tracked(CancelToken* token, grpc::ClientContext* ctx)
    : token_(token), ctx_(ctx) {
  absl::MutexLock l(&token_->mu_);
  token_->contexts_.push_back(ctx_);
  if (!token_->reason_.ok()) ctx_->TryCancel();
}

CancelToken::Tracked::~Tracked() {
  absl::MutexLock l(&token_->mu_);
  auto& v = token_->contexts_;
  v.erase(std::remove(v.begin(), v.end(), ctx_), v.end());
}

GenerateCall::GenerateCall(grpc::CallbackServerContext* ctx) : ctx_(ctx) {}

bool GenerateCall::Write(const v1::GenerateResponse& response, absl::Time deadline) {
  {
    absl::MutexLock l(&mu_);
    if (!write_ok_ || cancel_->cancelled()) return false;
    write_in_flight_ = true;
  }
  pending_ = response;
  StartWrite(&pending_);
  absl::MutexLock l(&mu_);
  auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !write_in_flight_; };
  // A client that stops reading must not hold a driver thread much past the
  // deadline: cancelling the call completes the write with ok = false. The
  // grace keeps a write that is merely slow (a loaded machine) from turning the
  // request's DEADLINE_EXCEEDED into a server-side CANCELLED: a write that
  // completes lets the caller see the deadline and finish with that status.
  constexpr absl::Duration kStuckWriteGrace = absl::Seconds(1);
  if (!mu_.AwaitWithDeadline(absl::Condition(&done), deadline + kStuckWriteGrace)) {
    ctx_->TryCancel();
    mu_.Await(absl::Condition(&done));
  }
  return write_ok_;
}

void GenerateCall::Finish(const grpc::Status& status) {
  // Released before the status goes out: a client that sends its next request
  // as soon as it sees this one end must find its slot free.
  slot_.reset();
  ServerWriteReactor::Finish(status);
}

void GenerateCall::OnWriteDone(bool ok) {
  absl::MutexLock l(&mu_);
  write_in_flight_ = false;
  if (!ok) write_ok_ = false;
}

void GenerateCall::OnCancel() { cancel_->Cancel(absl::CancelledError("the client cancelled")); }

void GenerateCall::OnDone() { delete this; }

}  // namespace kl
