#include "services/transport/nccl_link.h"

#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/common/log.h"
#include "kernels/cuda/cuda_status.h"

namespace kl {
namespace {

absl::Status NcclError(ncclResult_t r, const char* what, ncclComm_t comm) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  return absl::UnavailableError(absl::StrCat("NCCL ", what, ": ", ncclGetErrorString(r),
                                             last != nullptr && *last ? ": " : "",
                                             last != nullptr ? last : ""));
}

// Operations wait for the peer as long as it takes; what bounds a transfer is
// the caller's Drain / Wait deadline, after which it aborts the link.
constexpr absl::Duration kPeerPatience = absl::Hours(1);

}  // namespace

NcclLink::~NcclLink() {
  cudaSetDevice(device_);
  {
    std::lock_guard<std::mutex> l(mu_);
    aborted_ = true;
    if (comm_ != nullptr) {
      // Never a collective destroy: abort does not wait for the peer.
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
  }
  {
    std::lock_guard<std::mutex> l(qmu_);
    stopping_ = true;
  }
  qcv_.notify_all();
  if (worker_.joinable()) worker_.join();
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  if (aux_ != nullptr) {
    cudaStreamSynchronize(aux_);
    cudaStreamDestroy(aux_);
  }
  if (done_ != nullptr) cudaEventDestroy(done_);
  for (int h = 0; h < 2; ++h) {
    if (filled_[h] != nullptr) cudaEventDestroy(filled_[h]);
    if (freed_[h] != nullptr) cudaEventDestroy(freed_[h]);
  }
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  cudaFree(staging_);
  cudaFree(d_pages_);
  cudaFree(d_sums_);
  cudaFreeHost(h_pages_);
  cudaFreeHost(h_sums_);
  for (void* p : retired_dev_) cudaFree(p);
  for (void* p : retired_host_) cudaFreeHost(p);
}

absl::StatusOr<std::string> NcclLink::NewUniqueId() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) return NcclError(r, "ncclGetUniqueId", nullptr);
  return std::string(id.internal, sizeof(id.internal));
}

int NcclLink::Version() {
  int v = 0;
  ncclGetVersion(&v);
  return v;
}

absl::Time NcclLink::last_used() const {
  std::lock_guard<std::mutex> l(mu_);
  return last_used_;
}

void NcclLink::Touch() {
  std::lock_guard<std::mutex> l(mu_);
  last_used_ = absl::Now();
}

absl::Status NcclLink::Settle(absl::Time deadline, const char* what) {
  // Non-blocking NCCL launches every group from a helper thread and reports
  // ncclInProgress until it has: usually tens of microseconds. Yield for the
  // first half millisecond (a sleep would add its whole quantum to every
  // group), then poll every 50 us.
  const absl::Time spin_until = absl::Now() + absl::Microseconds(500);
  for (;;) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (aborted_ || comm_ == nullptr) return absl::AbortedError("NCCL link aborted");
      ncclResult_t st = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm_, &st);
      if (r != ncclSuccess) return NcclError(r, "ncclCommGetAsyncError", comm_);
      if (st == ncclSuccess) return absl::OkStatus();
      if (st != ncclInProgress) return NcclError(st, what, comm_);
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("NCCL ", what, ": timed out"));
    }
    if (absl::Now() < spin_until) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

absl::Status NcclLink::Init(const std::string& unique_id, absl::Duration timeout) {
  if (unique_id.size() != sizeof(ncclUniqueId::internal)) {
    state_ = State::kDead;
    return absl::InvalidArgumentError(absl::StrCat("ncclUniqueId of ", unique_id.size(), " bytes"));
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status s = [&]() -> absl::Status {
    KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    KL_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    KL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&aux_, cudaStreamNonBlocking));
    for (int h = 0; h < 2; ++h) {
      KL_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&filled_[h], cudaEventDisableTiming));
      KL_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&freed_[h], cudaEventDisableTiming));
    }
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    {
      std::lock_guard<std::mutex> l(mu_);
      const ncclResult_t r = ncclCommInitRankConfig(&comm_, 2, id, rank_, &config);
      if (r != ncclSuccess && r != ncclInProgress) {
        return NcclError(r, "ncclCommInitRankConfig", comm_);
      }
    }
    return Settle(deadline, "ncclCommInitRankConfig");
  }();
  if (s.ok()) worker_ = std::thread([this] { WorkerLoop(); });
  // NCCL connects a peer lazily, at the first send / receive, and both ranks
  // take part: exchange 4 bytes now so the first transfer does not pay for it.
  if (s.ok()) s = Reserve(256, 1, 1);
  if (s.ok()) {
    Post([this, deadline] {
      void* p = staging_;
      const int64_t four = 4;
      absl::Status g = rank_ == 0 ? Group(true, &p, &four, 1, deadline)
                                  : Group(false, &p, &four, 1, deadline);
      if (!g.ok()) return g;
      return cuda::CudaStatus(cudaEventRecord(done_, stream_), "cudaEventRecord");
    });
    s = Drain(deadline, nullptr);
  }
  if (s.ok()) s = Wait(done_, deadline, nullptr);
  if (!s.ok()) {
    Abort();
    return s;
  }
  Touch();  // idle from now on, not from creation (set-up may take seconds)
  state_ = State::kReady;
  return absl::OkStatus();
}

absl::Status NcclLink::Group(bool send, void* const* ptrs, const int64_t* bytes, int n,
                             absl::Time deadline) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (aborted_ || comm_ == nullptr) return absl::AbortedError("NCCL link aborted");
    const int peer = 1 - rank_;
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) return NcclError(r, "ncclGroupStart", comm_);
    for (int i = 0; i < n; ++i) {
      if (bytes[i] == 0) continue;
      r = send ? ncclSend(ptrs[i], static_cast<size_t>(bytes[i]), ncclUint8, peer, comm_, stream_)
               : ncclRecv(ptrs[i], static_cast<size_t>(bytes[i]), ncclUint8, peer, comm_, stream_);
      if (r != ncclSuccess && r != ncclInProgress) {
        ncclGroupEnd();
        return NcclError(r, send ? "ncclSend" : "ncclRecv", comm_);
      }
    }
    r = ncclGroupEnd();
    if (r != ncclSuccess && r != ncclInProgress) return NcclError(r, "ncclGroupEnd", comm_);
  }
  // Not under mu_: Abort must be able to end a wait for the peer.
  return Settle(deadline, send ? "ncclSend" : "ncclRecv");
}

absl::Status NcclLink::Send(const void* const* ptrs, const int64_t* bytes, int n) {
  return Group(true, const_cast<void* const*>(ptrs), bytes, n, absl::Now() + kPeerPatience);
}

absl::Status NcclLink::Recv(void* const* ptrs, const int64_t* bytes, int n) {
  return Group(false, ptrs, bytes, n, absl::Now() + kPeerPatience);
}

void NcclLink::Post(std::function<absl::Status()> work) {
  {
    std::lock_guard<std::mutex> l(qmu_);
    queue_.push_back(std::move(work));
  }
  qcv_.notify_all();
}

void NcclLink::WorkerLoop() {
  cudaSetDevice(device_);
  std::unique_lock<std::mutex> l(qmu_);
  for (;;) {
    qcv_.wait(l, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping
    std::function<absl::Status()> work = std::move(queue_.front());
    queue_.pop_front();
    const bool skip = !work_status_.ok() || aborted_;
    running_ = true;
    l.unlock();
    absl::Status s = skip ? absl::OkStatus() : work();
    if (!skip && s.ok() && aborted_) s = absl::AbortedError("NCCL link aborted");
    l.lock();
    running_ = false;
    if (work_status_.ok() && !s.ok()) work_status_ = s;
    if (work_status_.ok() && aborted_) work_status_ = absl::AbortedError("NCCL link aborted");
    qcv_.notify_all();
  }
}

absl::Status NcclLink::Drain(absl::Time deadline, const std::atomic<bool>* stop) {
  std::unique_lock<std::mutex> l(qmu_);
  for (;;) {
    if (queue_.empty() && !running_) return work_status_;
    if (aborted_) return absl::AbortedError("NCCL link aborted");
    if (stop != nullptr && stop->load()) return absl::AbortedError("device transfer cancelled");
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("device transfer timed out");
    qcv_.wait_for(l, std::chrono::milliseconds(1));
  }
}

void NcclLink::WaitIdle() {
  if (std::this_thread::get_id() == worker_.get_id()) return;
  std::unique_lock<std::mutex> l(qmu_);
  qcv_.wait(l, [this] { return !running_; });
}

void NcclLink::ResetWork() {
  std::lock_guard<std::mutex> l(qmu_);
  work_status_ = absl::OkStatus();
}

absl::Status NcclLink::WorkStatus() {
  std::lock_guard<std::mutex> l(qmu_);
  if (!work_status_.ok()) return work_status_;
  if (aborted_) return absl::AbortedError("NCCL link aborted");
  return absl::OkStatus();
}

absl::StatusOr<cudaEvent_t> NcclLink::Event(int64_t i) {
  std::lock_guard<std::mutex> l(mu_);
  while (static_cast<int64_t>(events_.size()) <= i) {
    cudaEvent_t e = nullptr;
    KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KL_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    events_.push_back(e);
  }
  return events_[i];
}

absl::Status NcclLink::Wait(cudaEvent_t event, absl::Time deadline, const std::atomic<bool>* stop,
                            absl::Duration spin) {
  const absl::Time spin_until = absl::Now() + spin;
  for (;;) {
    const cudaError_t e = cudaEventQuery(event);
    if (e == cudaSuccess) return absl::OkStatus();
    if (e != cudaErrorNotReady) return cuda::CudaStatus(e, "device transfer");
    {
      std::lock_guard<std::mutex> l(mu_);
      if (aborted_ || comm_ == nullptr) return absl::AbortedError("NCCL link aborted");
      ncclResult_t st = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &st) == ncclSuccess && st != ncclSuccess &&
          st != ncclInProgress) {
        return NcclError(st, "transfer", comm_);
      }
    }
    if (stop != nullptr && stop->load()) return absl::AbortedError("device transfer cancelled");
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError("device transfer timed out");
    }
    if (absl::Now() < spin_until) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

void NcclLink::Abort(bool expected) {
  state_ = State::kDead;
  cudaSetDevice(device_);
  bool first = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    first = !aborted_;
    aborted_ = true;
    if (comm_ != nullptr) {
      ncclCommAbort(comm_);  // pending sends / receives end; a waiting worker returns
      comm_ = nullptr;
    }
  }
  qcv_.notify_all();
  // Every caller waits for the drain, not only the first: each may free memory
  // the stream was using as soon as this returns.
  WaitIdle();  // the worker queues nothing more on the streams
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (aux_ != nullptr) cudaStreamSynchronize(aux_);
  if (first && !expected) {
    KL_LOG(WARNING).Field("link", id_).Field("peer", peer_) << "NCCL link aborted";
  }
}

namespace {

// Replaces a device buffer (and, if `host` is set, its pinned host twin) by a
// larger one when `want` elements exceed `cap`.
// The old buffers are retired, not freed: cudaFree / cudaFreeHost synchronise
// the whole device, which would wait for other links' pending receives.
template <typename T>
absl::Status Grow(T** dev, T** host, int64_t* cap, int64_t want, std::vector<void*>* retired_dev,
                  std::vector<void*>* retired_host) {
  if (want <= *cap) return absl::OkStatus();
  if (*dev != nullptr) retired_dev->push_back(*dev);
  *dev = nullptr;
  if (host != nullptr) {
    if (*host != nullptr) retired_host->push_back(*host);
    *host = nullptr;
  }
  *cap = 0;
  KL_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(dev), want * sizeof(T)));
  if (host != nullptr) {
    KL_CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(host), want * sizeof(T)));
  }
  *cap = want;
  return absl::OkStatus();
}

}  // namespace

absl::Status NcclLink::Reserve(int64_t staging_bytes, int64_t pages, int64_t sums) {
  KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  char* staging = static_cast<char*>(staging_);
  absl::Status s =
      Grow<char>(&staging, nullptr, &staging_bytes_, staging_bytes, &retired_dev_, &retired_host_);
  staging_ = staging;
  if (s.ok()) s = Grow<int32_t>(&d_pages_, &h_pages_, &pages_cap_, pages, &retired_dev_, &retired_host_);
  if (s.ok()) s = Grow<uint64_t>(&d_sums_, &h_sums_, &sums_cap_, sums, &retired_dev_, &retired_host_);
  return s;
}

}  // namespace kl
