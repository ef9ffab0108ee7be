// Bounded admission in front of the router's driver threads: at most
// `max_inflight` requests run at once (one driver thread each) and at most
// `max_queue` wait for a thread. TrySubmit never blocks: when the queue is
// full it refuses at once, and the caller answers RESOURCE_EXHAUSTED.
//
// Thread-safety: all methods may be called from any thread.
#ifndef KL_SERVICES_ROUTER_ADMISSION_QUEUE_H_
#define KL_SERVICES_ROUTER_ADMISSION_QUEUE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kl {

class AdmissionQueue {
 public:
  // Starts `max_inflight` (>= 1) driver threads.
  AdmissionQueue(int64_t max_inflight, int64_t max_queue);
  ~AdmissionQueue();  // Shutdown()
  AdmissionQueue(const AdmissionQueue&) = delete;
  AdmissionQueue& operator=(const AdmissionQueue&) = delete;

  // Queues `task` unless max_queue tasks already wait or Shutdown began.
  bool TrySubmit(std::function<void()> task);

  // Refuses new tasks, lets the driver threads run everything queued, joins them.
  void Shutdown();

  // True once nothing is queued or running; false if `timeout` passed first.
  bool WaitIdle(absl::Duration timeout);

  int64_t queue_depth() const;  // admitted, waiting for a driver thread
  int64_t running() const;      // on a driver thread now

 private:
  void DriverLoop();

  const int64_t max_queue_;
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // written by the constructor only
  std::once_flag joined_;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_ADMISSION_QUEUE_H_
