// PrefillEngine: the prefill worker's queue and its one engine thread.
//
// Submit() admits a job to a bounded queue (RESOURCE_EXHAUSTED when full). The
// engine thread takes the waiting jobs in arrival order and packs them into one
// varlen Model::Forward of at most max_batch_tokens tokens; a prompt longer than
// that runs alone, chunked: Forward over max_batch_tokens tokens at a time with
// the state carried (exact: the state is what the next chunk starts from).
//
// Every job gets a StatePusher (its own sender thread + PushState stream to its
// decode target) before its first Forward. The layer-done callback queues each
// finished layer's parts on the job's pusher — MLA latent rows chunk by chunk,
// KDA states and conv tails after the last chunk — so transfer overlaps the
// remaining layers' compute. After the last chunk the engine samples the token
// at sample_index (Sampler(params, sample_index) on the last position's logits)
// and finishes the push; the job completes when the decode worker acknowledged
// the state (or at the first error, or on cancellation).
//
// Cancellation: PrefillJob::Cancel (RPC cancelled / deadline) completes the job
// at once and cancels its push; the engine drops a cancelled or failed job
// before its next chunk (a Forward already running is not interrupted).
#ifndef KL_SERVICES_PREFILL_PREFILL_ENGINE_H_
#define KL_SERVICES_PREFILL_PREFILL_ENGINE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/model/model.h"
#include "engine/sampling/sampler.h"
#include "engine/state/bundle_writer.h"
#include "services/prefill/channel_cache.h"
#include "services/prefill/prefill_metrics.h"
#include "services/prefill/prefix_cache.h"
#include "services/prefill/state_pusher.h"

namespace kl {

// Default cap on sequences per batched prefill forward.
inline constexpr int64_t kPrefillMaxBatchSeqs = 64;

// What a finished job reports (PrefillResponse).
struct PrefillResult {
  int32_t token = -1;
  int64_t num_tokens = 0;
  double queue_seconds = 0;
  double prefill_seconds = 0;
  double transfer_seconds = 0;
  int64_t transfer_bytes = 0;
  int64_t cached_tokens = 0;  // prompt tokens taken from the prefix cache, not prefilled
};

// One Prefill request in flight. Shared by the RPC reactor, the engine thread
// and the job's push sender; thread-safe.
class PrefillJob {
 public:
  using Done = std::function<void(const absl::StatusOr<PrefillResult>&)>;

  struct Spec {
    std::string request_id;
    std::vector<int32_t> tokens;
    SamplingParams params;  // validated
    int64_t sample_index = 0;
    std::string target_address;
    std::string lease_id;
    std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
  };

  // `done` is called exactly once (by Complete), on whichever thread completes.
  PrefillJob(Spec spec, Done done);

  const Spec& spec() const { return spec_; }
  bool done() const { return completed_.load(); }

  // Completes the job (first call wins) and cancels its push if still running.
  void Cancel(const absl::Status& why);
  // First call wins (returns true); later calls are ignored.
  bool Complete(const absl::StatusOr<PrefillResult>& result);

 private:
  friend class PrefillEngine;
  const Spec spec_;
  Done done_fn_;
  std::atomic<bool> completed_{false};
  absl::Time enqueued_ = absl::Now();

  absl::Mutex mu_;
  std::shared_ptr<StatePusher> pusher_ ABSL_GUARDED_BY(mu_);
  // Engine thread only.
  std::shared_ptr<SequenceState> state_;
  std::shared_ptr<DeviceSend> device_;  // set when the state goes over a device link
  int64_t cached_ = 0;                  // prompt tokens the state started with (prefix cache)
  // The prefix cache's entry for this prompt, looked up once when the engine
  // first considers the job for a batch (its length sets the work to batch).
  bool looked_up_ = false;
  std::shared_ptr<const PrefixCache::Entry> hit_;
  // Set once the forward is done: the push's completion may keep the state.
  std::atomic<bool> cacheable_{false};
  absl::Time started_;
  PrefillResult result_;
};

struct PrefillEngineOptions {
  int64_t max_batch_tokens = 8192;
  // Sequences per batched forward (a device backend holds one state slot each).
  int64_t max_batch_seqs = kPrefillMaxBatchSeqs;
  int64_t max_queue = 64;
  BundleOptions bundle;                 // wire dtypes of the pushed state
  uint64_t checkpoint_fingerprint = 0;  // written into every bundle header
  PrefillMetrics* metrics = nullptr;    // null: metrics off; must outlive the engine
  ChannelSecurity push_security;        // how state pushes dial decode workers (tls.h)
  // FAULT INJECTION (tests only; null = off): damages pushes (state_fault.h).
  std::shared_ptr<StateFaultInjector> fault_injector;
  // GPU builds: ship states over device links (NCCL) where the decode worker
  // can take them; null: gRPC only. Must outlive the engine.
  DeviceTransport* transport = nullptr;
  // Sample the first token on the device when the backend can (Backend::SampleTokens):
  // the same token as the host Sampler, without sorting the vocabulary on the host.
  bool device_sampling = true;
  // Prompt states kept for prompts that extend them (prefix_cache.h); 0 = off.
  // Entries are kept for states pushed over gRPC; a prompt that hits one is
  // pushed over gRPC too (a device link's plan starts at the first token).
  int64_t prefix_cache_bytes = 0;
};

struct PrefillEngineStats {
  int64_t waiting = 0;            // queued jobs
  int64_t running = 0;            // jobs in the current Forward
  int64_t transfers_in_flight = 0;
  int64_t completed = 0;          // jobs completed OK
  int64_t forwards = 0;           // Forward calls
  bool draining = false;
};

class PrefillEngine {
 public:
  // `model` must outlive the engine. Starts the engine thread.
  PrefillEngine(Model* model, PrefillEngineOptions options);
  // Stops the thread, fails queued jobs with UNAVAILABLE, cancels pushes and
  // waits for every sender thread.
  ~PrefillEngine();

  PrefillEngine(const PrefillEngine&) = delete;
  PrefillEngine& operator=(const PrefillEngine&) = delete;

  // RESOURCE_EXHAUSTED when max_queue jobs wait; UNAVAILABLE when draining.
  absl::Status Submit(std::shared_ptr<PrefillJob> job);
  // Refuses new jobs; queued and running ones finish.
  void Drain();
  // True once nothing is queued, running or being pushed (waits up to `timeout`).
  bool WaitIdle(absl::Duration timeout);
  PrefillEngineStats Stats() const;
  // Null when the prefix cache is off.
  const PrefixCache* prefix_cache() const { return prefix_cache_.get(); }

 private:
  void Loop();
  // Takes the next batch off the queue (engine thread).
  std::vector<std::shared_ptr<PrefillJob>> NextBatch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Tokens the job's forward computes: its prompt less a prefix-cache hit
  // (looked up here, once per job; engine thread).
  int64_t TokensToCompute(PrefillJob& job);
  // A device transfer for `job`'s state, or null (the push goes over gRPC).
  std::shared_ptr<DeviceSend> StartDeviceSend(const PrefillJob& job, const PushTarget& target);
  // Creates the job's state, bundle writer and pusher (null if the job ended).
  std::shared_ptr<StatePusher> StartJob(const std::shared_ptr<PrefillJob>& job);
  // One varlen Forward over jobs that each fit in one chunk.
  void RunBatch(const std::vector<std::shared_ptr<PrefillJob>>& jobs);
  // A long prompt alone, chunk by chunk.
  void RunChunked(const std::shared_ptr<PrefillJob>& job);
  // Samples the job's first token (from out.tokens[item] when the forward sampled on the
  // device, else from out.logits[item] with the host Sampler) and finishes the push.
  void FinishJob(PrefillJob& job, const ForwardOutput& out, size_t item);
  // Whether the job's first token is sampled on the device, and with what (*out).
  bool SampleOnDevice(const PrefillJob& job, TokenSampling* out) const;
  void FailJob(PrefillJob& job, const absl::Status& status);

  Model* const model_;
  const PrefillEngineOptions options_;
  std::vector<int64_t> ordinal_;  // per layer: index into SequenceState::kda or ::mla
  ChannelCache channels_;
  std::unique_ptr<PrefixCache> prefix_cache_;
  SenderTracker senders_;

  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<PrefillJob>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  // Pushes that may still run, cancelled at destruction.
  std::vector<std::weak_ptr<StatePusher>> live_pushers_ ABSL_GUARDED_BY(mu_);

  std::atomic<int64_t> running_{0};
  std::atomic<int64_t> completed_{0};
  std::atomic<int64_t> forwards_{0};
  int64_t device_corrupts_ = 0;  // fault injection; the engine thread only
  std::thread thread_;
};

}  // namespace kl

#endif  // KL_SERVICES_PREFILL_PREFILL_ENGINE_H_
