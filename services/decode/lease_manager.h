// LeaseManager: the decode worker's slot pool. A router reserves a slot (a
// lease) before a request is prefilled; the prefill worker's PushState fills it
// with a verified SequenceState; a Decode stream claims it and decodes. The
// lease is the unit of ownership: when it ends (Release, TTL expiry, the decode
// finishing or being cancelled) everything it held is freed at once — the slot,
// a partial transfer (its listener is revoked, which aborts the assembly), an
// adopted state, the latent-row accounting.
//
// Lifecycle of one lease:
//   Reserve ──> reserved ──AdoptState──> ready ──(Claim)──> decoding ──Release──> gone
//                  │ BeginPush/RenewPush/EndPush (a push in flight; retryable)
//                  └─ Claim before the state arrived: the consumer waits
// Expiry: a lease not renewed for `ttl` (by push frames, by decode progress) is
// revoked. Waiting for the state does not renew: a Decode waits at most one TTL.
//
// No gRPC here: listeners are small interfaces, the clock is injectable, so the
// whole lifecycle is unit-tested with a fake clock.
//
// Thread-safety: every method may be called from any thread. Listener callbacks
// (OnStateReady, OnLeaseRevoked) are always invoked without the manager's lock
// held, possibly on the calling thread before the method returns; they must not
// block but may call back into the manager.
#ifndef KL_SERVICES_DECODE_LEASE_MANAGER_H_
#define KL_SERVICES_DECODE_LEASE_MANAGER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/state/sequence_state.h"

namespace kl {

// Something working on a lease that must learn when the lease goes away
// (expired, released, or — for a push — superseded by a newer push).
class LeaseListener {
 public:
  virtual ~LeaseListener() = default;
  // Called at most once per registration. Must not block.
  virtual void OnLeaseRevoked(const absl::Status& why) = 0;
};

// A decode stream's claim on a lease: receives the adopted state once.
class StateConsumer : public LeaseListener {
 public:
  // Called at most once, with the verified state; after this, revocation is
  // still possible (expiry while decoding, Release) and arrives via OnLeaseRevoked.
  virtual void OnStateReady(SequenceState state) = 0;
};

struct LeaseManagerOptions {
  int64_t slots = 16;
  absl::Duration ttl = absl::Seconds(30);
  // Latent rows (tokens) all leases may hold together, checked at Reserve
  // against the sum of max_total_tokens (each rounded up to whole units of
  // `latent_row_granularity`, the backend's page); 0 = unbounded.
  int64_t latent_rows_capacity = 0;
  int64_t latent_row_granularity = 1;
  // The most rows one lease may reserve (one sequence's share of the pool);
  // 0 = no limit. More is OUT_OF_RANGE: this worker can never hold it.
  int64_t max_rows_per_lease = 0;
};

struct LeaseGrant {
  std::string lease_id;
  absl::Duration ttl;
};

// What a push needs to know about the lease it fills.
struct PushTicket {
  uint64_t push_id = 0;          // identifies this push among retries
  int64_t max_total_tokens = 0;  // the reservation's bound (0 = none)
  std::string request_id;
};

struct LeaseStats {
  int64_t slots_total = 0;
  int64_t slots_used = 0;        // leases alive
  int64_t leases_waiting = 0;    // alive, state not yet handed to a decode stream
  int64_t decoding = 0;          // state handed to a decode stream
  int64_t pushes_in_flight = 0;
  int64_t latent_rows_used = 0;  // tokens of the states held (one latent row per MLA layer each)
  int64_t latent_rows_capacity = 0;
  int64_t expired_total = 0;
  bool draining = false;
};

class LeaseManager {
 public:
  using Clock = std::function<absl::Time()>;

  // `clock` defaults to absl::Now.
  explicit LeaseManager(LeaseManagerOptions options, Clock clock = nullptr);
  ~LeaseManager();

  LeaseManager(const LeaseManager&) = delete;
  LeaseManager& operator=(const LeaseManager&) = delete;

  // A new lease with a random 128-bit id. RESOURCE_EXHAUSTED when every slot
  // (or the latent-row budget) is taken; UNAVAILABLE while draining;
  // INVALID_ARGUMENT for a negative max_total_tokens.
  absl::StatusOr<LeaseGrant> Reserve(const std::string& request_id, int64_t max_total_tokens);

  // Ends the lease if it exists; its listeners are revoked with `why`.
  // Idempotent: false if there was no such lease.
  bool Release(const std::string& lease_id,
               const absl::Status& why = absl::CancelledError("lease released"));
  // Release by the holder of a handed-over state (the decode engine letting a
  // sequence go, or a decode stream that could not join it), once that state
  // is freed. A lease released before (by the router, by expiry) while its
  // state was still held keeps its latent rows reserved until this call, so
  // no new lease counts on pages still in use.
  bool ReleaseHeld(const std::string& lease_id, const absl::Status& why);

  // Starts filling the lease. A push already in flight on it is superseded
  // (its listener is revoked with ABORTED) so that a retry after a broken stream
  // never waits for the old one. NOT_FOUND for an unknown/expired lease,
  // ALREADY_EXISTS once the state was adopted. Renews the lease.
  absl::StatusOr<PushTicket> BeginPush(const std::string& lease_id,
                                       std::shared_ptr<LeaseListener> listener);
  // Progress of push `push_id` (a frame arrived): renews the lease. NOT_FOUND if
  // the lease is gone, ABORTED if the push was superseded.
  absl::Status RenewPush(const std::string& lease_id, uint64_t push_id);
  // The push failed or was cancelled: the lease stays, empty, for a retry.
  void EndPush(const std::string& lease_id, uint64_t push_id);
  // The push completed: the lease takes `state` (handing it to a waiting
  // consumer, if any). Errors as RenewPush; FAILED_PRECONDITION if the state
  // holds more tokens than reserved.
  absl::Status AdoptState(const std::string& lease_id, uint64_t push_id, SequenceState state);

  // A decode stream claims the lease: `consumer` gets OnStateReady as soon as
  // the state is adopted (at once if it already is). NOT_FOUND if unknown,
  // ALREADY_EXISTS if claimed before. Does not renew: waiting is bounded by the TTL.
  absl::Status Claim(const std::string& lease_id, std::shared_ptr<StateConsumer> consumer);

  // Decode progress: renews the lease and records the tokens it now holds.
  // NOT_FOUND if the lease is gone (expired or released meanwhile).
  absl::Status Renew(const std::string& lease_id, int64_t num_tokens);

  // Revokes every lease whose TTL has passed without renewal (listeners get
  // NOT_FOUND "lease expired"). Returns how many. Called by the worker's reaper.
  int64_t ExpireOverdue();

  // While draining, Reserve is refused with UNAVAILABLE; existing leases go on.
  void SetDraining(bool draining);

  LeaseStats Stats() const;
  absl::Duration ttl() const { return options_.ttl; }

 private:
  struct Lease {
    std::string request_id;
    int64_t max_total_tokens = 0;
    int64_t reserved_rows = 0;  // max_total_tokens rounded up to the granularity
    absl::Time expires;
    uint64_t push_id = 0;                     // of the push in flight; 0 = none
    std::shared_ptr<LeaseListener> push;      // its listener
    bool has_state = false;                   // adopted, not yet handed over
    SequenceState state;
    std::shared_ptr<StateConsumer> consumer;  // the decode stream's claim
    bool handed_over = false;                 // state given to the consumer
    int64_t tokens = 0;                       // latent rows held
  };
  // Notifications collected under the lock, run after it is released.
  using Deferred = std::vector<std::function<void()>>;
  static void Run(Deferred& deferred);

  // Removes the lease, queueing revocations of its listeners.
  bool ReleaseImpl(const std::string& lease_id, const absl::Status& why, bool held);
  // `held`: the caller held the lease's handed-over state and freed it.
  void EraseLocked(absl::flat_hash_map<std::string, Lease>::iterator it, bool held,
                   const absl::Status& why, Deferred* deferred) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Lease*> FindPushLocked(const std::string& lease_id, uint64_t push_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const LeaseManagerOptions options_;
  const Clock clock_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Lease> leases_ ABSL_GUARDED_BY(mu_);
  uint64_t next_push_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t reserved_rows_ ABSL_GUARDED_BY(mu_) = 0;
  // Rows of released leases whose state the decode engine still holds.
  absl::flat_hash_map<std::string, int64_t> draining_rows_ ABSL_GUARDED_BY(mu_);
  int64_t expired_total_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

// 32 lowercase hex digits from the OS's random source (unguessable lease ids).
std::string NewRandomId();

}  // namespace kl

#endif  // KL_SERVICES_DECODE_LEASE_MANAGER_H_
