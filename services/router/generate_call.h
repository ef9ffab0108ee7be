// The gRPC side of one Generate call: a callback-API ServerWriteReactor that a
// router driver thread writes through with blocking calls, and the request's
// CancelToken, which turns "the client went away" into TryCancel() on every
// outgoing worker call of the request.
//
// Threading: gRPC runs OnWriteDone / OnCancel / OnDone on its callback
// threads; they only flip flags and signal, never block. Write() and Finish()
// are called by the one driver thread that owns the request.
#ifndef KL_SERVICES_ROUTER_GENERATE_CALL_H_
#define KL_SERVICES_ROUTER_GENERATE_CALL_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/generation.pb.h"
#include "services/router/client_limiter.h"

namespace kl {

// Cancellation of one request. Shared (shared_ptr) by the reactor, the driver
// and the service's list of live requests. Thread-safe.
class CancelToken {
 public:
  // Cancels every tracked ClientContext. The first call's `reason` sticks
  // (CANCELLED for the client, UNAVAILABLE for a router shutdown). Idempotent.
  void Cancel(absl::Status reason);
  bool cancelled() const;
  absl::Status reason() const;  // OK while not cancelled

  // While a Tracked lives, Cancel() also cancels `ctx`; a ctx tracked after
  // Cancel() is cancelled at once (gRPC then fails the call when it starts).
  class Tracked {
   public:
    Tracked(CancelToken* token, grpc::ClientContext* ctx);
    ~Tracked();
    Tracked(const Tracked&) = delete;
    Tracked& operator=(const Tracked&) = delete;

   private:
    CancelToken* token_;
    grpc::ClientContext* ctx_;
  };

 private:
  mutable absl::Mutex mu_;
  absl::Status reason_ ABSL_GUARDED_BY(mu_);
  std::vector<grpc::ClientContext*> contexts_ ABSL_GUARDED_BY(mu_);
};

class GenerateCall final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit GenerateCall(grpc::CallbackServerContext* ctx);

  grpc::CallbackServerContext* context() const { return ctx_; }
  const std::shared_ptr<CancelToken>& cancel_token() const { return cancel_; }

  // Sends one chunk and waits until gRPC took it (flow control included).
  // False if the client is gone or `deadline` passed first (the call is then
  // cancelled). Driver thread only; never concurrently with itself.
  bool Write(const v1::GenerateResponse& response, absl::Time deadline);

  // The client's concurrency slot, held until the call ends (Finish, or the
  // reactor's deletion on any other path).
  void set_client_slot(std::unique_ptr<ClientLimiter::Slot> slot) { slot_ = std::move(slot); }

  // Ends the call with `status`. Exactly once; the reactor deletes itself
  // when gRPC is done with it, so the caller must not touch it afterwards.
  void Finish(const grpc::Status& status);

 private:
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  grpc::CallbackServerContext* const ctx_;
  const std::shared_ptr<CancelToken> cancel_ = std::make_shared<CancelToken>();
  std::unique_ptr<ClientLimiter::Slot> slot_;
  v1::GenerateResponse pending_;  // the chunk being written (gRPC reads it until OnWriteDone)
  absl::Mutex mu_;
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool write_ok_ ABSL_GUARDED_BY(mu_) = true;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_GENERATE_CALL_H_
