// The Decode RPC (server streaming) on the callback API. A DecodeCall claims
// the request's lease, waits (without blocking a thread) for its state, joins
// the DecodeEngine's batch, and relays tokens to the client through a bounded
// buffer: the engine never waits for the network, and a client that stops
// reading only pauses its own sequence (decode_engine.h).
//
// Lifetimes: the gRPC reactor (DecodeReactor) is deleted by gRPC in OnDone; the
// DecodeCall it points to is shared with the engine and the lease manager and
// outlives it. The call touches the reactor only before it calls Finish, which
// happens exactly once, so no one can reach a deleted reactor.
//
// The lease is released whenever the stream ends for any reason (finished,
// cancelled, deadline, error) — by the engine once the sequence joined, by this
// call before that.
#ifndef KL_SERVICES_DECODE_DECODE_STREAM_H_
#define KL_SERVICES_DECODE_DECODE_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "proto/worker.grpc.pb.h"
#include "services/decode/decode_engine.h"
#include "services/decode/lease_manager.h"

namespace kl {

// What a Decode stream needs from its worker; all must outlive the calls.
struct DecodeStreamDeps {
  LeaseManager* leases = nullptr;
  DecodeEngine* engine = nullptr;
  int64_t vocab_size = 0;
  // Tokens buffered per stream before its sequence is paused.
  int64_t stream_buffer_tokens = 64;
  // Streams that claimed their lease and wait for its state (Stats.waiting).
  std::atomic<int64_t>* waiting = nullptr;
};

// Starts a Decode call and returns its reactor (never null). Validation and
// lease errors finish the call at once.
grpc::ServerWriteReactor<v1::DecodeResponse>* StartDecodeCall(grpc::CallbackServerContext* ctx,
                                                              const v1::DecodeRequest& request,
                                                              const DecodeStreamDeps& deps);

// The shared state of one Decode call. Public for the reactor; use StartDecodeCall.
class DecodeCall : public TokenSink,
                   public StateConsumer,
                   public std::enable_shared_from_this<DecodeCall> {
 public:
  DecodeCall(grpc::CallbackServerContext* ctx,
             grpc::ServerWriteReactor<v1::DecodeResponse>* reactor, DecodeSpec spec,
             const DecodeStreamDeps& deps);

  // Claims the lease (state delivery may happen before this returns).
  void Start();

  // TokenSink (engine thread).
  bool HasRoom() override;
  bool Cancelled() override { return cancelled_.load(); }
  void Emit(int32_t token, int64_t index, bool finished) override;
  void End(const absl::Status& status) override;

  // StateConsumer (lease manager).
  void OnStateReady(SequenceState state) override;
  void OnLeaseRevoked(const absl::Status& why) override;

  // Reactions (gRPC threads).
  void OnWriteDone(bool ok);
  void OnCancel();

 private:
  enum class Action { kNone, kWrite, kFinish };
  struct Next {
    Action action = Action::kNone;
    grpc::ServerWriteReactor<v1::DecodeResponse>* reactor = nullptr;
    absl::Status status;  // for kFinish
  };
  // Decides the next write or the Finish; the caller performs it unlocked.
  Next NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Perform(const Next& next);
  void StopWaitingLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  grpc::CallbackServerContext* const ctx_;
  const DecodeSpec spec_;
  const DecodeStreamDeps deps_;
  std::atomic<bool> cancelled_{false};

  absl::Mutex mu_;
  // Null once Finish was called (the reactor may be gone after that).
  grpc::ServerWriteReactor<v1::DecodeResponse>* reactor_ ABSL_GUARDED_BY(mu_);
  bool claimed_ ABSL_GUARDED_BY(mu_) = false;  // this call owns the lease
  bool joined_ ABSL_GUARDED_BY(mu_) = false;   // the engine owns the sequence
  bool counted_waiting_ ABSL_GUARDED_BY(mu_) = false;  // in deps_.waiting
  std::deque<int32_t> pending_ ABSL_GUARDED_BY(mu_);
  int64_t pending_index_ ABSL_GUARDED_BY(mu_) = 0;  // index of pending_.front()
  bool last_queued_ ABSL_GUARDED_BY(mu_) = false;   // the finished token is in pending_
  int64_t emitted_ ABSL_GUARDED_BY(mu_) = 0;        // tokens queued for the client (logged)
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool unsticking_ ABSL_GUARDED_BY(mu_) = false;  // TryCancel running: no Finish yet
  // The message in flight: written under mu_ only while !writing_, read by gRPC
  // until OnWriteDone.
  v1::DecodeResponse write_msg_;
  std::optional<absl::Status> end_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Status> revoked_ ABSL_GUARDED_BY(mu_);  // why the lease went away
};

}  // namespace kl

#endif  // KL_SERVICES_DECODE_DECODE_STREAM_H_
