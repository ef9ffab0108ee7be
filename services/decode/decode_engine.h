// DecodeEngine: continuous batching on one engine thread. Every step takes the
// running sequences that can accept a token (up to max_batch), runs ONE
// Model::Forward over all of them (one new token each; a sequence's first step
// feeds the prefill's last token), samples each with its own seeded Sampler
// and hands the token to the sequence's TokenSink. Sequences join and leave
// between steps.
//
// A sequence leaves on a stop token id, eos (unless ignore_eos), max_new_tokens,
// its sink being cancelled (client gone, deadline, lease revoked) or an engine
// error; whenever it leaves, its lease is released (freeing slot and rows) and
// its sink ended with the reason.
//
// Back-pressure: a sink without room (its client reads slowly) is skipped for
// that step instead of stalling the batch; it makes no progress, so its lease
// is not renewed and expires after one TTL, which cancels it.
//
// No gRPC: TokenSink is the seam to the stream (decode_stream.h).
#ifndef KL_SERVICES_DECODE_DECODE_ENGINE_H_
#define KL_SERVICES_DECODE_DECODE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "engine/model/model.h"
#include "engine/sampling/sampler.h"
#include "engine/state/sequence_state.h"
#include "services/decode/decode_metrics.h"
#include "services/decode/lease_manager.h"

#include "services/decode/state_pool.h"

namespace kl {

// The receiving end of a sequence's tokens. Thread-safe; called by the engine
// thread without engine locks held. Must not block.
class TokenSink {
 public:
  virtual ~TokenSink() = default;
  // True if one more token can be buffered now.
  virtual bool HasRoom() = 0;
  // True once the consumer is gone: the engine drops the sequence.
  virtual bool Cancelled() = 0;
  // Token number `index` (among generated tokens); `finished` on the last one.
  virtual void Emit(int32_t token, int64_t index, bool finished) = 0;
  // The sequence left the batch: OK after a finished token, else why.
  virtual void End(const absl::Status& status) = 0;
};

// One sequence to decode, as a Decode request describes it.
struct DecodeSpec {
  std::string lease_id;
  std::string request_id;
  SamplingParams params;       // validated; params.max_tokens is unused
  int32_t last_token = 0;      // fed first: sampled by prefill, not yet in the state
  int64_t next_index = 1;      // index of the first token produced
  int64_t max_new_tokens = 1;  // >= 1
};

struct DecodeEngineOptions {
  int64_t max_batch = 16;  // sequences per step
  // eos id (config eos_token_id; < 0 disables).
  int32_t eos_token_id = -1;
  // Where finished sequences' states go for reuse (optional, not owned).
  StatePool* state_pool = nullptr;
  // Step time and batch size (optional, not owned; null: metrics off).
  DecodeMetrics* metrics = nullptr;
  // Sample next tokens on the device when the backend can (the CUDA backend): only token
  // ids cross to the host instead of [batch][vocab] logits, and nothing is sorted on the
  // host. The same tokens as the host Sampler (kernels/cuda/sampling.h).
  bool device_sampling = true;
};

struct DecodeEngineStats {
  int64_t running = 0;          // sequences in the batch (incl. paused ones)
  int64_t joining = 0;          // handed over, not yet in the batch
  int64_t steps = 0;            // Forward calls so far
  int64_t max_batch_seen = 0;   // largest batch of one step
  int64_t completed = 0;        // sequences that finished (stop / length)
};

class DecodeEngine {
 public:
  // `model` and `leases` must outlive the engine. Starts the engine thread.
  DecodeEngine(Model* model, LeaseManager* leases, DecodeEngineOptions options);
  // Stops the thread; sequences still running end with UNAVAILABLE.
  ~DecodeEngine();

  DecodeEngine(const DecodeEngine&) = delete;
  DecodeEngine& operator=(const DecodeEngine&) = delete;

  // Queues a sequence to join the batch before the next step. UNAVAILABLE once
  // stopping (the caller then ends the sink and releases the lease).
  absl::Status Join(DecodeSpec spec, SequenceState state, std::shared_ptr<TokenSink> sink);

  // Wakes the engine thread: a sink has room again or was cancelled.
  void Wake();

  DecodeEngineStats Stats() const;

 private:
  struct Sequence {
    DecodeSpec spec;
    SequenceState state;
    std::shared_ptr<TokenSink> sink;
    Sampler sampler;
    int32_t next_input = 0;  // token fed at the next step
    int64_t index = 0;       // index of the next token produced
    int64_t produced = 0;
  };

  void Loop();
  // Ends `seq` (releases its lease, ends its sink) — engine thread only.
  void Leave(Sequence& seq, const absl::Status& status);
  // One Forward over `batch`; emits and retires. Engine thread only.
  void Step(std::vector<Sequence*>& batch);

  Model* const model_;
  LeaseManager* const leases_;
  const DecodeEngineOptions options_;

  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Sequence>> joining_ ABSL_GUARDED_BY(mu_);
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;

  // Engine thread only.
  std::vector<std::unique_ptr<Sequence>> running_;
  size_t rotate_ = 0;  // round-robin start when more than max_batch can run

  std::atomic<int64_t> running_count_{0};
  std::atomic<int64_t> steps_{0};
  std::atomic<int64_t> max_batch_seen_{0};
  std::atomic<int64_t> completed_{0};

  std::thread thread_;
};

}  // namespace kl

#endif  // KL_SERVICES_DECODE_DECODE_ENGINE_H_
