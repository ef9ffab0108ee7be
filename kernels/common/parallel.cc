#include "kernels/common/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace kl {
namespace {

thread_local bool tls_in_parallel = false;

// Fixed workers that wait for a job generation; the job is a block counter
// shared by the caller and the workers (work stealing by atomic increment).
class Pool {
 public:
  explicit Pool(int n) { Resize(n); }
  ~Pool() { Stop(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void Resize(int n) {
    Stop();
    stop_ = false;
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { Loop(); });
  }

  void Run(int64_t nblocks, const std::function<void(int64_t)>& block_fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one job at a time
    {
      std::lock_guard<std::mutex> l(mu_);
      job_ = &block_fn;
      nblocks_ = nblocks;
      next_.store(0);
      pending_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    cv_.notify_all();
    Work();
    std::unique_lock<std::mutex> l(mu_);
    done_cv_.wait(l, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void Work() {
    tls_in_parallel = true;
    for (int64_t b; (b = next_.fetch_add(1)) < nblocks_;) (*job_)(b);
    tls_in_parallel = false;
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      Work();
      std::lock_guard<std::mutex> l(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t nblocks_ = 0;
  std::atomic<int64_t> next_{0};
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int DefaultThreads() { return std::max(1u, std::thread::hardware_concurrency()); }

Pool& GetPool() {
  static Pool* pool = new Pool(DefaultThreads());  // never destroyed: threads outlive statics
  return *pool;
}

}  // namespace

void SetNumThreads(int n) { GetPool().Resize(n > 0 ? n : DefaultThreads()); }
int NumThreads() { return GetPool().size(); }

void ParallelFor(int64_t n, int64_t min_block,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Pool& pool = GetPool();
  const int threads = pool.size();
  min_block = std::max<int64_t>(1, min_block);
  if (threads == 1 || tls_in_parallel || n <= min_block) {
    fn(0, n);
    return;
  }
  // A few blocks per thread balance uneven work without much overhead.
  int64_t nblocks = std::min<int64_t>(n / min_block, int64_t{threads} * 4);
  nblocks = std::max<int64_t>(nblocks, 1);
  const int64_t block = (n + nblocks - 1) / nblocks;
  nblocks = (n + block - 1) / block;
  pool.Run(nblocks, [&](int64_t b) { fn(b * block, std::min(n, (b + 1) * block)); });
}

}  // namespace kl
