// The receiving half of an NCCL transfer (decode side): each announced group's
// receives, checksums and scatter (docs/nccl_transfer.md).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/common/log.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/transfer.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/status_util.h"
#include "services/transport/nccl_internal.h"

namespace kl::nccl_internal {
namespace {


class NcclReceive final : public DeviceReceive {
 public:
  NcclReceive(std::shared_ptr<Core> core, std::shared_ptr<NcclLink> link, SequenceState state,
              std::vector<Piece> pieces, std::vector<int64_t> mla_bytes, int64_t staging_cap,
              int64_t bytes)
      : pipeline_(core->options.pipeline),
        core_(std::move(core)),
        link_(std::move(link)),
        state_(std::move(state)),
        pieces_(std::move(pieces)),
        mla_bytes_(std::move(mla_bytes)),
        staging_cap_(staging_cap),
        messages_(static_cast<int64_t>(pieces_.size())),
        bytes_(bytes) {}
  ~NcclReceive() override { Abort(); }

  absl::Status Receive(const MessageGroup& g) override {
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return absl::AbortedError("device receive ended");
    RETURN_IF_ERROR(ValidateGroup(mla_bytes_, posted_, g, staging_cap_));
    if (absl::Status w = link_->WorkStatus(); !w.ok()) {  // an earlier group failed
      return absl::Status(w.code(), absl::StrCat("device receive: ", w.message()));
    }
    std::vector<Piece> group(pieces_.begin() + g.first, pieces_.begin() + g.first + g.count);
    posted_ += g.count;
    const bool last = posted_ == messages_;
    const bool pipeline = pipeline_;
    const int h = pipeline ? static_cast<int>(groups_++ % 2) : 0;
    const int64_t half = staging_cap_;
    NcclLink* link = link_.get();
    const int64_t messages = messages_;
    // Serial: everything on the link's stream. Pipelined: the receive into
    // staging half h waits until the scatter that last read h is done; the
    // checksum and scatter run on the second stream behind the receive, so
    // group g scatters while g + 1 moves.
    link->Post([link, group = std::move(group), last, messages, pipeline, h,
                half]() mutable -> absl::Status {
      cudaStream_t st = link->stream();
      cudaStream_t post = pipeline ? link->aux_stream() : st;
      if (pipeline) {
        RETURN_IF_ERROR(cuda::CudaStatus(cudaStreamWaitEvent(st, link->freed(h), 0), "staging"));
      }
      GroupSpans spans = PlaceGroup(*link, static_cast<char*>(link->staging()) + h * half, group);
      RETURN_IF_ERROR(
          link->Recv(spans.ptrs.data(), spans.bytes.data(), static_cast<int>(spans.ptrs.size())));
      if (pipeline) {
        RETURN_IF_ERROR(cuda::CudaStatus(cudaEventRecord(link->filled(h), st), "staging"));
        RETURN_IF_ERROR(cuda::CudaStatus(cudaStreamWaitEvent(post, link->filled(h), 0), "staging"));
      }
      RETURN_IF_ERROR(
          cuda::Checksum64Batch(spans.sums.data(), static_cast<int>(spans.sums.size()), post));
      for (const Piece& p : group) {
        if (!p.kda) {  // summed and scattered in one pass
          RETURN_IF_ERROR(cuda::UnpackRows(p.ptrs[0], p.row_begin, p.row_end, p.paged, post,
                                           link->d_sums() + p.index * kMaxSpans));
        }
      }
      if (pipeline) {
        RETURN_IF_ERROR(cuda::CudaStatus(cudaEventRecord(link->freed(h), post), "staging"));
      }
      if (!last) return absl::OkStatus();
      RETURN_IF_ERROR(cuda::CudaStatus(
          cudaMemcpyAsync(link->h_sums(), link->d_sums(), messages * kMaxSpans * sizeof(uint64_t),
                          cudaMemcpyDeviceToHost, post),
          "checksums"));
      return cuda::CudaStatus(cudaEventRecord(link->done(), post), "event");
    });
    return absl::OkStatus();
  }

  absl::StatusOr<SequenceState> Complete(const std::vector<uint64_t>& checksums) override {
    int64_t posted;
    {
      std::lock_guard<std::mutex> l(mu_);
      posted = posted_;
    }
    if (static_cast<int64_t>(checksums.size()) != messages_ || posted != messages_) {
      Abort();
      return absl::DataLossError(absl::StrCat("device transfer: ", checksums.size(),
                                              " checksums and ", posted, " announced of ",
                                              messages_, " messages"));
    }
    const absl::Time deadline = absl::Now() + TransferBudget(core_->options, bytes_);
    absl::Status w = link_->Drain(deadline, &stop_);
    if (w.ok()) w = link_->Wait(link_->done(), deadline, &stop_);
    if (!w.ok()) {
      Abort();
      return absl::Status(w.code(), absl::StrCat("device receive: ", w.message()));
    }
    const std::vector<uint64_t> got = FoldSums(*link_, messages_);
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return absl::AbortedError("device receive aborted");
    done_ = true;
    for (int64_t m = 0; m < messages_; ++m) {
      if (got[m] != checksums[m]) {
        // The sender drops its end when we refuse: drop ours too.
        link_->Abort();
        core_->Forget(link_);
        core_->Count(&DeviceTransportStats::transfers_failed);
        state_ = SequenceState();  // frees the slot (the stream is drained)
        return absl::DataLossError(absl::StrCat("device transfer: checksum mismatch in message ",
                                                m, " of ", messages_));
      }
    }
    link_->Touch();
    link_->set_state(NcclLink::State::kReady);  // every operation completed: reusable
    core_->Count(&DeviceTransportStats::transfers_ok);
    core_->Count(&DeviceTransportStats::bytes, bytes_);
    core_->Count(&DeviceTransportStats::messages, messages_);
    return std::move(state_);
  }

  void Abort() override {
    stop_ = true;
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return;
    done_ = true;
    link_->Abort();  // pending receives end; the worker stops; the stream drains
    core_->Forget(link_);
    core_->Count(&DeviceTransportStats::transfers_failed);
    state_ = SequenceState();  // now the slot may go back
  }

 private:
  const bool pipeline_;  // declared (so initialised) before core_, read from the argument
  const std::shared_ptr<Core> core_;
  const std::shared_ptr<NcclLink> link_;
  std::mutex mu_;
  SequenceState state_;
  const std::vector<Piece> pieces_;  // resolved against state_ (MLA: staging set per group)
  const std::vector<int64_t> mla_bytes_;
  const int64_t staging_cap_;
  const int64_t messages_;
  const int64_t bytes_;
  int64_t posted_ = 0;  // messages whose receives were posted (mu_)
  int64_t groups_ = 0;  // groups posted (mu_): picks the staging half
  std::atomic<bool> stop_{false};
  bool done_ = false;
};

}  // namespace

std::unique_ptr<DeviceReceive> NewNcclReceive(std::shared_ptr<Core> core, std::shared_ptr<NcclLink> link,
                                              SequenceState state, std::vector<Piece> pieces,
                                              std::vector<int64_t> mla_bytes, int64_t staging_cap,
                                              int64_t bytes) {
  return std::unique_ptr<DeviceReceive>(new NcclReceive(std::move(core), std::move(link), std::move(state),
                                                        std::move(pieces), std::move(mla_bytes), staging_cap,
                                                        bytes));
}

}  // namespace kl::nccl_internal
