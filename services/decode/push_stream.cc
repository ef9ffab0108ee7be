#include "services/decode/push_stream.h"

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/common/log.h"
#include "engine/state/bundle_assembler.h"
#include "services/common/request_context.h"
#include "services/common/status_util.h"

namespace kl {
namespace {

// The assembler's ALREADY_EXISTS (a part, header or final record seen twice)
// means a damaged transfer here: say DATA_LOSS, so the sender and the router
// treat it like any other corrupt stream (retry on a fresh pair), and keep
// ALREADY_EXISTS for its RPC-level meaning, "the lease already holds a state".
absl::Status TransferStatus(const absl::Status& s) {
  if (s.code() != absl::StatusCode::kAlreadyExists) return s;
  return absl::DataLossError(absl::StrCat("duplicated frame in the state transfer: ", s.message()));
}

// Registered with the lease while the push is in flight. On revocation (lease
// expired or released, push superseded) it aborts the assembly at once, which
// frees the partial state even if the client never sends another frame; the
// reactor learns the reason at its next reaction.
class PushListener final : public LeaseListener {
 public:
  void OnLeaseRevoked(const absl::Status& why) override {
    std::shared_ptr<BundleAssembler> assembler;
    std::shared_ptr<DeviceReceive> receive;
    {
      absl::MutexLock l(&mu_);
      revoked_ = why;
      assembler = std::move(assembler_);
      receive = std::move(receive_);
    }
    if (assembler) assembler->Abort();
    if (receive) receive->Abort();
  }
  // False if already revoked.
  bool AttachReceive(std::shared_ptr<DeviceReceive> receive) {
    absl::MutexLock l(&mu_);
    if (revoked_.has_value()) return false;
    receive_ = std::move(receive);
    return true;
  }
  // False if already revoked.
  bool Attach(std::shared_ptr<BundleAssembler> assembler) {
    absl::MutexLock l(&mu_);
    if (revoked_.has_value()) return false;
    assembler_ = std::move(assembler);
    return true;
  }
  std::optional<absl::Status> revoked() {
    absl::MutexLock l(&mu_);
    return revoked_;
  }

 private:
  absl::Mutex mu_;
  std::optional<absl::Status> revoked_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<BundleAssembler> assembler_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<DeviceReceive> receive_ ABSL_GUARDED_BY(mu_);
};

// Reactions run one at a time (one read outstanding), so members need no lock.
class PushReactor final : public grpc::ServerReadReactor<v1::StatePart> {
 public:
  PushReactor(grpc::CallbackServerContext* ctx, v1::PushStateResponse* response,
              const PushStreamDeps& deps)
      : ctx_(ctx), response_(response), deps_(deps), request_id_(RequestIdOf(*ctx)) {
    StartRead(&part_);
  }

  void OnReadDone(bool ok) override {
    ScopedRequestId rid(request_id_);  // the prefill worker's x-request-id
    if (!ok) {
      Complete();
      return;
    }
    absl::Status s = Absorb();
    if (!s.ok()) return;  // Absorb finished the call
    if (device_done_) {
      CompleteDevice();  // finishes the call from its own thread
      return;
    }
    StartRead(&part_);
  }

  // The prefill worker went away while the device receives were being waited
  // for (no read is outstanding then): end them, the waiting thread fails the call.
  void OnCancel() override {
    std::shared_ptr<DeviceReceive> receive;
    {
      absl::MutexLock l(&cancel_mu_);
      cancelled_ = true;
      if (device_done_) receive = receive_;
    }
    if (receive != nullptr) receive->Abort();
  }

  void OnDone() override {
    if (push_id_ != 0) deps_.leases->EndPush(lease_id_, push_id_);  // no-op once adopted
    delete this;
  }

 private:
  // Handles one message; on error finishes the call and returns the error.
  absl::Status Absorb() {
    if (push_id_ == 0) {
      if (part_.lease_id().empty()) {
        return Fail(absl::InvalidArgumentError("the first StatePart must carry lease_id"), false);
      }
      lease_id_ = part_.lease_id();
      listener_ = std::make_shared<PushListener>();
      absl::StatusOr<PushTicket> ticket = deps_.leases->BeginPush(lease_id_, listener_);
      if (!ticket.ok()) return Fail(ticket.status(), false);
      push_id_ = ticket->push_id;
      AssemblerOptions ao;
      ao.expected_checkpoint_fingerprint = deps_.checkpoint_fingerprint;
      ao.max_tokens = ticket->max_total_tokens;  // 0: the model's context
      assembler_ = std::make_shared<BundleAssembler>(
          *deps_.config, ao, deps_.state_pool ? deps_.state_pool->Take() : SequenceState());
      if (!listener_->Attach(assembler_)) return Fail(*listener_->revoked(), false);
    } else if (!part_.lease_id().empty() && part_.lease_id() != lease_id_) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("StatePart for lease ", part_.lease_id(),
                                                          " on the stream of lease ", lease_id_)),
                  false);
    }
    if (absl::Status s = deps_.leases->RenewPush(lease_id_, push_id_); !s.ok()) {
      return Fail(s, false);
    }
    if (part_.has_device() || receive_ != nullptr) return AbsorbDevice();
    if (part_.device_done() || part_.device_groups_size() > 0) {
      return Fail(absl::InvalidArgumentError(
                      "device_done or device_groups on a push without a device transfer"),
                  false);
    }
    if (absl::Status s = assembler_->Add(part_.frame()); !s.ok()) {
      if (auto why = listener_->revoked()) return Fail(*why, false);
      return Fail(TransferStatus(s), true);
    }
    ++frames_;
    bytes_ += static_cast<int64_t>(part_.frame().size());
    return absl::OkStatus();
  }

  // A device transfer: the header frame and the plan first (the device state
  // is allocated at once), then the announced groups (their receives are
  // posted as they come), then the checksums.
  absl::Status AbsorbDevice() {
    if (receive_ == nullptr) {
      if (deps_.transport == nullptr) {
        return Fail(absl::FailedPreconditionError(
                        "device transfer offered, but this decode worker has no device transport"),
                    false);
      }
      if (part_.device_groups_size() > 0 || part_.device_done()) {
        return Fail(absl::InvalidArgumentError(
                        "a device transfer's plan message carries no groups or checksums"),
                    false);
      }
      if (absl::Status s = assembler_->Add(part_.frame()); !s.ok()) {
        if (auto why = listener_->revoked()) return Fail(*why, false);
        return Fail(TransferStatus(s), true);
      }
      const std::optional<BundleHeader> header = assembler_->header();
      if (!header.has_value()) {
        return Fail(absl::InvalidArgumentError("a device transfer's first frame must be the header"),
                    false);
      }
      absl::StatusOr<std::unique_ptr<DeviceReceive>> r = deps_.transport->BeginReceive(
          part_.device().link_id(), part_.device(), header->num_tokens);
      if (!r.ok()) {
        const absl::Status& e = r.status();
        // A link that is gone or busy is the sender's to fix (it drops the link).
        const bool link = e.code() == absl::StatusCode::kNotFound ||
                          e.code() == absl::StatusCode::kAborted;
        return Fail(link ? absl::UnavailableError(e.message()) : e,
                    e.code() == absl::StatusCode::kInvalidArgument);
      }
      {
        absl::MutexLock l(&cancel_mu_);
        receive_ = std::shared_ptr<DeviceReceive>(std::move(*r));
      }
      if (!listener_->AttachReceive(receive_)) return Fail(*listener_->revoked(), false);
      ++frames_;
      bytes_ += static_cast<int64_t>(part_.frame().size());
      return absl::OkStatus();
    }
    if (!part_.frame().empty() || part_.has_device()) {
      return Fail(absl::InvalidArgumentError(
                      "a device transfer carries no frames or plan after its header, only "
                      "device_groups and device_done"),
                  false);
    }
    for (const v1::DeviceGroup& g : part_.device_groups()) {
      // The sender sends this group now: post its receives.
      if (absl::Status s = receive_->Receive({g.first(), g.count()}); !s.ok()) {
        if (auto why = listener_->revoked()) return Fail(*why, false);
        return Fail(s, false);
      }
    }
    if (!part_.device_done()) return absl::OkStatus();  // groups or progress: lease renewed
    checksums_.assign(part_.device_checksums().begin(), part_.device_checksums().end());
    absl::MutexLock l(&cancel_mu_);
    device_done_ = true;
    return absl::OkStatus();
  }

  // Waits for the device receives off the callback threads, then adopts or fails.
  void CompleteDevice() {
    std::thread([this] {
      ScopedRequestId rid(request_id_);
      {
        absl::MutexLock l(&cancel_mu_);  // a cancel that came first is not lost
        if (cancelled_) receive_->Abort();
      }
      absl::StatusOr<SequenceState> state = receive_->Complete(checksums_);
      if (!state.ok()) {
        if (auto why = listener_->revoked()) {
          Refuse(*why, false);
        } else {
          Refuse(state.status(), state.status().code() == absl::StatusCode::kDataLoss);
        }
        return;
      }
      if (absl::Status s = deps_.leases->AdoptState(lease_id_, push_id_, *std::move(state));
          !s.ok()) {
        Refuse(s, false);
        return;
      }
      push_id_ = 0;
      KL_LOG(INFO).Field("lease", lease_id_).Field("messages", checksums_.size())
          << "state received over the device link";
      response_->set_frames(frames_);
      response_->set_bytes(bytes_);
      Finish(grpc::Status::OK);
    }).detach();
  }

  // The client closed its side (or the call broke): finish the bundle.
  void Complete() {
    if (ctx_->IsCancelled()) {
      Refuse(absl::CancelledError("PushState cancelled by the client"), false);
      return;
    }
    if (push_id_ == 0) {
      Refuse(absl::InvalidArgumentError("PushState stream carried no StatePart"), false);
      return;
    }
    if (receive_ != nullptr) {
      Refuse(absl::DataLossError("PushState ended before the device transfer's checksums"), true);
      return;
    }
    absl::StatusOr<SequenceState> state = assembler_->Finish();
    if (!state.ok()) {
      if (auto why = listener_->revoked()) {
        Refuse(*why, false);
      } else if (state.status().code() == absl::StatusCode::kFailedPrecondition) {
        // Incomplete: the sender closed the stream early.
        Refuse(absl::DataLossError(absl::StrCat("PushState ended before the bundle was complete: ",
                                              state.status().message())),
             true);
      } else {
        Refuse(state.status(), true);
      }
      return;
    }
    if (absl::Status s = deps_.leases->AdoptState(lease_id_, push_id_, *std::move(state));
        !s.ok()) {
      Refuse(s, false);
      return;
    }
    push_id_ = 0;  // adopted: nothing for OnDone to end
    KL_LOG(INFO).Field("lease", lease_id_).Field("frames", frames_).Field("bytes", bytes_)
        << "state received";
    response_->set_frames(frames_);
    response_->set_bytes(bytes_);
    Finish(grpc::Status::OK);
  }

  // Fail where the caller has no status to pass on (the call is finished).
  void Refuse(const absl::Status& status, bool integrity) { Fail(status, integrity).IgnoreError(); }

  absl::Status Fail(const absl::Status& status, bool integrity) {
    if (integrity) {
      deps_.integrity_failures->fetch_add(1);
      KL_LOG(WARNING).Field("lease", lease_id_).Field("frames", frames_)
          << "state bundle refused: " << status.ToString();
    } else {
      KL_LOG(INFO).Field("lease", lease_id_).Field("code", absl::StatusCodeToString(status.code()))
          << "state push refused: " << status.message();
    }
    if (assembler_) assembler_->Abort();  // free the partial state now
    if (receive_) receive_->Abort();      // ends the link's receives, frees the device state
    if (push_id_ != 0) deps_.leases->EndPush(lease_id_, push_id_);
    push_id_ = 0;
    Finish(ToGrpcStatus(status));
    return status;
  }

  grpc::CallbackServerContext* const ctx_;
  v1::PushStateResponse* const response_;
  const PushStreamDeps deps_;
  const std::string request_id_;
  v1::StatePart part_;
  std::string lease_id_;
  uint64_t push_id_ = 0;  // nonzero while this push is registered with the lease
  std::shared_ptr<PushListener> listener_;
  std::shared_ptr<BundleAssembler> assembler_;
  // A device transfer in progress. receive_ and device_done_ are written by
  // reactions (under cancel_mu_) and read by OnCancel (under cancel_mu_), which
  // gRPC does not serialise with the reactions; reactions read them without it.
  absl::Mutex cancel_mu_;
  std::shared_ptr<DeviceReceive> receive_;
  bool device_done_ = false;
  bool cancelled_ = false;
  std::vector<uint64_t> checksums_;
  int64_t frames_ = 0;
  int64_t bytes_ = 0;
};

}  // namespace

grpc::ServerReadReactor<v1::StatePart>* StartPushCall(grpc::CallbackServerContext* ctx,
                                                      v1::PushStateResponse* response,
                                                      const PushStreamDeps& deps) {
  return new PushReactor(ctx, response, deps);
}

}  // namespace kl
