// StatePusher: ships one request's StateBundle to a decode worker over a
// Decode.PushState client stream, on its own sender thread, while the forward
// pass that produces the state is still running.
//
// The engine thread calls Ship* from Model::Forward's layer-done callback (cheap:
// it queues a reference, or copies MLA rows that a later chunk may move), then
// Finish() after the last layer. The sender thread serialises each queued part
// with the BundleWriter (dtype conversion + CRC) and writes its frames; after
// Finish it writes the final record, closes the stream and waits for the
// decode worker's acknowledgement. `done` is called exactly once, on the sender
// thread, with the outcome.
//
// State access: the sender reads KDA parts and final-chunk MLA rows in place
// from the shared SequenceState. That is safe because the engine never
// modifies a layer's KDA state or those rows after the layer-done callback of
// the last chunk, and keeps the state alive through the shared_ptr.
//
// Errors from the decode worker keep their code (NOT_FOUND, FAILED_PRECONDITION,
// DATA_LOSS, UNAVAILABLE, ALREADY_EXISTS, ABORTED, DEADLINE_EXCEEDED,
// CANCELLED); anything else, e.g. INVALID_ARGUMENT (a malformed bundle is this
// worker's fault, not the request's), becomes INTERNAL.
#ifndef KL_SERVICES_PREFILL_STATE_PUSHER_H_
#define KL_SERVICES_PREFILL_STATE_PUSHER_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/config/model_config.h"
#include "engine/state/bundle_writer.h"
#include "engine/state/sequence_state.h"
#include "services/prefill/state_fault.h"
#include "services/transport/device_transport.h"

namespace kl {

// Counts live sender threads so their owner can wait for them at shutdown.
class SenderTracker {
 public:
  void Enter();
  void Exit();
  int64_t live() const;
  void WaitAllExited();

 private:
  mutable absl::Mutex mu_;
  int64_t live_ ABSL_GUARDED_BY(mu_) = 0;
};

struct PushTarget {
  std::shared_ptr<grpc::Channel> channel;
  std::string address;  // for messages
  std::string lease_id;
  std::string request_id;
  std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
  // FAULT INJECTION (tests only, state_fault.h): damage this push's frames.
  StateFault fault = StateFault::kNone;
  // Set: the parts go over this device link (services/transport); the stream
  // carries the header, the plan and the checksums only.
  std::shared_ptr<DeviceSend> device;
};

struct PushResult {
  int64_t frames = 0;
  int64_t bytes = 0;               // frame bytes sent
  double transfer_seconds = 0;     // first frame written -> decode worker acknowledged
  // Split by kind (the rest of `bytes` is framing: header, final record), and
  // the sender's time serialising + writing each kind's frames.
  int64_t kda_bytes = 0;
  int64_t mla_bytes = 0;
  bool device = false;             // the parts went over a device link (no per-kind times)
  double kda_seconds = 0;
  double mla_seconds = 0;
};

class StatePusher : public std::enable_shared_from_this<StatePusher> {
 public:
  using Done = std::function<void(absl::StatusOr<PushResult>)>;

  // Opens the stream and starts the sender thread (registered with `tracker`,
  // which must outlive it). The header frame goes out first.
  static std::shared_ptr<StatePusher> Start(const ModelConfig& config,
                                            std::unique_ptr<BundleWriter> writer,
                                            std::shared_ptr<const SequenceState> state,
                                            PushTarget target, Done done,
                                            SenderTracker* tracker);

  // Queue KDA layer `layer` (SequenceState::kda[ordinal]) — final state only.
  void ShipKdaLayer(int64_t layer, int64_t ordinal);
  // Queue rows [begin, end) of MLA layer `layer` (SequenceState::mla[ordinal]);
  // `copy_now` when a later forward call may still move the rows.
  void ShipMlaRows(int64_t layer, int64_t ordinal, int64_t begin, int64_t end, bool copy_now);
  // Every part is queued: send the final record, close, await the ack.
  void Finish();
  // Stops the push (the stream is cancelled); `done` gets `why` unless it was
  // already called.
  void Cancel(const absl::Status& why);
  // True once the push has failed or was cancelled (no point computing more).
  bool failed() const { return failed_.load(); }

  StatePusher(const ModelConfig& config, std::unique_ptr<BundleWriter> writer,
              std::shared_ptr<const SequenceState> state, PushTarget target, Done done);

 private:
  struct Item {
    bool kda = false;
    int64_t layer = 0, ordinal = 0, begin = 0, end = 0;
    std::vector<float> copy;  // MLA rows copied at queue time (else read in place)
  };

  void Run();
  // Serialises one item into frames; INTERNAL on a writer error.
  absl::StatusOr<std::vector<BundleFrame>> Serialize(const Item& item);
  // Run() for a device transfer (target_.device set).
  void RunDevice();
  void Conclude(absl::Status local, bool closed, const grpc::Status& gs, PushResult result,
                absl::Time first_sent);
  void Enqueue(Item item);

  const ModelConfig config_;
  const std::unique_ptr<BundleWriter> writer_;
  const std::shared_ptr<const SequenceState> state_;
  const PushTarget target_;
  Done done_;  // moved out and called once, on the sender thread
  grpc::ClientContext ctx_;
  std::atomic<bool> failed_{false};

  absl::Mutex mu_;
  std::deque<Item> items_ ABSL_GUARDED_BY(mu_);
  bool finish_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_seen_ ABSL_GUARDED_BY(mu_) = false;  // RunDevice
  bool device_wake_ ABSL_GUARDED_BY(mu_) = false;  // the device send has news
  std::optional<absl::Status> cancel_ ABSL_GUARDED_BY(mu_);
};

// Maps a PushState failure to the status the Prefill RPC returns (see above).
absl::Status PushErrorToPrefillStatus(const absl::Status& push, const std::string& address);

}  // namespace kl

#endif  // KL_SERVICES_PREFILL_STATE_PUSHER_H_
