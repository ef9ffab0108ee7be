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

}  // namespace

NcclLink::~NcclLink() {
  cudaSetDevice(device_);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (comm_ != nullptr) {
      // A healthy idle link is torn down collectively only if the peer does the
      // same; abort never waits for the peer.
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
  }
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  if (done_ != nullptr) cudaEventDestroy(done_);
  cudaFree(staging_);
  cudaFree(d_pages_);
  cudaFree(d_sums_);
  cudaFreeHost(h_pages_);
  cudaFreeHost(h_sums_);
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
  for (;;) {
    ncclResult_t st = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &st);
    if (r != ncclSuccess) return NcclError(r, "ncclCommGetAsyncError", comm_);
    if (st == ncclSuccess) return absl::OkStatus();
    if (st != ncclInProgress) return NcclError(st, what, comm_);
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("NCCL ", what, ": timed out"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

absl::Status NcclLink::Init(const std::string& unique_id, absl::Duration timeout) {
  if (unique_id.size() != sizeof(ncclUniqueId::internal)) {
    state_ = State::kDead;
    return absl::InvalidArgumentError(absl::StrCat("ncclUniqueId of ", unique_id.size(), " bytes"));
  }
  absl::Status s = [&]() -> absl::Status {
    KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    KL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    KL_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    std::lock_guard<std::mutex> l(mu_);
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, 2, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) return NcclError(r, "ncclCommInitRankConfig", comm_);
    return Settle(absl::Now() + timeout, "ncclCommInitRankConfig");
  }();
  // NCCL connects a peer lazily, at the first send / receive, and both ranks
  // must take part: exchange 4 bytes now, so that a later transfer's sends and
  // receives are only queued, never held until the peer shows up.
  if (s.ok()) s = Reserve(256, 1, 1);
  if (s.ok()) {
    void* p = staging_;
    const int64_t four = 4;
    s = rank_ == 0 ? Group(true, &p, &four, 1, absl::Now() + timeout)
                   : Group(false, &p, &four, 1, absl::Now() + timeout);
  }
  if (s.ok()) s = cuda::CudaStatus(cudaEventRecord(done_, stream_), "cudaEventRecord");
  if (s.ok()) s = Wait(done_, absl::Now() + timeout, nullptr);
  if (!s.ok()) {
    Abort();
    return s;
  }
  state_ = State::kReady;
  return absl::OkStatus();
}

absl::Status NcclLink::Group(bool send, void* const* ptrs, const int64_t* bytes, int n,
                             absl::Time deadline) {
  std::lock_guard<std::mutex> l(mu_);
  if (aborted_ || comm_ == nullptr) return absl::UnavailableError("NCCL link aborted");
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
  return Settle(deadline, send ? "ncclSend" : "ncclRecv");
}

absl::Status NcclLink::Send(const void* const* ptrs, const int64_t* bytes, int n) {
  return Group(true, const_cast<void* const*>(ptrs), bytes, n, absl::Now() + absl::Seconds(10));
}

absl::Status NcclLink::Recv(void* const* ptrs, const int64_t* bytes, int n) {
  return Group(false, ptrs, bytes, n, absl::Now() + absl::Seconds(10));
}

absl::Status NcclLink::Wait(cudaEvent_t event, absl::Time deadline, const std::atomic<bool>* stop) {
  for (int spin = 0;; ++spin) {
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
    // Spin briefly (most waits are sub-millisecond), then back off.
    if (spin > 200) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void NcclLink::Abort() {
  state_ = State::kDead;
  cudaSetDevice(device_);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (aborted_) return;
    aborted_ = true;
    if (comm_ != nullptr) {
      ncclCommAbort(comm_);  // pending sends / receives on stream_ end
      comm_ = nullptr;
    }
  }
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  KL_LOG(WARNING).Field("link", id_).Field("peer", peer_) << "NCCL link aborted";
}

absl::Status NcclLink::Reserve(int64_t staging_bytes, int64_t pages, int64_t sums) {
  KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  if (staging_bytes > staging_bytes_) {
    cudaFree(staging_);
    staging_ = nullptr;
    staging_bytes_ = 0;
    KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&staging_, staging_bytes));
    staging_bytes_ = staging_bytes;
  }
  if (pages > pages_cap_) {
    cudaFree(d_pages_);
    cudaFreeHost(h_pages_);
    d_pages_ = nullptr;
    h_pages_ = nullptr;
    pages_cap_ = 0;
    KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&d_pages_, pages * sizeof(int32_t)));
    KL_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h_pages_, pages * sizeof(int32_t)));
    pages_cap_ = pages;
  }
  if (sums > sums_cap_) {
    cudaFree(d_sums_);
    cudaFreeHost(h_sums_);
    d_sums_ = nullptr;
    h_sums_ = nullptr;
    sums_cap_ = 0;
    KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&d_sums_, sums * sizeof(uint64_t)));
    KL_CUDA_RETURN_IF_ERROR(cudaMallocHost(&h_sums_, sums * sizeof(uint64_t)));
    sums_cap_ = sums;
  }
  return absl::OkStatus();
}

}  // namespace kl
