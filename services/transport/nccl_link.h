// NcclLink: one NCCL communicator of two ranks (prefill = 0, decode = 1) on
// this process's GPU, with its own stream, its own worker thread and the
// scratch a transfer needs.
//
// NCCL calls that may wait for the peer (a send or receive can be held until
// the peer posts its side, e.g. while NCCL connects more channels) run only on
// the link's worker thread (Post): a gRPC thread or the prefill engine thread
// never waits for the other process. Non-blocking NCCL; Abort() ends pending
// operations (ncclCommAbort), which also releases a worker waiting on them,
// then drains the stream. Every wait is bounded by its caller's deadline or
// ended by Abort / a stop flag. Thread-safe.
#ifndef KL_SERVICES_TRANSPORT_NCCL_LINK_H_
#define KL_SERVICES_TRANSPORT_NCCL_LINK_H_

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kl {

class NcclLink {
 public:
  enum class State { kInit, kReady, kBusy, kDead };

  NcclLink(uint64_t id, int device, int rank, std::string peer)
      : id_(id), device_(device), rank_(rank), peer_(std::move(peer)) {}
  ~NcclLink();
  NcclLink(const NcclLink&) = delete;
  NcclLink& operator=(const NcclLink&) = delete;

  // ncclGetUniqueId as bytes (the decode side creates it).
  static absl::StatusOr<std::string> NewUniqueId();
  static int Version();

  // Joins the communicator and connects to the peer (blocks until the peer
  // does the same, at most `timeout`). On failure the link is dead.
  absl::Status Init(const std::string& unique_id, absl::Duration timeout);

  // Worker thread only (inside Post): queues a group of sends (or receives)
  // to the peer on stream(); may wait until the peer posts its side.
  absl::Status Send(const void* const* ptrs, const int64_t* bytes, int n);
  absl::Status Recv(void* const* ptrs, const int64_t* bytes, int n);
  // Runs `work` on the worker thread, after the work posted before. The first
  // failure sticks: later work is skipped and Drain returns it.
  void Post(std::function<absl::Status()> work);
  // Waits until the posted work has run: its status, DEADLINE_EXCEEDED or
  // ABORTED (`stop` set or the link aborted).
  absl::Status Drain(absl::Time deadline, const std::atomic<bool>* stop);
  // Clears the sticky status (a new transfer on an idle link).
  void ResetWork();
  // The sticky status now (ABORTED once the link was aborted): lets a caller
  // refuse further work at once instead of at the next Drain.
  absl::Status WorkStatus();
  // Event `i` of this link (created on demand; one per plan message).
  absl::StatusOr<cudaEvent_t> Event(int64_t i);
  // Polls `event` until it completes, the communicator reports an error, or
  // `deadline` passes (then the link is aborted). `stop` (may be null) ends the
  // wait early with ABORTED. Yields between polls for the first `spin` (the end
  // of a transfer is seen within microseconds), then sleeps 50 us per poll.
  absl::Status Wait(cudaEvent_t event, absl::Time deadline, const std::atomic<bool>* stop,
                    absl::Duration spin = absl::Milliseconds(5));
  // Aborts the communicator and drains both streams; the link is dead. Logs
  // a warning the first time unless `expected` (a link closed on purpose).
  void Abort(bool expected = false);

  // Scratch (grown on demand, device memory of this link's GPU).
  absl::Status Reserve(int64_t staging_bytes, int64_t pages, int64_t sums);
  void* staging() const { return staging_; }
  int32_t* d_pages() const { return d_pages_; }
  int32_t* h_pages() const { return h_pages_; }
  uint64_t* d_sums() const { return d_sums_; }
  uint64_t* h_sums() const { return h_sums_; }
  cudaEvent_t done() const { return done_; }
  // Pipelined transfers: a second stream, and per staging half h an event that
  // marks it filled (`filled(h)`) and one that marks it free again (`freed(h)`).
  cudaStream_t aux_stream() const { return aux_; }
  cudaEvent_t filled(int h) const { return filled_[h]; }
  cudaEvent_t freed(int h) const { return freed_[h]; }

  uint64_t id() const { return id_; }
  int device() const { return device_; }
  const std::string& peer() const { return peer_; }
  cudaStream_t stream() const { return stream_; }
  State state() const { return state_.load(); }
  void set_state(State s) { state_.store(s); }
  // kReady -> kBusy; false if the link was not ready.
  bool TryAcquire() {
    State want = State::kReady;
    return state_.compare_exchange_strong(want, State::kBusy);
  }
  absl::Time last_used() const;
  void Touch();
  // Closed once unused for this long (InfiniteDuration: never); set before
  // the link is registered.
  absl::Duration idle_limit() const { return idle_limit_; }
  void set_idle_limit(absl::Duration d) { idle_limit_ = d; }

 private:
  absl::Status Settle(absl::Time deadline, const char* what);  // takes mu_ briefly
  void WorkerLoop();
  void WaitIdle();
  absl::Status Group(bool send, void* const* ptrs, const int64_t* bytes, int n,
                     absl::Time deadline);

  const uint64_t id_;
  const int device_;
  const int rank_;
  const std::string peer_;
  std::atomic<State> state_{State::kInit};
  mutable std::mutex mu_;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> aborted_{false};
  std::vector<cudaEvent_t> events_;

  std::mutex qmu_;
  std::condition_variable qcv_;
  std::deque<std::function<absl::Status()>> queue_;
  bool running_ = false;   // the worker is executing an item
  bool stopping_ = false;
  absl::Status work_status_;
  std::thread worker_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  cudaStream_t aux_ = nullptr;
  cudaEvent_t filled_[2] = {nullptr, nullptr};
  cudaEvent_t freed_[2] = {nullptr, nullptr};
  void* staging_ = nullptr;
  int64_t staging_bytes_ = 0;
  int32_t* d_pages_ = nullptr;
  int32_t* h_pages_ = nullptr;
  int64_t pages_cap_ = 0;
  uint64_t* d_sums_ = nullptr;
  uint64_t* h_sums_ = nullptr;
  int64_t sums_cap_ = 0;
  std::vector<void*> retired_dev_, retired_host_;  // outgrown scratch, freed with the link
  absl::Time last_used_ = absl::Now();
  absl::Duration idle_limit_ = absl::InfiniteDuration();
};

}  // namespace kl

#endif  // KL_SERVICES_TRANSPORT_NCCL_LINK_H_
