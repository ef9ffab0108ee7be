#include "services/router/admission_queue.h"

#include <algorithm>
#include <utility>

namespace kl {

AdmissionQueue::AdmissionQueue(int64_t max_inflight, int64_t max_queue)
    : max_queue_(std::max<int64_t>(0, max_queue)) {
  const int64_t n = std::max<int64_t>(1, max_inflight);
  threads_.reserve(n);
  for (int64_t i = 0; i < n; ++i) threads_.emplace_back([this] { DriverLoop(); });
}

AdmissionQueue::~AdmissionQueue() { Shutdown(); }

bool AdmissionQueue::TrySubmit(std::function<void()> task) {
  absl::MutexLock l(&mu_);
  if (shutdown_ || static_cast<int64_t>(queue_.size()) >= max_queue_) return false;
  queue_.push_back(std::move(task));
  return true;
}

void AdmissionQueue::DriverLoop() {
  absl::MutexLock l(&mu_);
  for (;;) {
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return shutdown_ || !queue_.empty();
    };
    mu_.Await(absl::Condition(&ready));
    if (queue_.empty()) return;  // shut down and drained
    std::function<void()> task = std::move(queue_.front());
    queue_.pop_front();
    ++running_;
    mu_.Unlock();
    task();
    mu_.Lock();
    --running_;
  }
}

void AdmissionQueue::Shutdown() {
  {
    absl::MutexLock l(&mu_);
    shutdown_ = true;
  }
  std::call_once(joined_, [this] {
    for (std::thread& t : threads_) t.join();
  });
}

bool AdmissionQueue::WaitIdle(absl::Duration timeout) {
  absl::MutexLock l(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return queue_.empty() && running_ == 0;
  };
  return mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
}

int64_t AdmissionQueue::queue_depth() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(queue_.size());
}

int64_t AdmissionQueue::running() const {
  absl::MutexLock l(&mu_);
  return running_;
}

}  // namespace kl
